"""The dbt integration's errors: subclasses of the taxonomy in :mod:`flowstone_dagster.errors`.

::

    from flowstone_dagster.errors import ConfigurationError, DbtFailed

    try:
        dbt.run_model("orders")
    except DbtNothingSelected as exc:   # a DbtFailed: the selection named no node
        print(exc.argument)              # "select", "exclude" or "selector"
    except DbtFailed as exc:             # a model, seed or test failed
        for node in exc.failed_nodes:
            print(node["unique_id"], node["message"], node["compiled_path"])
        print(exc.target_path, exc.invocation_id, exc.log_path)

- set-up errors (raised before dbt starts, never retried): :class:`DbtProjectNotFound`,
  :class:`DbtProfileNotFound`, :class:`DbtExecutableNotFound`, all ``ConfigurationError``;
- :class:`DbtNothingSelected`: dbt exited 0 but an explicit selection matched no node;
- :class:`DbtTransientFailure` (and its :class:`DbtWarehouseUnreachable`): every failure of the
  invocation is one the warehouse may not repeat (a dropped connection, a rate limit, a lock,
  a serialization conflict); retryable;
- :class:`DbtWarehouseRejected`: the warehouse refused the credentials or the access, or the
  database does not exist; never retried.

:func:`classify_adapter_message` is the one classifier of adapter messages (postgres, redshift,
duckdb, snowflake, bigquery, databricks and the network errors they share).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal

from flowstone_dagster.errors import ConfigurationError, DbtFailed

__all__ = [
    "DbtExecutableNotFound",
    "DbtNothingSelected",
    "DbtProfileNotFound",
    "DbtProjectNotFound",
    "DbtTransientFailure",
    "DbtWarehouseRejected",
    "DbtWarehouseUnreachable",
    "MessageKind",
    "classify_adapter_message",
    "classify_failure",
    "is_transient_adapter_message",
]


class DbtProjectNotFound(ConfigurationError):
    """``project_dir`` does not exist or holds no ``dbt_project.yml``. Nothing was run."""


class DbtProfileNotFound(ConfigurationError):
    """No ``profiles.yml`` was found, or it lacks the project's profile or the target."""


class DbtExecutableNotFound(ConfigurationError):
    """The dbt executable is not on ``PATH`` nor next to the running Python. Nothing was run."""


