"""Circuit breakers whose state every process shares.

A breaker counts consecutive failures of calls to one service. ``threshold`` of them open the
circuit: calls then raise :class:`~flowstone_dagster.errors.CircuitOpen` at once, without calling
the service. ``timeout`` seconds after it opened, ONE caller is let through as a probe (the
circuit is *half-open*; every other caller, in any process, still gets ``CircuitOpen``). The
probe's success closes the circuit; its failure opens it again for another ``timeout``. A
success in the closed state resets the count::

    from flowstone_dagster.resilience import CircuitBreaker, with_circuit_breaker

    orders_api = CircuitBreaker("orders-api", threshold=5, timeout=30.0)
    rows = orders_api.call(fetch_orders, "2025-01-15")

    # or in one line (the breaker's state lives in the store, not the object)
    rows = with_circuit_breaker("orders-api", lambda: fetch_orders("2025-01-15"))

What counts (:func:`classify`, the one rule for every integration): a failure is any
``Exception`` except these. ``ConfigurationError``, ``CircuitOpen``, ``StoreUnavailable`` (the
resilience store failed, not the service) and every ``RateLimited`` (a local limiter's refusal,
or a server's 429: the service is up and asks to slow down, which the limiter and the retry's
``Retry-After`` handle) are *ignored*; an HTTP client error that is not retryable (400, 401,
403, 404, 422, ...) counts as a *success*, because the service answered. Anything else
(timeouts, connection errors, 5xx, 529, plain exceptions) is a failure. ``KeyboardInterrupt``
and other ``BaseException`` are ignored. A probe that ends ignored gives its lease back, so the
next caller probes at once.

The probe holds a lease of ``probe_lease`` seconds (default 60): if the prober crashes, the
next probe is allowed when the lease expires. ``timeout`` and ``threshold`` are read on every
call, so callers may pass different values for the same breaker name.

Transitions emit the telemetry event ``flowstone.circuit.transition`` (measures ``breaker``,
``from``, ``to``, ``failures``); refused calls emit ``flowstone.circuit.rejected`` (``breaker``,
``retry_in_s``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal, NamedTuple, ParamSpec, TypeVar

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CircuitOpen,
    ConfigurationError,
    RateLimited,
    StoreUnavailable,
    is_retryable,
    status_of,
)
from flowstone_dagster.resilience.stores import (
    CLOSED,
    CLOSED_RECORD,
    HALF_OPEN,
    OPEN,
    BreakerRecord,
    StateStore,
    open_store,
)

__all__ = [
    "DEFAULT_PROBE_LEASE",
    "DEFAULT_THRESHOLD",
    "DEFAULT_TIMEOUT",
    "BreakerStatus",
    "CircuitBreaker",
    "Outcome",
    "classify",
    "reset",
    "state",
    "with_circuit_breaker",
]

P = ParamSpec("P")
T = TypeVar("T")

DEFAULT_THRESHOLD = 5
DEFAULT_TIMEOUT = 30.0
DEFAULT_PROBE_LEASE = 60.0

Outcome = Literal["failure", "success", "ignore"]


def classify(exc: BaseException) -> Outcome:
    """How a breaker records a call that raised ``exc`` (see the module docs)."""
    if not isinstance(exc, Exception):
        return "ignore"
    if isinstance(exc, (ConfigurationError, CircuitOpen, StoreUnavailable, RateLimited)):
        return "ignore"
    if status_of(exc) == 429:  # an SDK's own rate-limit error
        return "ignore"
    status = status_of(exc)
    if status is not None and 400 <= status < 500 and not is_retryable(exc):
        return "success"
    return "failure"


@dataclass(frozen=True)
class BreakerStatus:
    """A breaker's state as :func:`state` reports it.

    ``state`` is ``"closed"``, ``"open"`` or ``"half_open"`` (a probe is running);
    ``retry_in`` the seconds until a probe may go (0 when closed, or open and due).
    """

    name: str
    state: str
    failures: int
    retry_in: float


class _Ticket(NamedTuple):
    clean: bool  # admitted while closed with no failures: a success may need no write
    probe_id: str | None


_CLEAN = _Ticket(True, None)
_DIRTY = _Ticket(False, None)
_Transition = tuple[str, str] | None


class CircuitBreaker:
    """A named circuit breaker over a shared :class:`StateStore`.

    ``store`` is a store or a store URL (default: :func:`~.stores.default_store_url`).
    ``clock`` (seconds, default the store's own clock) lets tests control time. ``classifier``
    replaces :func:`classify`.

    Use :meth:`call` (or the instance as a decorator); integrations that compose the breaker
    with other wrappers use :meth:`enter` and :meth:`exit`::

        ticket = breaker.enter()          # raises CircuitOpen when refused
        try:
            result = fn()
        except BaseException as exc:
            breaker.exit(ticket, exc)
            raise
        breaker.exit(ticket)
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int = DEFAULT_THRESHOLD,
        timeout: float = DEFAULT_TIMEOUT,
        store: StateStore | str | None = None,
        probe_lease: float = DEFAULT_PROBE_LEASE,
        classifier: Callable[[BaseException], Outcome] = classify,
        clock: Callable[[], float] | None = None,
    ) -> None:
        if not name:
            raise ConfigurationError("a circuit breaker needs a name", field="name")
        if threshold < 1:
            raise ConfigurationError(f"must be at least 1, got {threshold}", field="threshold")
        if timeout < 0:
            raise ConfigurationError(f"must not be negative, got {timeout}", field="timeout")
        if probe_lease <= 0:
            raise ConfigurationError(f"must be positive, got {probe_lease}", field="probe_lease")
        self.name = name
        self.threshold = threshold
        self.timeout = float(timeout)
        self.probe_lease = float(probe_lease)
        self.store: StateStore = (
            open_store(store) if store is None or isinstance(store, str) else store
        )
        self.classifier = classifier
        self.clock = clock

    def __repr__(self) -> str:
        return (
            f"CircuitBreaker({self.name!r}, threshold={self.threshold}, timeout={self.timeout}, "
            f"store={self.store!r})"
        )

    def _now(self) -> float | None:
        return None if self.clock is None else self.clock()

    # -- the protocol ------------------------------------------------------------------------

    def enter(self) -> _Ticket:
        """Admit a call or raise ``CircuitOpen``; pass the returned ticket to :meth:`exit`."""
        record = self.store.read_breaker(self.name)
        if record.state == CLOSED:
            return _CLEAN if record.failures == 0 else _DIRTY
        timeout, lease, probe_id = self.timeout, self.probe_lease, os.urandom(8).hex()

        def admit(
            current: BreakerRecord, now: float
        ) -> tuple[BreakerRecord, tuple[_Ticket | None, float, _Transition]]:
            if current.state == CLOSED:
                return current, (_CLEAN if current.failures == 0 else _DIRTY, 0.0, None)
            if current.state == OPEN:
                ready_at = current.opened_at + timeout
                if now < ready_at:
                    return current, (None, ready_at - now, None)
                probing = replace(
                    current, state=HALF_OPEN, probe_id=probe_id, probe_until=now + lease
                )
                return probing, (_Ticket(False, probe_id), 0.0, (OPEN, HALF_OPEN))
            if now < current.probe_until:  # half-open, another caller's probe is running
                # The true wait: the lease's end (sooner if the probe succeeds).
                return current, (None, current.probe_until - now, None)
            # The previous prober's lease expired (it crashed or hung): probe again.
            probing = replace(current, probe_id=probe_id, probe_until=now + lease)
            return probing, (_Ticket(False, probe_id), 0.0, None)

        ticket, retry_in, transition = self.store.update_breaker(self.name, admit, self._now())
        self._announce(transition, record.failures)
        if ticket is None:
            error = CircuitOpen(self.name, retry_in)
            telemetry.emit(
                "flowstone.circuit.rejected",
                error=error,
                breaker=self.name,
                retry_in_s=round(error.retry_in, 3),
            )
            raise error
        return ticket

    def exit(self, ticket: _Ticket, error: BaseException | None = None) -> None:
        """Record how the call admitted with ``ticket`` ended (``error`` when it raised)."""
        outcome: Outcome = "success" if error is None else self.classifier(error)
        if outcome == "success":
            if ticket.clean:
                # Admitted with no failures: a read (not a write) tells whether failures that
                # other calls recorded meanwhile need resetting, which a success always does.
                current = self.store.read_breaker(self.name)
                if current.state == CLOSED and current.failures == 0:
                    return
            self._update(ticket, _success(ticket.probe_id))
        elif outcome == "failure":
            self._update(ticket, _failure(ticket.probe_id, self.threshold))
        elif ticket.probe_id is not None:
            self._update(ticket, _release(ticket.probe_id))

    def _update(
        self,
        ticket: _Ticket,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, tuple[_Transition, int]]],
    ) -> None:
        transition, failures = self.store.update_breaker(self.name, update, self._now())
        self._announce(transition, failures)

    def _announce(self, transition: _Transition, failures: int) -> None:
        if transition is not None:
            measures: dict[str, Any] = {
                "breaker": self.name,
                "from": transition[0],
                "to": transition[1],
                "failures": failures,
            }
            telemetry.emit("flowstone.circuit.transition", outcome="ok", **measures)

    # -- conveniences --------------------------------------------------------------------------

    def call(self, fn: Callable[P, T], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """``fn(*args, **kwargs)`` through the breaker.

        Raises ``CircuitOpen`` without calling ``fn`` while the circuit is open; otherwise
        returns ``fn``'s result or re-raises its exception unchanged, after recording it.
        """
        ticket = self.enter()
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            self.exit(ticket, exc)
            raise
        self.exit(ticket)
        return result

    def __call__(self, fn: Callable[P, T]) -> Callable[P, T]:
        """Use the breaker as a decorator: ``@CircuitBreaker("orders-api")``."""

        def guarded(*args: P.args, **kwargs: P.kwargs) -> T:
            return self.call(fn, *args, **kwargs)

        guarded.__name__ = getattr(fn, "__name__", "guarded")
        guarded.__doc__ = fn.__doc__
        guarded.__wrapped__ = fn  # type: ignore[attr-defined]
        return guarded

    def status(self) -> BreakerStatus:
        """The breaker's current state (with ``retry_in`` computed from this ``timeout``)."""
        record = self.store.read_breaker(self.name)
        now = self.clock() if self.clock is not None else time.time()
        retry_in = 0.0
        if record.state == OPEN:
            retry_in = max(record.opened_at + self.timeout - now, 0.0)
        elif record.state == HALF_OPEN:
            retry_in = max(record.probe_until - now, 0.0)
        return BreakerStatus(self.name, record.state, record.failures, retry_in)

    def reset(self) -> None:
        """Close the circuit and forget its failures."""
        before = self.store.read_breaker(self.name)
        self.store.delete_breaker(self.name)
        if before.state != CLOSED:
            self._announce((before.state, CLOSED), 0)


def _success(
    probe_id: str | None,
) -> Callable[[BreakerRecord, float], tuple[BreakerRecord, tuple[_Transition, int]]]:
    def update(current: BreakerRecord, now: float) -> tuple[BreakerRecord, tuple[_Transition, int]]:
        if current.state == HALF_OPEN and probe_id is not None and current.probe_id == probe_id:
            return CLOSED_RECORD, ((HALF_OPEN, CLOSED), 0)
        if current.state == CLOSED and current.failures:
            return CLOSED_RECORD, (None, 0)
        # Open, or another caller's probe: a call admitted earlier proves nothing now.
        return current, (None, current.failures)

    return update


def _failure(
    probe_id: str | None, threshold: int
) -> Callable[[BreakerRecord, float], tuple[BreakerRecord, tuple[_Transition, int]]]:
    def update(current: BreakerRecord, now: float) -> tuple[BreakerRecord, tuple[_Transition, int]]:
        failures = current.failures + 1
        if current.state == CLOSED:
            if failures >= threshold:
                opened = BreakerRecord(OPEN, failures, now, None, 0.0)
                return opened, ((CLOSED, OPEN), failures)
            return replace(current, failures=failures), (None, failures)
        if current.state == HALF_OPEN and probe_id is not None and current.probe_id == probe_id:
            return BreakerRecord(OPEN, failures, now, None, 0.0), ((HALF_OPEN, OPEN), failures)
        return current, (None, current.failures)

    return update


def _release(
    probe_id: str,
) -> Callable[[BreakerRecord, float], tuple[BreakerRecord, tuple[_Transition, int]]]:
    def update(current: BreakerRecord, now: float) -> tuple[BreakerRecord, tuple[_Transition, int]]:
        if current.state == HALF_OPEN and current.probe_id == probe_id:
            # Back to open as it was: the next caller probes at once.
            released = replace(current, state=OPEN, probe_id=None, probe_until=0.0)
            return released, ((HALF_OPEN, OPEN), current.failures)
        return current, (None, current.failures)

    return update


def with_circuit_breaker(
    name: str,
    fn: Callable[[], T],
    *,
    threshold: int = DEFAULT_THRESHOLD,
    timeout: float = DEFAULT_TIMEOUT,
    store: StateStore | str | None = None,
    probe_lease: float = DEFAULT_PROBE_LEASE,
) -> T:
    """Call ``fn()`` through the breaker ``name``.

    ::

        result = with_circuit_breaker("payments", lambda: client.charge(order), threshold=3)

    Raises ``CircuitOpen`` (with ``retry_in``) without calling ``fn`` while the circuit is open.
    """
    breaker = CircuitBreaker(
        name, threshold=threshold, timeout=timeout, store=store, probe_lease=probe_lease
    )
    return breaker.call(fn)


def state(
    name: str, *, store: StateStore | str | None = None, timeout: float = DEFAULT_TIMEOUT
) -> BreakerStatus:
    """The state of the breaker ``name``: ``state("orders-api").state == "open"``."""
    return CircuitBreaker(name, timeout=timeout, store=store).status()


def reset(name: str, *, store: StateStore | str | None = None) -> None:
    """Close the breaker ``name`` and forget its failures (an operator's override)."""
    CircuitBreaker(name, store=store).reset()
