"""One guarded call of :meth:`ResilienceResource.call`: retries around the breaker, the
rate limits, the bulkhead slot and the attempt's timeout, and what happens when the store
fails (``on_store_error``)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    StoreUnavailable,
    is_retryable,
)
from flowstone_dagster.resilience.admission import Admission, admitted
from flowstone_dagster.resilience.breaker import CircuitBreaker
from flowstone_dagster.resilience.bulkhead import Bulkhead
from flowstone_dagster.resilience.config import RateLimitConfig, ServicePolicy
from flowstone_dagster.resilience.retry import retry_loop
from flowstone_dagster.resilience.stores import (
    DEFAULT_STORE_TIMEOUT,
)
from flowstone_dagster.resilience.timeouts import Deadline, deadline_scope, with_timeout

if TYPE_CHECKING:
    from flowstone_dagster.resilience.resource import ResilienceResource

__all__ = ["LOCAL_FALLBACK_STORE_URL", "RESOLVED_STORE_URL", "STORE_RECHECK_AFTER"]

T = TypeVar("T")

logger = logging.getLogger("flowstone_dagster.resilience.resource")

#: The in-process store a policy with ``on_store_error="local"`` falls back to.
LOCAL_FALLBACK_STORE_URL = "memory://flowstone-local-fallback"
#: The in-process store of the resources :func:`resolve` makes for integrations configured
#: without a resilience resource (kept apart from the fallback's state).
RESOLVED_STORE_URL = "memory://flowstone-integration-defaults"

#: After a store failure, a policy with ``on_store_error="local"`` stays on local state this
#: many seconds before it tries the store again (a hung store would otherwise cost every call
#: its full store timeout).
STORE_RECHECK_AFTER = 5.0

_degraded_warned: set[str] = set()
_degraded_lock = threading.Lock()
_store_down_until: dict[str, float] = {}


def _warn_degraded_once(store: str, error: StoreUnavailable, service: str) -> None:
    """One WARNING (log line and ``flowstone.store.degraded`` event) per store per process."""
    with _degraded_lock:
        first = store not in _degraded_warned
        _degraded_warned.add(store)
    if first:
        logger.warning(
            "resilience store %s is unavailable (%s); service %r goes on with this process's "
            "own breaker and limiter state (on_store_error='local') until it is back",
            error.store,
            error.reason,
            service,
        )
        telemetry.emit(
            "flowstone.store.degraded", error=error, service=service, operation=error.operation
        )


class _GuardedCall:
    """One ``ResilienceResource.call`` with a breaker, limits, retries or a timeout."""

    def __init__(
        self,
        resource: ResilienceResource,
        service: str,
        *,
        policy: ServicePolicy,
        to_dagster: bool,
        cost: float,
        limits: Sequence[tuple[str, RateLimitConfig, float]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.resource = resource
        self.service = service
        self.policy = policy
        self.cost = cost
        self.limits = limits
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.attempts = 0
        self.degraded = False
        retry = policy.retry
        private = _private(resource)
        self.clock: Callable[[], float] = private["_clock"]
        self.sleep: Callable[[float], None] = private["_sleep"]
        # With Dagster errors on, a wait of retry_requested_after or more is not slept inside
        # the call (by the limiter or between attempts): it ends the call and becomes a step
        # retry (RetryRequested), which frees the step's process meanwhile.
        self.long_wait = resource.retry_requested_after if to_dagster else None
        self.max_delay = retry.max_delay
        if self.long_wait is not None:
            self.max_delay = max(min(self.max_delay, self.long_wait), retry.base_delay)
        self.deadline: Deadline | None = None

    def run(self) -> Any:
        retry = self.policy.retry
        clock = self.clock
        self.deadline = Deadline(retry.deadline, clock=clock) if retry.deadline else None
        return retry_loop(
            self.attempt,
            max_attempts=retry.max_attempts,
            base_delay=retry.base_delay,
            max_delay=self.max_delay,
            deadline=retry.deadline,
            jitter=retry.jitter,
            label=self.service,
            # A store outage ends the call at once: it is retried at step level, never in a
            # tight loop against a store that is down.
            should_retry=_retryable_in_call,
            clock=clock,
            sleep=self.sleep,
        )

    def _wait_budget(self) -> float | None:
        """How long limiter waits may last now (the retry deadline's remaining time)."""
        budget = self.long_wait
        if self.deadline is not None:
            remaining = self.deadline.remaining()
            budget = remaining if budget is None else min(budget, remaining)
        return budget

    def _degrade(self, error: StoreUnavailable) -> None:
        self.degraded = True
        url = self.resource.resolved_store_url()
        if error is not _RECENTLY_DOWN:
            _store_down_until[url] = time.monotonic() + STORE_RECHECK_AFTER
        _warn_degraded_once(url, error, self.service)

    def _admit(
        self, local: bool
    ) -> tuple[CircuitBreaker | None, Any, _Slot | None, Admission | None]:
        """Pass the breaker, take a bulkhead slot, then the limits (every wait bounded by the
        retry deadline): the limits last, so that a wait for a slot never stands between a
        rate admission and the call (see :mod:`.admission`)."""
        resource = self.resource
        breaker, limiter = resource._guards(self.service, local)
        bulkhead = resource._bulkhead(self.service, local)
        admission: Admission | None = None
        with _store_bound(self.deadline):
            ticket = breaker.enter() if breaker is not None else None
            slot = None
            try:
                if bulkhead is not None:
                    budget = self._wait_budget()
                    slot = _Slot(bulkhead, bulkhead.acquire(max_wait=budget))
                takes = [(limiter, self.cost)] if limiter is not None else []
                takes += [
                    (resource._extra_limiter(name, config, local), units)
                    for name, config, units in self.limits
                ]
                if takes:
                    admission = Admission(self._wait_budget)
                    for taken, units in takes:
                        admission.take(taken, units)
            except BaseException as exc:
                if slot is not None:
                    self._after(_release_slot, slot)
                if breaker is not None and ticket is not None:
                    # The service was not called: give a probe lease back, count nothing.
                    _record_outcome(breaker, ticket, exc)
                raise
        return breaker, ticket, slot, admission

    def attempt(self) -> Any:
        self.attempts += 1
        local = self.degraded
        if not local and self.policy.on_store_error == "local" and _store_down_until:
            until = _store_down_until.get(self.resource.resolved_store_url())
            if until is not None and time.monotonic() < until:
                self._degrade(_RECENTLY_DOWN)
                local = True
        try:
            breaker, ticket, slot, admission = self._admit(local)
        except StoreUnavailable as error:
            if self.policy.on_store_error != "local" or local:
                raise
            self._degrade(error)
            breaker, ticket, slot, admission = self._admit(True)
        try:
            with admitted(admission):
                # Only the policy's timeout (and any deadline the caller set) bounds it.
                if self.policy.timeout is None:
                    result = self.fn(*self.args, **self.kwargs)
                else:
                    with deadline_scope(self.policy.timeout) as deadline:
                        if self.policy.enforce_timeout and deadline is not None:
                            result = with_timeout(
                                self.fn, deadline.remaining(), *self.args, **self.kwargs
                            )
                        else:
                            result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            if slot is not None:
                self._after(_release_slot, slot)
            if breaker is not None and ticket is not None:
                self._record(breaker, ticket, exc)
            raise
        if slot is not None:
            self._after(_release_slot, slot)
        if breaker is not None and ticket is not None:
            self._record(breaker, ticket, None)
        return result

    def _record(self, breaker: CircuitBreaker, ticket: Any, error: BaseException | None) -> None:
        self._after(_record_outcome, breaker, ticket, error)

    def _after(self, write: Callable[..., None], *args: Any) -> None:
        # What an attempt writes after it ran (its outcome, its slot given back) gets the retry
        # deadline's remaining time, but at least RECORD_GRACE: the attempt may legitimately
        # have outlived the deadline.
        if self.deadline is None or self.deadline.remaining() >= DEFAULT_STORE_TIMEOUT:
            write(*args)  # the store's own bound is the lower
            return
        with deadline_scope(max(self.deadline.remaining(), RECORD_GRACE)):
            write(*args)


#: Seconds a breaker may wait on the store to record a call's outcome after the retry deadline
#: passed (the attempt itself may run longer than the deadline).
RECORD_GRACE = 1.0


_NO_SCOPE = contextlib.nullcontext()


def _store_bound(deadline: Deadline | None) -> contextlib.AbstractContextManager[Any]:
    """Publish ``deadline`` to the store operations of the block, when it lowers their own
    bound (:data:`DEFAULT_STORE_TIMEOUT`): most calls need no scope at all."""
    if deadline is None or deadline.remaining() >= DEFAULT_STORE_TIMEOUT:
        return _NO_SCOPE
    return deadline_scope(deadline)


def _private(resource: ResilienceResource) -> dict[str, Any]:
    """The resource's private attributes: ``resource._clock`` goes through pydantic's
    ``__getattr__`` (about 1 us a read, measured), the dict does not."""
    return resource.__pydantic_private__  # type: ignore[return-value]


class _Slot(NamedTuple):
    bulkhead: Bulkhead
    lease_id: str


def _release_slot(slot: _Slot) -> None:
    # Like recording an outcome: a store failure must not hide the call's result or error; the
    # lease then expires on its own.
    try:
        slot.bulkhead.release(slot.lease_id)
    except Exception as store_error:
        logger.warning(
            "bulkhead %r could not give its slot back (it frees when its lease expires): %s",
            slot.bulkhead.name,
            store_error,
        )
        telemetry.emit(
            "flowstone.bulkhead.store_error", error=store_error, bulkhead=slot.bulkhead.name
        )


def _record_outcome(breaker: CircuitBreaker, ticket: Any, error: BaseException | None) -> None:
    # The store failing must neither hide the call's own error nor lose its result: log it
    # and carry on.
    try:
        breaker.exit(ticket, error)
    except Exception as store_error:
        logger.warning("circuit breaker %r could not record a call: %s", breaker.name, store_error)
        telemetry.emit("flowstone.circuit.store_error", error=store_error, breaker=breaker.name)


_RECENTLY_DOWN = StoreUnavailable(
    "(this process's view)", "skipped", f"failed less than {STORE_RECHECK_AFTER:g} s ago"
)


def _retryable_in_call(exc: BaseException) -> bool:
    return is_retryable(exc) and not isinstance(exc, StoreUnavailable)
