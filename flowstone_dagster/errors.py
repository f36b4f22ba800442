"""The error taxonomy of flowstone-dagster, and the one decision on what to retry.

Every integration raises exceptions from this module when an external system fails, so that a
user (or a sensor, or Dagster's step retries) can act on *what* went wrong without parsing
messages::

    from flowstone_dagster.errors import NotFound, RateLimited, is_retryable

    try:
        rows = client.load("2025-01-15")
    except NotFound:
        rows = []
    except RateLimited as exc:
        print(f"slow down for {exc.retry_after} s")

:func:`is_retryable` is the single place that decides whether a failure is transient. The
retry helpers, the circuit breaker and every integration call it; nothing else keeps its own
list of retryable statuses.

Messages never contain secrets: URLs are redacted by :mod:`flowstone_dagster.http` before
they reach an exception, and server bodies are truncated.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path
from typing import Any

__all__ = [
    "RETRYABLE_SQLSTATES",
    "RETRYABLE_STATUSES",
    "CallTimeout",
    "CircuitOpen",
    "ConfigurationError",
    "DbtFailed",
    "DecodeError",
    "ExternalServiceError",
    "FlowstoneError",
    "Forbidden",
    "HTTPError",
    "MaxAttemptsExceeded",
    "NotFound",
    "PartialFailure",
    "PythonWorkerError",
    "RateLimited",
    "RedirectRefused",
    "ResponseTooLarge",
    "StoreUnavailable",
    "TransportError",
    "Unauthorized",
    "WorkerCrashed",
    "error_for_status",
    "is_retryable",
    "parse_retry_after",
    "retry_after_of",
    "status_of",
    "truncate",
]

#: HTTP statuses that mean "try again later": request timeout, too early, too many requests,
#: server errors that are usually transient, and Anthropic's 529 "overloaded".
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 425, 429, 500, 502, 503, 504, 529})

#: SQLSTATEs of transient database conditions that succeed when the transaction runs again:
#: serialization failure, deadlock, lock not available (lock_timeout), too many connections,
#: out of memory or disk on the server, and the server shutting down or restarting. Class 08
#: (connection exceptions) is transient too.
RETRYABLE_SQLSTATES: frozenset[str] = frozenset(
    {"40001", "40P01", "55P03", "53000", "53100", "53200", "53300", "57P01", "57P02", "57P03"}
)

#: How much of a server's error body an exception keeps.
MAX_BODY_EXCERPT = 500


def truncate(text: str, limit: int = MAX_BODY_EXCERPT) -> str:
    """Shorten ``text`` to at most ``limit`` characters, marking the cut."""
    if len(text) <= limit:
        return text
    keep = max(limit - len(f"... [{len(text)} more]"), 0)
    return f"{text[:keep]}... [{len(text) - keep} more]"


class FlowstoneError(Exception):
    """Base class of every error flowstone-dagster raises.

    ``retryable`` is the class's default answer for :func:`is_retryable`; ``service`` names the
    external system (``"anthropic"``, ``"rest:orders"``, ...) when known.
    """

    retryable: bool = False

    def __init__(self, message: str, *, service: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.service = service

    def __str__(self) -> str:
        return f"[{self.service}] {self.message}" if self.service else self.message

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take keyword-only arguments, so the default (``cls(*args)``) cannot
        # rebuild them: errors must survive pickling between worker processes and Dagster's.
        return (_rebuild_error, (type(self), self.args, self.__dict__.copy()))


def _rebuild_error(cls: type[FlowstoneError], args: tuple[Any, ...], state: dict[str, Any]) -> Any:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class ConfigurationError(FlowstoneError, ValueError):
    """A resource or call was configured wrongly; fix the named field. Never retried."""

    def __init__(self, message: str, *, field: str | None = None, service: str | None = None):
        super().__init__(f"{field}: {message}" if field else message, service=service)
        self.field = field


class ExternalServiceError(FlowstoneError):
    """An external system failed or could not be reached."""


class TransportError(ExternalServiceError, ConnectionError):
    """The connection failed before a response arrived: refused, reset, DNS or TLS failure.

    Retryable, except for TLS certificate failures (``tls=True``), which will fail the same
    way again: configure ``ca_bundle`` or fix the server's certificate.
    """

    retryable = True

    def __init__(self, message: str, *, service: str | None = None, tls: bool = False):
        super().__init__(message, service=service)
        self.tls = tls
        if tls:
            self.retryable = False


class CallTimeout(ExternalServiceError, TimeoutError):
    """An external call did not finish within its timeout. Retryable.

    ``timeout`` is the limit in seconds that was passed, when known.
    """

    retryable = True

    def __init__(
        self, message: str, *, timeout: float | None = None, service: str | None = None
    ) -> None:
        super().__init__(message, service=service)
        self.timeout = timeout


class HTTPError(ExternalServiceError):
    """An HTTP response with a failing status.

    ``status`` is the status code, ``url`` the (redacted) URL, ``method`` the request method,
    ``body`` an excerpt of the server's message, ``retry_after`` the seconds from a
    ``Retry-After`` header when the server sent one.
    """

    def __init__(
        self,
        message: str,
        *,
        status: int,
        url: str | None = None,
        method: str | None = None,
        body: str | None = None,
        retry_after: float | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.status = status
        self.url = url
        self.method = method
        self.body = body
        self.retry_after = retry_after
        self.retryable = status in RETRYABLE_STATUSES


class NotFound(HTTPError):
    """404 or 410: the resource does not exist. Never retried."""


class Unauthorized(HTTPError):
    """401: credentials are missing or wrong. Check the API key or token. Never retried."""


class Forbidden(HTTPError):
    """403: the credentials are valid but lack permission. Never retried."""


class RedirectRefused(HTTPError):
    """A store (``POST``/``PUT``/``PATCH``) was answered with a redirect it must not follow:
    301/302/303 (which would turn it into a ``GET`` or drop its body), or 307/308 to another
    origin. Never retried: the configured URL is wrong."""

    retryable = False


class RateLimited(ExternalServiceError):
    """A rate limit was hit: an HTTP 429 from a server, or a local limiter in reject mode.

    ``retry_after`` is how long to wait in seconds, when known; ``status`` is the HTTP status
    when it came from a server.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        status: int | None = None,
        url: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.retry_after = retry_after
        self.status = status
        self.url = url