class DbtNothingSelected(DbtFailed):
    """dbt exited 0 but ran nothing: an explicit selection matched no node.

    ``argument`` names what emptied it: ``"select"`` (a criterion matching no enabled node, or
    no node of the kind the command runs), ``"exclude"`` (it removed everything ``select``
    matched) or ``"selector"``. A default selection, an asset subset, and a ``state:`` /
    ``result:`` / ``source_status:`` selection may be empty without error; ``allow_empty=True``
    (per call or on the resource) accepts any empty selection. ``exit_code`` is dbt's (0).
    """

    def __init__(self, message: str, *, argument: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.argument = argument


class DbtTransientFailure(DbtFailed):
    """Every failure of the invocation is transient (a rate limit, a lock held by another
    process, a serialization conflict, a deadlock, a dropped connection). Retryable: the
    retry runs ``dbt retry``, so only the failed and skipped nodes run again.

    Raised only when *every* failure is transient; a SQL error or a failing test next to it
    makes the whole invocation a plain :class:`DbtFailed`.
    """

    retryable = True


class DbtWarehouseUnreachable(DbtTransientFailure):
    """A :class:`DbtTransientFailure` where dbt could not reach, or lost, the warehouse
    (refused, reset or timed-out connections, DNS failures, a service temporarily unavailable)."""


class DbtWarehouseRejected(DbtFailed):
    """The warehouse refused the credentials (``reason="authentication"``), the access
    (``"authorization"``), or the database or account does not exist (``"missing object"``).
    Never retried: another attempt would fail the same way (and may lock the account)."""

    retryable = False

    def __init__(self, message: str, *, reason: str, **kwargs: Any) -> None:
        super().__init__(message, **kwargs)
        self.reason = reason


#: What an adapter message says: the warehouse is unreachable, a transient failure, a
#: permanent refusal (authentication, authorization, missing object), or anything else.
MessageKind = Literal[
    "unreachable", "transient", "authentication", "authorization", "missing object", "other"
]


def _any(*patterns: str) -> re.Pattern[str]:
    return re.compile("|".join(patterns), re.IGNORECASE)


#: Permanent refusals, checked first (a missing object before authorization: Snowflake says
#: "does not exist or not authorized"): Snowflake wraps a wrong password in the same
#: ``250001 (08001)`` as an unreachable host, and libpq in "connection to server ... failed".
_PERMANENT: tuple[tuple[MessageKind, re.Pattern[str]], ...] = (
    (
        "authentication",
        _any(
            # PostgreSQL / Redshift (libpq, redshift_connector)
            r"password authentication failed",
            r"no password supplied",
            r"fe_sendauth",
            r"no pg_hba\.conf entry",
            r"authentication failed for user",
            # Snowflake: 390100 wrong user/password, 390144 bad JWT, 390318 expired token
            r"incorrect username or password",
            r"\b3901(?:00|44|18|95)\b",
            r"jwt token is invalid",
            r"authentication token has expired",
            # BigQuery / Google auth
            r"invalid authentication credentials",
            r"invalid_grant",
            r"could not automatically determine credentials",
            r"reauthentication is needed",
            # Databricks
            r"invalid access token",
            r"\b401\b.*unauthorized",
            r"credential was not sent or was of an unsupported type",
        ),
    ),
    (
        "missing object",
        _any(
            r"database \S+ does not exist",
            r"role \S+ does not exist",
            r"catalog \S+ does not exist",
            r"\bSCHEMA_NOT_FOUND\b",
            r"\bCATALOG_NOT_FOUND\b",
            r"Not found: (?:Dataset|Project)",
            r"account \S+ (?:does not exist|not found)",
            r"\b390201\b",  # Snowflake: the requested warehouse/database does not exist
        ),
    ),
    (
        "authorization",
        _any(
            r"permission denied",
            r"insufficient privileges",
            r"access denied",
            r"not authorized",
            r"\bPERMISSION_DENIED\b",
            r"user does not have permission",
            r"\b403\b.*forbidden",
        ),
    ),
)

#: The warehouse could not be reached or went away (retryable).
_UNREACHABLE = _any(
    # libpq / psycopg2 (postgres, redshift) and sockets
    r"connection refused",
    r"could not connect to server",
    r"connection to server at .* failed",
    r"server closed the connection unexpectedly",
    r"connection reset by peer",
    r"connection timed out",
    r"timeout expired",
    r"broken pipe",
    r"ssl syscall error",
    r"ssl connection has been closed unexpectedly",
    r"connection already closed",
    r"terminating connection due to administrator command",
    r"the database system is (?:starting up|shutting down|in recovery mode)",
    r"could not receive data from server",
    r"no connection to the server",
    # DNS
    r"could not translate host name",
    r"temporary failure in name resolution",
    r"name or service not known",
    r"nodename nor servname provided",
    r"getaddrinfo failed",
    # Snowflake: 250001 could not connect, 250003 failed to get the response
    r"\b25000[13]\b",
    r"could not connect to snowflake backend",
    # BigQuery / Google APIs, Databricks
    r"\b50[234]\b.*(?:service unavailable|bad gateway|gateway timeout|backend ?error)",
    r"service unavailable",
    r"\bbackendError\b",
    r"\bTEMPORARILY_UNAVAILABLE\b",
    r"max retries exceeded with url",
    r"remote end closed connection without response",
)

#: Transient failures of a reachable warehouse (retryable).
_TRANSIENT = _any(
    # DuckDB: the database file is locked by another process
    r"could not set lock on file",
    r"conflicting lock is held",
    # serialization failures and deadlocks (PostgreSQL 40001 / 40P01, Redshift 1023,
    # Snowflake 000625 / 000604, Databricks concurrent writes)
    r"could not serialize access",
    r"serializ(?:ation failure|able isolation violation)",
    r"deadlock detected",
    r"\bdeadlock\b",
    r"\b40001\b",
    r"\b40P01\b",
    r"\b000625\b",
    r"ConcurrentAppendException|ConcurrentDeleteReadException|\bDELTA_CONCURRENT",
    r"statement .* was aborted because the number of waiters for this lock exceeds",
    r"canceling statement due to lock timeout",
    # rate limits and overload (BigQuery rateLimitExceeded, HTTP 429, Databricks)
    r"\brateLimitExceeded\b",
    r"exceeded rate limits",
    r"(?:http|status|code)[ :=]*429\b",
    r"\b429 too many requests",
    r"too many requests",
    r"\bREQUEST_LIMIT_EXCEEDED\b",
    r"too many connections|remaining connection slots are reserved",
)


def classify_adapter_message(message: str) -> MessageKind:
    """What one dbt/adapter error message says about the warehouse.

    ::

        >>> classify_adapter_message('connection to server at "127.0.0.1", port 1 failed: '
        ...                          'Connection refused')
        'unreachable'
        >>> classify_adapter_message('connection to server at "127.0.0.1", port 5432 failed: '
        ...                          'FATAL:  password authentication failed for user "dbt"')
        'authentication'
        >>> classify_adapter_message('Binder Error: Referenced column "x" not found')
        'other'
    """
    for kind, pattern in _PERMANENT:
        if pattern.search(message):
            return kind
    if _UNREACHABLE.search(message):
        return "unreachable"
    if _TRANSIENT.search(message):
        return "transient"
    return "other"


def is_transient_adapter_message(message: str) -> bool:
    """Whether a message is a failure another attempt may not repeat (see
    :func:`classify_adapter_message`)."""
    return classify_adapter_message(message) in ("unreachable", "transient")


def classify_failure(messages: Iterable[str]) -> MessageKind:
    """What a failed invocation's error messages say together.

    A permanent refusal anywhere wins (``"authentication"``, ``"authorization"``,
    ``"missing object"``); else ``"unreachable"`` / ``"transient"`` when *every* message is
    (``"unreachable"`` if any is); else ``"other"`` (also for no messages).
    """
    kinds = [classify_adapter_message(message) for message in messages]
    for permanent in ("authentication", "missing object", "authorization"):
        if permanent in kinds:
            return permanent
    if kinds and all(kind in ("unreachable", "transient") for kind in kinds):
        return "unreachable" if "unreachable" in kinds else "transient"
    return "other"
