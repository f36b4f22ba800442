"""The in-process store: for tests and the in-process executor."""

from __future__ import annotations

import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from typing import TypeVar

from flowstone_dagster.resilience.stores.base import (
    CLOSED_RECORD,
    EPSILON,
    BreakerRecord,
    Lease,
    Reservation,
    longest_wait,
    wait_until_fits,
    window_keys,
)

__all__ = ["MemoryStore"]

T = TypeVar("T")


class _Log:
    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, float]] = deque()
        self.used = 0.0


class MemoryStore:
    """State in this process's memory, guarded by a lock: for tests and the in-process executor.

    ``open_store("memory://name")`` returns the same store for the same name within a process.
    """

    local_clock = True  # the store's times (this machine's time.time())

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._breakers: dict[str, BreakerRecord] = {}
        self._logs: dict[str, _Log] = {}
        self._leases: dict[str, dict[str, float]] = {}

    def __repr__(self) -> str:
        return f"MemoryStore({self.url!r})"

    def read_breaker(self, name: str) -> BreakerRecord:
        return self._breakers.get(name, CLOSED_RECORD)

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        with self._lock:
            current = self._breakers.get(name, CLOSED_RECORD)
            record, result = update(current, time.time() if now is None else now)
            if record != current:
                self._breakers[name] = record
            return result

    def delete_breaker(self, name: str) -> None:
        with self._lock:
            self._breakers.pop(name, None)

    def _pruned(self, name: str, period: float, now: float) -> _Log:
        log = self._logs.get(name)
        if log is None:
            log = self._logs[name] = _Log()
        entries = log.entries
        horizon = now - period
        while entries and entries[0][0] <= horizon:
            log.used -= entries.popleft()[1]
        if not entries:
            log.used = 0.0  # no float drift across an idle period
        return log

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        # The hot path: the lock is held for the decision only (no object is built under it),
        # because with many threads a longer hold turns into a convoy on the lock.
        with self._lock:
            at = time.time() if now is None else now
            log = self._logs.get(name) or self._pruned(name, period, at)
            entries = log.entries
            if entries and entries[0][0] <= at - period:
                log = self._pruned(name, period, at)
            admitted = log.used + cost <= limit + EPSILON
            if admitted:
                entries.append((at, cost))
                log.used += cost
            else:
                wait = wait_until_fits(
                    entries, used=log.used, cost=cost, limit=limit, period=period, now=at
                )
        return Reservation(True, at, 0.0) if admitted else Reservation(False, at, wait)

    def reserve_all(
        self,
        name: str,
        cost: float,
        windows: Sequence[tuple[float, float]],
        now: float | None = None,
    ) -> Reservation:
        with self._lock:
            at = time.time() if now is None else now
            keyed = window_keys(name, windows)
            logs = {key: self._pruned(key, period, at) for key, _, period in keyed}

            def wait_of(key: str, used: float, limit: float, period: float) -> float:
                entries = logs[key].entries
                return wait_until_fits(
                    entries, used=used, cost=cost, limit=limit, period=period, now=at
                )

            wait = longest_wait(keyed, [log.used for log in logs.values()], cost, wait_of)
            if wait > 0:
                return Reservation(False, at, wait)
            for log in logs.values():
                log.entries.append((at, cost))
                log.used += cost
            return Reservation(True, at, 0.0)

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        with self._lock:
            return self._pruned(name, period, time.time() if now is None else now).used

    def delete_limiter(self, name: str) -> None:
        with self._lock:
            self._logs.pop(name, None)

    def _live_leases(self, name: str, at: float) -> dict[str, float]:
        leases = self._leases.setdefault(name, {})
        for lease_id in [key for key, until in leases.items() if until <= at]:
            del leases[lease_id]
        return leases

    def acquire_lease(
        self, name: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> Lease:
        with self._lock:
            at = time.time() if now is None else now
            leases = self._live_leases(name, at)
            if len(leases) < limit:
                lease_id = uuid.uuid4().hex
                leases[lease_id] = at + lease_seconds
                return Lease(lease_id, at, 0.0)
            return Lease(None, at, max(min(leases.values()) - at, 0.0))

    def release_lease(self, name: str, lease_id: str) -> None:
        with self._lock:
            self._leases.get(name, {}).pop(lease_id, None)

    def active_leases(self, name: str, now: float | None = None) -> int:
        with self._lock:
            return len(self._live_leases(name, time.time() if now is None else now))

    def close(self) -> None:
        """Nothing to close."""
