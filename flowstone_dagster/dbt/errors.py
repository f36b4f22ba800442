"""The dbt integration's errors: subclasses of the taxonomy in :mod:`flowstone_dagster.errors`.

::

    from flowstone_dagster.errors import ConfigurationError, DbtFailed

    try:
        dbt.run_model("orders")
    except DbtNothingSelected:       # a DbtFailed: the selector named no node
        ...
    except DbtFailed as exc:         # a model, seed or test failed
        for node in exc.failed_nodes:
            print(node["unique_id"], node["message"], node["compiled_path"])

- set-up errors (raised before dbt starts, never retried): :class:`DbtProjectNotFound`,
  :class:`DbtProfileNotFound`, :class:`DbtExecutableNotFound`, all ``ConfigurationError``;
- :class:`DbtNothingSelected`: dbt exited 0 but the selection matched no node;
- :class:`DbtWarehouseUnreachable`: dbt could not reach (or lost) the warehouse; retryable.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from flowstone_dagster.errors import ConfigurationError, DbtFailed

__all__ = [
    "DbtExecutableNotFound",
    "DbtNothingSelected",
    "DbtProfileNotFound",
    "DbtProjectNotFound",
    "DbtWarehouseUnreachable",
    "all_transient",
    "is_transient_adapter_message",
]


class DbtProjectNotFound(ConfigurationError):
    """``project_dir`` does not exist or holds no ``dbt_project.yml``. Nothing was run."""


class DbtProfileNotFound(ConfigurationError):
    """No ``profiles.yml`` was found, or it lacks the project's profile or the target."""


class DbtExecutableNotFound(ConfigurationError):
    """The dbt executable is not on ``PATH`` nor next to the running Python. Nothing was run."""


class DbtNothingSelected(DbtFailed):
    """dbt exited 0 but ran nothing: the selection (``select`` / ``exclude``) matched no node.

    dbt only prints a warning in that case; a run that silently does nothing is almost always a
    typo in a model name, so it is an error here. ``exit_code`` is dbt's (0).
    """


class DbtWarehouseUnreachable(DbtFailed):
    """dbt failed because the warehouse refused or dropped the connection. Retryable.

    Raised only when *every* failure of the invocation is a connection failure; a SQL error or
    a failing test next to it makes the whole invocation a plain :class:`DbtFailed`.
    """

    retryable = True


#: Adapter messages that mean the warehouse could not be reached or went away, not that the
#: SQL was wrong: psycopg2 / libpq (dbt-postgres, dbt-redshift), generic socket errors, and
#: PostgreSQL's own shutdown and recovery notices.
_TRANSIENT_MESSAGES = re.compile(
    "|".join(
        [
            r"connection refused",
            r"could not connect to server",
            r"connection to server at .* failed",
            r"server closed the connection unexpectedly",
            r"connection reset by peer",
            r"connection timed out",
            r"timeout expired",
            r"broken pipe",
            r"ssl syscall error",
            r"connection already closed",
            r"terminating connection due to administrator command",
            r"the database system is (?:starting up|shutting down|in recovery mode)",
            r"could not receive data from server",
            r"no connection to the server",
        ]
    ),
    re.IGNORECASE,
)


def is_transient_adapter_message(message: str) -> bool:
    """Whether a dbt/adapter error message says the warehouse connection failed.

    ::

        >>> is_transient_adapter_message('connection to server at "127.0.0.1", port 1 failed: '
        ...                              'Connection refused')
        True
        >>> is_transient_adapter_message('Binder Error: Referenced column "x" not found')
        False
    """
    return bool(_TRANSIENT_MESSAGES.search(message))


def all_transient(messages: Iterable[str]) -> bool:
    """True when there is at least one message and every one is a connection failure."""
    seen = False
    for message in messages:
        if not is_transient_adapter_message(message):
            return False
        seen = True
    return seen