class DecodeError(ExternalServiceError):
    """A response arrived but could not be decoded in the expected format. Never retried."""

    def __init__(
        self,
        message: str,
        *,
        url: str | None = None,
        fmt: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.url = url
        self.format = fmt


class ResponseTooLarge(ExternalServiceError):
    """A response body exceeded the configured ``max_body_bytes``. Never retried.

    Raise the limit if the response is expected to be that large.
    """

    def __init__(
        self, message: str, *, limit: int, url: str | None = None, service: str | None = None
    ) -> None:
        super().__init__(message, service=service)
        self.limit = limit
        self.url = url


class CircuitOpen(FlowstoneError):
    """A circuit breaker is open: the service failed repeatedly and calls are refused for now.

    ``name`` is the breaker, ``retry_in`` the seconds until it lets a probe through. Not retried
    inside a call (waiting in a tight loop is what the breaker prevents); inside Dagster it is
    turned into ``RetryRequested(seconds_to_wait=retry_in)``.
    """

    def __init__(self, name: str, retry_in: float, *, service: str | None = None) -> None:
        super().__init__(
            f"circuit {name!r} is open; next probe in {max(retry_in, 0.0):.1f} s",
            service=service,
        )
        self.name = name
        self.retry_in = max(retry_in, 0.0)


class StoreUnavailable(FlowstoneError):
    """The resilience store (where breakers and limiters keep shared state) failed or timed out.

    It is an external dependency of its own, not the service being called: a store error is
    never recorded as a failure of the service. Retryable: inside Dagster it becomes a step
    retry (``RetryRequested``), or the policy's ``on_store_error="local"`` falls back to this
    process's memory. ``store`` is the store's URL (password redacted), ``operation`` what was
    being done (``"read breaker"``, ``"reserve"``, ...), ``reason`` the driver's message.
    """

    retryable = True

    def __init__(
        self, store: str, operation: str, reason: str, *, service: str | None = None
    ) -> None:
        super().__init__(
            f"resilience store {store} unavailable ({operation}): {reason}", service=service
        )
        self.store = store
        self.operation = operation
        self.reason = reason


class MaxAttemptsExceeded(FlowstoneError):
    """Every attempt of a retried call failed; ``last_error`` (also ``__cause__``) says why."""

    def __init__(
        self, attempts: int, last_error: BaseException, *, service: str | None = None
    ) -> None:
        super().__init__(
            f"gave up after {attempts} attempt{'s' if attempts != 1 else ''}: "
            f"{type(last_error).__name__}: {last_error}",
            service=service,
        )
        self.attempts = attempts
        self.last_error = last_error


class PartialFailure(FlowstoneError):
    """Some of several independent deliveries failed (for example one notification channel).

    ``failures`` is a list of ``(target, exception)`` pairs, ``succeeded`` the targets that
    worked.
    """

    def __init__(
        self,
        failures: Sequence[tuple[str, BaseException]],
        succeeded: Sequence[str] = (),
        *,
        service: str | None = None,
    ) -> None:
        detail = "; ".join(f"{target}: {type(exc).__name__}: {exc}" for target, exc in failures)
        what = "all" if not succeeded else f"{len(failures)} of {len(failures) + len(succeeded)}"
        super().__init__(f"{what} failed: {detail}", service=service)
        self.failures = list(failures)
        self.succeeded = list(succeeded)


class DbtFailed(ExternalServiceError):
    """dbt exited non-zero (or ran nothing that was asked for). What failed and where to look.

    ``exit_code``, ``output`` (dbt's console text); ``failed_nodes``, ``skipped_nodes`` and
    ``succeeded_nodes`` (dicts as ``DbtNodeResult.as_dict``); ``command`` the dbt command line
    with its selection (``--vars`` hidden); ``target_path`` the invocation's own target
    directory (``run_results.json``, compiled SQL: what ``dbt retry --state`` needs);
    ``invocation_id`` dbt's id of the run; ``log_path`` dbt's debug log.
    """

    def __init__(
        self,
        message: str,
        *,
        exit_code: int,
        output: str = "",
        failed_nodes: Sequence[Mapping[str, Any]] = (),
        skipped_nodes: Sequence[Mapping[str, Any]] = (),
        succeeded_nodes: Sequence[Mapping[str, Any]] = (),
        command: str = "",
        target_path: Path | None = None,
        invocation_id: str | None = None,
        log_path: Path | None = None,
        service: str | None = "dbt",
    ) -> None:
        super().__init__(message, service=service)
        self.exit_code = exit_code
        self.output = output
        self.failed_nodes = list(failed_nodes)
        self.skipped_nodes = list(skipped_nodes)
        self.succeeded_nodes = list(succeeded_nodes)
        self.command = command
        self.target_path = target_path
        self.invocation_id = invocation_id
        self.log_path = log_path


class PythonWorkerError(ExternalServiceError):
    """User code in a Python worker raised. Carries the remote type, message and traceback."""

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        *,
        service: str | None = None,
    ) -> None:
        super().__init__(f"{remote_type}: {remote_message}", service=service)
        self.remote_type = remote_type
        self.remote_message = remote_message
        self.remote_traceback = remote_traceback


