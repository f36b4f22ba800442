"""Retries with exponential backoff, built on the ``backoff`` library.

::

    from flowstone_dagster.resilience import with_retry

    rows = with_retry(lambda: client.load("2025-01-15"), max_attempts=5, base_delay=0.5)

- Only failures that :func:`~flowstone_dagster.errors.is_retryable` accepts are retried (or
  those ``retry_on`` names: exception types, or a predicate). Any other exception propagates at
  once, unchanged (the same object).
- The wait before attempt ``n + 1`` is ``min(base_delay * 2**(n-1), max_delay)`` plus a jitter
  that only ever *adds* (up to ``jitter`` times the exponential delay, still capped at
  ``max_delay``): with ``base_delay=0.1`` and 3 attempts the waits are at least 0.1 s and 0.2 s.
  :func:`backoff_delays` returns the schedule.
- A failure that asks for a wait (a rate limit's ``retry_after``, see
  :func:`~flowstone_dagster.errors.retry_after_of`) is never retried sooner. When it asks for
  more than ``max_delay``, retrying stops: waiting that long inside a call is the job of the
  caller (inside Dagster: a step retry, see :func:`~.resource.to_dagster_error`).
- ``deadline`` (seconds) bounds the whole call: retrying stops when the next wait would end
  after it.
- When retrying stops, :class:`~flowstone_dagster.errors.MaxAttemptsExceeded` is raised with
  the attempts made and the last error (also its ``__cause__``).

The loop is ours (so that ``clock`` and ``sleep`` can be injected); the schedule is
``backoff.expo``'s.

Telemetry: each wait emits ``flowstone.retry`` (outcome ``error``, the failure's type,
``attempts`` = the attempt that failed, measures ``call``, ``wait_s``); giving up after a
retryable failure emits ``flowstone.retry.exhausted`` (``call``, ``reason``: ``max_attempts``,
``deadline`` or ``retry_after``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from itertools import islice
from typing import TypeVar

import backoff

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
    MaxAttemptsExceeded,
    is_retryable,
    retry_after_of,
)

__all__ = [
    "DEFAULT_BASE_DELAY",
    "DEFAULT_JITTER",
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_MAX_DELAY",
    "RetryOn",
    "backoff_delays",
    "with_retry",
]

T = TypeVar("T")

DEFAULT_MAX_ATTEMPTS = 3
DEFAULT_BASE_DELAY = 0.5
DEFAULT_MAX_DELAY = 30.0
DEFAULT_JITTER = 1.0

RetryOn = (
    Callable[[BaseException], bool] | type[BaseException] | tuple[type[BaseException], ...] | None
)

_random = random.Random()  # noqa: S311 - jitter, not cryptography


def _exponential(base_delay: float, max_delay: float) -> Iterator[float]:
    """``min(base_delay * 2**n, max_delay)`` for n = 0, 1, 2, ... (``backoff.expo``)."""
    schedule = backoff.expo(base=2, factor=base_delay, max_value=max_delay)
    next(schedule)  # backoff's generators are primed with one empty step
    return schedule


def _jittered(delay: float, max_delay: float, jitter: float, rng: random.Random) -> float:
    if jitter <= 0 or delay <= 0:
        return delay
    return min(delay + rng.uniform(0.0, jitter * delay), max(max_delay, delay))


def _validate(max_attempts: int, base_delay: float, max_delay: float, jitter: float) -> None:
    if max_attempts < 1:
        raise ConfigurationError(f"must be at least 1, got {max_attempts}", field="max_attempts")
    if base_delay < 0:
        raise ConfigurationError(f"must not be negative, got {base_delay}", field="base_delay")
    if max_delay < base_delay:
        raise ConfigurationError(
            f"must be at least base_delay ({base_delay}), got {max_delay}", field="max_delay"
        )
    if jitter < 0:
        raise ConfigurationError(f"must not be negative, got {jitter}", field="jitter")


def backoff_delays(
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    base_delay: float = DEFAULT_BASE_DELAY,
    max_delay: float = DEFAULT_MAX_DELAY,
    jitter: float = 0.0,
    rng: random.Random | None = None,
) -> list[float]:
    """The waits between ``max_attempts`` attempts (one fewer than the attempts).

    ::

        >>> backoff_delays(5, base_delay=0.1, max_delay=0.5)
        [0.1, 0.2, 0.4, 0.5]

    Without jitter the schedule is non-decreasing; with it each wait lies between the
    exponential delay and ``max_delay``. This is the schedule :func:`with_retry` sleeps.
    """
    _validate(max_attempts, base_delay, max_delay, jitter)
    rng = rng or _random
    exponential = _exponential(base_delay, max_delay)
    return [
        _jittered(delay, max_delay, jitter, rng) for delay in islice(exponential, max_attempts - 1)
    ]


def _predicate(retry_on: RetryOn) -> Callable[[BaseException], bool]:
    if retry_on is None:
        return is_retryable
    if isinstance(retry_on, tuple) or (
        isinstance(retry_on, type) and issubclass(retry_on, BaseException)
    ):
        types = retry_on
        return lambda exc: isinstance(exc, types)
    if callable(retry_on):
        return retry_on  # type: ignore[return-value]
    raise ConfigurationError(
        f"must be exception types or a predicate, got {retry_on!r}", field="retry_on"
    )


def with_retry(
    fn: Callable[[], T],
    *,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    base_delay: float = DEFAULT_BASE_DELAY,
    max_delay: float = DEFAULT_MAX_DELAY,
    retry_on: RetryOn = None,
    deadline: float | None = None,
    jitter: float = DEFAULT_JITTER,
    name: str | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
) -> T:
    """Call ``fn()`` until it succeeds, retrying transient failures with backoff.

    ::

        with_retry(lambda: api.get("/orders"), max_attempts=5, base_delay=0.2, deadline=30)
        with_retry(flaky, retry_on=(TimeoutError, ConnectionError))
        with_retry(flaky, retry_on=lambda exc: getattr(exc, "status", 0) == 503)

    ``name`` labels the telemetry (default: ``fn``'s qualified name). ``clock`` (monotonic
    seconds), ``sleep`` and ``rng`` (the jitter's random source) are injectable, so that tests
    control time. See the module docs for the rules; raises ``MaxAttemptsExceeded`` from the
    last error when retrying stops, and any error that is not retried unchanged.

    ``deadline`` bounds when a new attempt may start (no wait may end after it); it never
    interrupts a running attempt: bounding one attempt is the job of a timeout.
    """
    _validate(max_attempts, base_delay, max_delay, jitter)
    if deadline is not None and deadline <= 0:
        raise ConfigurationError(f"must be positive, got {deadline}", field="deadline")
    return retry_loop(
        fn,
        should_retry=_predicate(retry_on),
        max_attempts=max_attempts,
        base_delay=base_delay,
        max_delay=max_delay,
        deadline=deadline,
        jitter=jitter,
        label=name or getattr(fn, "__qualname__", None) or type(fn).__name__,
        clock=clock,
        sleep=sleep,
        rng=rng or _random,
    )


def retry_loop(
    fn: Callable[[], T],
    *,
    should_retry: Callable[[BaseException], bool],
    max_attempts: int,
    base_delay: float,
    max_delay: float,
    deadline: float | None,
    jitter: float,
    label: str,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random = _random,
) -> T:
    """:func:`with_retry` without its argument checks, for callers whose settings were
    validated once (``ResilienceResource`` policies)."""
    started = clock()
    exponential = _exponential(base_delay, max_delay)
    attempt = 0
    while True:
        attempt += 1
        try:
            return fn()
        except Exception as error:
            if not should_retry(error):
                raise
            reason = None
            delay = 0.0
            if attempt >= max_attempts:
                reason = "max_attempts"
            else:
                delay = _jittered(next(exponential), max_delay, jitter, rng)
                asked = retry_after_of(error)
                if asked is not None:
                    if asked > max(max_delay, delay):
                        reason = "retry_after"
                    delay = max(delay, asked)
                if reason is None and deadline is not None and clock() - started + delay > deadline:
                    reason = "deadline"
            if reason is not None:
                telemetry.emit(
                    "flowstone.retry.exhausted",
                    error=error,
                    attempts=attempt,
                    call=label,
                    reason=reason,
                    duration_s=clock() - started,
                )
                raise MaxAttemptsExceeded(attempt, error) from error
            telemetry.emit(
                "flowstone.retry",
                error=error,
                attempts=attempt,
                call=label,
                wait_s=round(delay, 4),
            )
            sleep(delay)
