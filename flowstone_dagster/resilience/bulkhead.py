"""Bulkheads: at most N calls to a service at once, across every process sharing the store.

A :class:`Bulkhead` hands out ``max_concurrent`` slots. Each slot is a lease in the store
that the holder gives back when its call ends; a lease also expires ``lease_seconds`` after it
was taken, so that a worker killed mid-call (``kill -9``, an OOM, a lost machine) frees its
slot then. Set ``lease_seconds`` above the longest call: a call that outlives its lease no
longer counts, and one more call may start::

    from flowstone_dagster.resilience import Bulkhead

    warehouse = Bulkhead("warehouse", max_concurrent=4, lease_seconds=600)
    with warehouse.hold():                      # waits up to max_wait for a slot
        run_query()

A caller that finds every slot taken polls the store (5 ms, doubling to 100 ms) until one
frees or ``max_wait`` passes; then it raises :class:`BulkheadFull`, a
:class:`~flowstone_dagster.errors.RateLimited`: retryable, honoured by the retries, and
ignored by circuit breakers (the service was not called). There is no FIFO across processes.

Telemetry: ``flowstone.bulkhead.wait`` when a caller waited for its slot (``bulkhead``,
``wait_s``), ``flowstone.bulkhead.rejected`` when it gave up (``bulkhead``, ``waited_s``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import NoReturn

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, RateLimited
from flowstone_dagster.resilience.stores import Lease, StateStore, open_store

__all__ = ["DEFAULT_LEASE_SECONDS", "Bulkhead", "BulkheadFull"]

#: How long a slot is held at most when nothing says otherwise (a killed holder's slot frees
#: after this long).
DEFAULT_LEASE_SECONDS = 300.0
DEFAULT_MAX_WAIT = 30.0
_FIRST_POLL = 0.005
_LAST_POLL = 0.1


class BulkheadFull(RateLimited):
    """Every slot of a :class:`Bulkhead` stayed taken for the whole wait.

    A :class:`~flowstone_dagster.errors.RateLimited`: retryable, with ``retry_after`` (how long
    the caller already waited, at least 1 s) as the suggested wait; circuit breakers ignore it.
    """

    def __init__(self, name: str, *, max_concurrent: int, waited: float) -> None:
        super().__init__(
            f"bulkhead {name!r}: all {max_concurrent} slots stayed taken for {waited:.3f} s",
            retry_after=max(waited, 1.0),
            service=None,
        )
        self.bulkhead = name
        self.max_concurrent = max_concurrent
        self.waited = waited


class Bulkhead:
    """At most ``max_concurrent`` holders of ``name`` at once, shared through ``store``."""

    def __init__(
        self,
        name: str,
        max_concurrent: int,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        max_wait: float = DEFAULT_MAX_WAIT,
        store: StateStore | str | None = None,
        clock: Callable[[], float] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if not name:
            raise ConfigurationError("a bulkhead needs a name", field="name")
        if int(max_concurrent) != max_concurrent or max_concurrent < 1:
            raise ConfigurationError(
                f"must be a positive integer, got {max_concurrent}", field="max_concurrent"
            )
        if not lease_seconds > 0:
            raise ConfigurationError(
                f"must be positive, got {lease_seconds}", field="lease_seconds"
            )
        if max_wait < 0:
            raise ConfigurationError(f"must not be negative, got {max_wait}", field="max_wait")
        self.name = name
        self.max_concurrent = int(max_concurrent)
        self.lease_seconds = float(lease_seconds)
        self.max_wait = float(max_wait)
        self.store: StateStore = (
            open_store(store) if store is None or isinstance(store, str) else store
        )
        self.clock = clock
        self.sleep = sleep

    def __repr__(self) -> str:
        return (
            f"Bulkhead({self.name!r}, max_concurrent={self.max_concurrent}, "
            f"lease_seconds={self.lease_seconds:g}, store={self.store!r})"
        )

    def try_acquire(self) -> Lease:
        """One atomic attempt: a slot now, or refused with a wait hint."""
        now = None if self.clock is None else self.clock()
        return self.store.acquire_lease(self.name, self.max_concurrent, self.lease_seconds, now)

    def acquire(self, *, max_wait: float | None = None) -> str:
        """Take a slot, waiting up to ``max_wait`` (the bulkhead's, or the lower one given);
        returns the lease id to :meth:`release`. Raises :class:`BulkheadFull`."""
        lease = self.try_acquire()
        if lease.lease_id is not None:
            return lease.lease_id
        clock = self.clock or time.monotonic
        started = clock()
        limit = self.max_wait if max_wait is None else min(self.max_wait, max_wait)
        poll = _FIRST_POLL
        while True:
            waited = clock() - started
            if waited >= limit:
                self._refuse(waited)
            self.sleep(min(poll, lease.wait + 1e-3, limit - waited))
            poll = min(poll * 2, _LAST_POLL)
            lease = self.try_acquire()
            if lease.lease_id is not None:
                telemetry.emit(
                    "flowstone.bulkhead.wait",
                    outcome="ok",
                    bulkhead=self.name,
                    wait_s=round(clock() - started, 4),
                )
                return lease.lease_id

    def _refuse(self, waited: float) -> NoReturn:
        error = BulkheadFull(self.name, max_concurrent=self.max_concurrent, waited=waited)
        telemetry.emit(
            "flowstone.bulkhead.rejected",
            error=error,
            bulkhead=self.name,
            waited_s=round(waited, 4),
        )
        raise error

    def release(self, lease_id: str) -> None:
        """Give the slot back."""
        self.store.release_lease(self.name, lease_id)

    def active(self) -> int:
        """Slots held now."""
        now = None if self.clock is None else self.clock()
        return self.store.active_leases(self.name, now)

    @contextmanager
    def hold(self, *, max_wait: float | None = None) -> Iterator[str]:
        """Hold a slot for the block (given back on any exit); yields the lease id."""
        lease_id = self.acquire(max_wait=max_wait)
        try:
            yield lease_id
        finally:
            self.release(lease_id)