class WorkerCrashed(ExternalServiceError):
    """A worker process died during a call (exit code or signal). Retryable in a new worker."""

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        exit_code: int | None = None,
        signal: int | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.exit_code = exit_code
        self.signal = signal


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header: delta-seconds or an HTTP date.

    Returns ``None`` when the value is absent or unreadable, and never a negative number::

        >>> parse_retry_after("2")
        2.0
        >>> parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412480.0)
        0.0
    """
    if value is None:
        return None
    value = value.strip()
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        seconds = when.timestamp() - (time.time() if now is None else now)
    if math.isnan(seconds) or math.isinf(seconds):
        return None
    return max(seconds, 0.0)


def error_for_status(
    status: int,
    *,
    url: str | None = None,
    method: str | None = None,
    body: str | None = None,
    retry_after: float | None = None,
    service: str | None = None,
) -> ExternalServiceError:
    """The taxonomy's exception for a failing HTTP status (the caller raises it).

    ``body`` is truncated; ``url`` must already be redacted.
    """
    excerpt = truncate(body.strip()) if body else None
    where = f"{method} {url}" if method and url else (url or "request")
    message = f"HTTP {status} from {where}" + (f": {excerpt}" if excerpt else "")
    if status == 429:
        if retry_after is not None:
            message += f" (retry after {retry_after:g} s)"
        return RateLimited(
            message, retry_after=retry_after, status=status, url=url, service=service
        )
    cls: type[HTTPError]
    if status in (404, 410):
        cls = NotFound
    elif status == 401:
        cls = Unauthorized
    elif status == 403:
        cls = Forbidden
    else:
        cls = HTTPError
    return cls(
        message,
        status=status,
        url=url,
        method=method,
        body=excerpt,
        retry_after=retry_after,
        service=service,
    )


@cache
def _sdk_transient_types() -> tuple[type[BaseException], ...]:
    """Transport-level error types of the libraries we call through, imported lazily."""
    types: list[type[BaseException]] = []
    try:
        import requests

        types += [requests.exceptions.Timeout, requests.exceptions.ConnectionError]
    except ImportError:  # pragma: no cover - requests is a dependency
        pass
    for sdk in ("anthropic", "openai"):
        try:
            module = __import__(sdk)
        except ImportError:  # pragma: no cover - both are dependencies
            continue
        # APITimeoutError subclasses APIConnectionError in both SDKs.
        types.append(module.APIConnectionError)
    return tuple(types)


def status_of(exc: BaseException) -> int | None:
    """The HTTP status an error carries (``status`` or an SDK's ``status_code``), if any."""
    for attribute in ("status", "status_code"):
        status = getattr(exc, attribute, None)
        if isinstance(status, int) and not isinstance(status, bool):
            return status
    return None


def _is_tls_failure(exc: BaseException) -> bool:
    import ssl

    try:
        import requests
    except ImportError:  # pragma: no cover - requests is a dependency
        return isinstance(exc, ssl.SSLError)
    return isinstance(exc, (ssl.SSLError, requests.exceptions.SSLError))


@cache
def _psycopg2_class_codes() -> dict[type, str]:
    """psycopg2's SQLSTATE per error class (an error built in Python has no ``pgcode``)."""
    try:
        from psycopg2._psycopg import sqlstate_errors
    except ImportError:  # pragma: no cover - psycopg2 comes with dagster-postgres
        return {}
    return {cls: code for code, cls in sqlstate_errors.items()}


def _database_transient(exc: BaseException) -> bool | None:
    """Whether a DB-API driver error is transient, or ``None`` when ``exc`` is not one.

    psycopg2: connection exceptions (SQLSTATE class 08, or libpq failing with no SQLSTATE),
    and :data:`RETRYABLE_SQLSTATES`. sqlite3: a locked or busy database.
    """
    module = type(exc).__module__ or ""
    if module.startswith(("psycopg2", "psycopg")):
        code = getattr(exc, "pgcode", None) or getattr(exc, "sqlstate", None)
        if not code:
            code = _psycopg2_class_codes().get(type(exc))
        if code:
            return code.startswith("08") or code in RETRYABLE_SQLSTATES
        return type(exc).__name__ in ("OperationalError", "InterfaceError")
    if module == "sqlite3":
        text = str(exc).lower()
        return type(exc).__name__ == "OperationalError" and ("locked" in text or "busy" in text)
    return None


def is_retryable(exc: BaseException) -> bool:
    """Whether ``exc`` is a transient failure worth another attempt.

    The one decision every integration uses:

    - timeouts and connection failures (ours, the standard library's, ``requests``', and the
      Anthropic/OpenAI SDKs') are retryable, except TLS certificate failures;
    - an HTTP status error (ours, or an SDK's ``APIStatusError``) is retryable when its status is
      in :data:`RETRYABLE_STATUSES` (408, 425, 429, 500, 502, 503, 504, 529);
    - a flowstone error answers with its ``retryable`` attribute (rate limits, worker crashes and
      an unavailable resilience store yes; not-found, auth, decoding, configuration, open
      circuits, exhausted retries no);
    - a database driver's error (psycopg2, sqlite3) when it is a lost connection, a server
      restart, a lock or serialization conflict (:data:`RETRYABLE_SQLSTATES`) or a busy SQLite
      file;
    - anything else (bad input, programming errors) is not.
    """
    if isinstance(exc, FlowstoneError):
        return bool(exc.retryable)
    if _is_tls_failure(exc):
        return False  # an untrusted certificate fails the same way every time
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    if isinstance(exc, _sdk_transient_types()):
        return True
    database = _database_transient(exc)
    if database is not None:
        return database
    status = status_of(exc)
    if status is not None:
        return status in RETRYABLE_STATUSES
    return False


def retry_after_of(exc: BaseException) -> float | None:
    """The wait in seconds that ``exc`` asks for, if any.

    Reads a flowstone error's ``retry_after``, or an SDK error's response headers
    (``retry-after-ms``, ``retry-after``, seconds or HTTP date).
    """
    value = getattr(exc, "retry_after", None)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return max(float(value), 0.0)
    response = getattr(exc, "response", None)
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    try:
        milliseconds = headers.get("retry-after-ms")
        if milliseconds is not None:
            return max(float(milliseconds) / 1000.0, 0.0)
    except (TypeError, ValueError):
        pass
    return parse_retry_after(headers.get("retry-after"))
