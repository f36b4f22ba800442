"""The one mapping of a failed external call onto Dagster's control flow:
``RetryRequested`` for what will pass (an open circuit, a far rate limit, an unavailable
store), ``Failure(allow_retries=...)`` for the rest, with a redacted cause chain.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg

from flowstone_dagster.errors import (
    CircuitOpen,
    FlowstoneError,
    MaxAttemptsExceeded,
    StoreUnavailable,
    is_retryable,
    retry_after_of,
    status_of,
    truncate,
)
from flowstone_dagster.redaction import redact_exception_chain, redact_text

__all__ = [
    "DEFAULT_RETRY_REQUESTED_AFTER",
    "DEFAULT_STEP_MAX_RETRIES",
    "DEFAULT_STORE_RETRY_AFTER",
    "RECOMMENDED_RETRY_POLICY",
    "dagster_retries",
    "to_dagster_error",
]

#: Step retries in :data:`RECOMMENDED_RETRY_POLICY` and in the ``RetryRequested`` this module
#: raises. With the default 3 attempts per call, a step makes at most 3 x (2 + 1) = 9 calls.
DEFAULT_STEP_MAX_RETRIES = 2

#: A step-level retry policy that goes with the call-level retries: two more step attempts,
#: 30 s then 60 s later (+/- jitter), so that a service that is down for minutes is retried
#: by Dagster, not by a tight loop inside a call.
RECOMMENDED_RETRY_POLICY = dg.RetryPolicy(
    max_retries=DEFAULT_STEP_MAX_RETRIES,
    delay=30,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)

#: A rate-limit wait at least this long (seconds) becomes a step retry, not a sleep.
DEFAULT_RETRY_REQUESTED_AFTER = 5.0

#: Seconds Dagster waits before retrying a step whose resilience store was unavailable.
DEFAULT_STORE_RETRY_AFTER = 10.0


def _metadata(exc: BaseException, cause: BaseException, service: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "flowstone/error_type": type(cause).__name__,
        "flowstone/retryable": is_retryable(cause),
    }
    service = service or getattr(cause, "service", None)
    if service:
        metadata["flowstone/service"] = str(service)
    if isinstance(exc, MaxAttemptsExceeded):
        metadata["flowstone/attempts"] = exc.attempts
    status = status_of(cause)
    if status is not None:
        metadata["flowstone/status"] = status
    wait = retry_after_of(cause)
    if wait is not None:
        metadata["flowstone/retry_after_s"] = round(wait, 3)
    return metadata


def to_dagster_error(
    exc: BaseException,
    *,
    retry_requested_after: float = DEFAULT_RETRY_REQUESTED_AFTER,
    max_retries: int = DEFAULT_STEP_MAX_RETRIES,
    service: str | None = None,
    store_retry_after: float = DEFAULT_STORE_RETRY_AFTER,
) -> BaseException:
    """The Dagster control-flow exception for a failed external call: the one mapping.

    Raise the result as it is (``raise to_dagster_error(exc)``): its ``__cause__`` is ``exc``
    with every link of its chain redacted (:func:`~flowstone_dagster.redaction.
    redact_exception_chain`), because Dagster records the whole chain in the event log.

    - ``CircuitOpen`` (also as the last error of ``MaxAttemptsExceeded``) ->
      ``RetryRequested(max_retries, seconds_to_wait=retry_in)`` (at least 1 s);
    - ``StoreUnavailable`` (the resilience store failed; the service was not called) ->
      ``RetryRequested(max_retries, seconds_to_wait=store_retry_after)``;
    - a rate limit (any error with a retry-after) asking to wait ``retry_requested_after``
      seconds or more -> ``RetryRequested(max_retries, seconds_to_wait=<the wait>)``;
    - an error that is not retryable -> ``Failure(allow_retries=False)``: Dagster fails the step
      even when it has a ``RetryPolicy``;
    - retries exhausted on a transient error -> ``Failure(allow_retries=True)``: the step's
      ``RetryPolicy``, if any, retries it;
    - ``Failure``, ``RetryRequested`` and ``BaseException`` that is not an ``Exception`` are
      returned unchanged.

    The ``Failure``'s description is the error's message (flowstone errors carry no secrets)
    and its metadata ``flowstone/error_type``, ``/retryable``, ``/service``, ``/attempts``,
    ``/status`` and ``/retry_after_s`` where known::

        try:
            rows = with_retry(fetch)
        except Exception as exc:
            raise to_dagster_error(exc)
    """
    if not isinstance(exc, Exception) or isinstance(exc, (dg.Failure, dg.RetryRequested)):
        return exc
    cause = exc.last_error if isinstance(exc, MaxAttemptsExceeded) else exc
    mapped: BaseException
    if isinstance(cause, CircuitOpen):
        mapped = dg.RetryRequested(
            max_retries=max_retries, seconds_to_wait=max(math.ceil(cause.retry_in), 1)
        )
    elif isinstance(cause, StoreUnavailable):
        mapped = dg.RetryRequested(
            max_retries=max_retries, seconds_to_wait=max(math.ceil(store_retry_after), 0)
        )
    else:
        wait = retry_after_of(cause)
        retryable = is_retryable(cause)
        if wait is not None and wait >= retry_requested_after and retryable:
            mapped = dg.RetryRequested(max_retries=max_retries, seconds_to_wait=math.ceil(wait))
        else:
            is_ours = isinstance(exc, FlowstoneError)
            description = str(exc) if is_ours else f"{type(exc).__name__}: {exc}"
            mapped = dg.Failure(
                description=truncate(redact_text(description), 2000),
                metadata=_metadata(exc, cause, service),
                allow_retries=retryable,
            )
    mapped.__cause__ = redact_exception_chain(exc, is_ours=FlowstoneError)
    return mapped


@contextmanager
def dagster_retries(
    *,
    retry_requested_after: float = DEFAULT_RETRY_REQUESTED_AFTER,
    max_retries: int = DEFAULT_STEP_MAX_RETRIES,
    service: str | None = None,
) -> Iterator[None]:
    """Turn errors escaping the block into Dagster control flow (see :func:`to_dagster_error`).

    ::

        @dg.asset(retry_policy=RECOMMENDED_RETRY_POLICY)
        def orders() -> list[dict]:
            with dagster_retries():
                return with_circuit_breaker("orders-api", fetch_orders)
    """
    try:
        yield
    except Exception as exc:
        mapped = to_dagster_error(
            exc,
            retry_requested_after=retry_requested_after,
            max_retries=max_retries,
            service=service,
        )
        if mapped is exc:
            raise
        raise mapped  # noqa: B904 - the mapped error carries its own (redacted) cause
