"""What every store shares: the records, the protocol, the bounds on waiting, and how a store
failure becomes :class:`~flowstone_dagster.errors.StoreUnavailable`."""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from flowstone_dagster.errors import StoreUnavailable, truncate
from flowstone_dagster.redaction import redact_text, redact_url
from flowstone_dagster.resilience.timeouts import current_deadline

__all__ = [
    "CLOSED",
    "CLOSED_RECORD",
    "DEFAULT_STORE_TIMEOUT",
    "HALF_OPEN",
    "OPEN",
    "READ_BREAKER",
    "BreakerRecord",
    "Lease",
    "Reservation",
    "StateStore",
    "operation_milliseconds",
    "operation_timeout",
    "unavailable",
    "longest_wait",
    "wait_until_fits",
    "window_key",
    "window_keys",
]

T = TypeVar("T")

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

#: Longest wait of one store operation (a lock, a busy file, a slow server) when the call has
#: no deadline; with one, its remaining time bounds the wait instead, if shorter.
DEFAULT_STORE_TIMEOUT = 10.0
#: The least time a store operation gets, even when the deadline has just passed: enough for
#: an uncontended update, never a real wait.
MIN_STORE_TIMEOUT = 0.05

#: Tolerance for sums of float costs, and the margin added to computed waits so that a caller
#: that sleeps exactly that long finds the capacity free.
EPSILON = 1e-9
WAIT_MARGIN = 1e-4


def operation_timeout() -> float:
    """Seconds the current store operation may wait: the call's remaining deadline (see
    :func:`~flowstone_dagster.resilience.deadline_scope`), at most
    :data:`DEFAULT_STORE_TIMEOUT`."""
    deadline = current_deadline()
    if deadline is None:
        return DEFAULT_STORE_TIMEOUT
    return max(min(DEFAULT_STORE_TIMEOUT, deadline.remaining()), MIN_STORE_TIMEOUT)


def operation_milliseconds() -> int:
    """:func:`operation_timeout` in milliseconds, in whole tenths of a second above 1 s (never
    above it): a deadline's remaining time changes on every call, and telling the store a new
    bound each time would cost more than the operation (see :meth:`PerThread.bound_is`)."""
    seconds = operation_timeout()
    return int(seconds * 10) * 100 if seconds >= 1 else max(1, int(seconds * 1000))


def unavailable(url: str, operation: str, exc: BaseException) -> StoreUnavailable:
    """The taxonomy error for a store failure (URL and message redacted)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    reason = truncate(redact_text(f"{type(exc).__name__}: {text}" if text else type(exc).__name__))
    return StoreUnavailable(redact_url(url), operation, reason)


@dataclass(frozen=True, slots=True)
class BreakerRecord:
    """A circuit breaker's shared state.

    ``failures`` counts consecutive failures; ``opened_at`` is the store time the circuit last
    opened; while ``state`` is ``"half_open"`` one probe holds the lease ``probe_id`` until
    ``probe_until`` (after which another caller may probe: a crashed prober cannot wedge it).
    """

    state: str = CLOSED
    failures: int = 0
    opened_at: float = 0.0
    probe_id: str | None = None
    probe_until: float = 0.0


#: The record of a breaker that has never been written.
CLOSED_RECORD = BreakerRecord()


#: A breaker's row, read the same way by the SQL stores (``?`` placeholders; PostgreSQL's
#: store swaps them for ``%s``).
READ_BREAKER = (
    "SELECT state, failures, opened_at, probe_id, probe_until FROM flowstone_breakers "
    "WHERE name = ?"
)


def record_of(row: Any) -> BreakerRecord:
    """A breaker record from a ``(state, failures, opened_at, probe_id, probe_until)`` row."""
    if row is None:
        return CLOSED_RECORD
    return BreakerRecord(row[0], int(row[1]), float(row[2]), row[3], float(row[4]))


@dataclass(frozen=True, slots=True)
class Reservation:
    """A limiter's answer: ``admitted`` at store time ``at``, or not before ``wait`` seconds."""

    admitted: bool
    at: float
    wait: float


@dataclass(frozen=True, slots=True)
class Lease:
    """A bulkhead's answer: a slot held as ``lease_id`` (from store time ``at`` until it is
    released or its lease expires), or refused (``lease_id`` is ``None``) with ``wait``, the
    seconds until the oldest lease expires at the latest (a release frees a slot sooner)."""

    lease_id: str | None
    at: float
    wait: float

    @property
    def granted(self) -> bool:
        return self.lease_id is not None


def window_key(name: str, limit: float, period: float) -> str:
    """The log name of one window of a limiter with several rates."""
    return f"{name}@{limit:g}/{period:g}s"


class StateStore(Protocol):
    """Where breakers and limiters keep their state; see the package docs for the guarantees.

    Times are seconds since the epoch on the store's clock; a caller may pass ``now`` to use
    its own clock instead (the property tests do, to control time). Every operation is bounded
    by :func:`operation_timeout`; every failure of the store itself raises
    :class:`~flowstone_dagster.errors.StoreUnavailable`.
    """

    url: str
    #: Whether the store's times are this machine's ``time.time()`` (an in-process or
    #: SQLite store), so that an admission's store time says exactly when it happened here.
    local_clock: bool

    def read_breaker(self, name: str) -> BreakerRecord:
        """The breaker's current record (a closed one when it was never written)."""
        ...

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        """Atomically replace the record with ``update(record, now)[0]``; return ``[1]``.

        ``update`` runs while the breaker is locked against every other process; it must be a
        quick, pure function.
        """
        ...

    def delete_breaker(self, name: str) -> None:
        """Forget the breaker (it is closed with no failures afterwards)."""
        ...

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        """Atomically admit ``cost`` units now if the last ``period`` seconds hold at most
        ``limit - cost``; otherwise say how long until they would."""
        ...

    def reserve_all(
        self,
        name: str,
        cost: float,
        windows: Sequence[tuple[float, float]],
        now: float | None = None,
    ) -> Reservation:
        """:meth:`reserve` in every ``(limit, period)`` window at once (logs named by
        :func:`window_key`): admitted in all, or in none with the longest wait."""
        ...

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        """Units admitted in the last ``period`` seconds."""
        ...

    def delete_limiter(self, name: str) -> None:
        """Forget every reservation of the limiter."""
        ...

    def acquire_lease(
        self, name: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> Lease:
        """Atomically take one of ``limit`` slots of bulkhead ``name`` for at most
        ``lease_seconds`` (expired leases are dropped first, so a killed holder's slot frees
        when its lease runs out); refused with a wait hint when all are held."""
        ...

    def release_lease(self, name: str, lease_id: str) -> None:
        """Give the slot back (nothing happens when the lease already expired)."""
        ...

    def active_leases(self, name: str, now: float | None = None) -> int:
        """Slots of bulkhead ``name`` held now (leases not expired)."""
        ...

    def close(self) -> None:
        """Close the connections this process holds (the store is reopened on next use)."""
        ...


def wait_until_fits(
    rows: Iterable[tuple[float, float]],
    *,
    used: float,
    cost: float,
    limit: float,
    period: float,
    now: float,
) -> float:
    """Seconds until enough of the live reservations ``rows`` (oldest first) have expired."""
    excess = used + cost - limit
    freed = 0.0
    for ts, row_cost in rows:
        freed += row_cost
        if freed >= excess - EPSILON:
            return max(ts + period - now, 0.0) + WAIT_MARGIN
    return period  # only when rows changed under us; the caller asks again


def window_keys(
    name: str, windows: Sequence[tuple[float, float]]
) -> list[tuple[str, float, float]]:
    """``(log name, limit, period)`` of each window of a limiter with several rates."""
    return [(window_key(name, limit, period), limit, period) for limit, period in windows]


def longest_wait(
    keyed: Sequence[tuple[str, float, float]],
    usage: Sequence[float],
    cost: float,
    wait_of: Callable[[str, float, float, float], float],
) -> float:
    """0 when ``cost`` fits in every window (``usage`` units used each), else the longest
    ``wait_of(key, used, limit, period)`` of the windows it does not fit in."""
    wait = 0.0
    for (key, limit, period), used in zip(keyed, usage, strict=True):
        if used + cost > limit + EPSILON:
            wait = max(wait, wait_of(key, used, limit, period))
    return wait


class _Held:
    """A connection, the process that opened it, its generation and (weakly) its thread."""

    __slots__ = ("bound", "connection", "generation", "pid", "thread")

    def __init__(self, connection: Any, generation: int) -> None:
        self.connection = connection
        self.generation = generation
        self.bound: int | None = None  # the wait bound the connection was last given, in ms
        self.pid = os.getpid()
        self.thread = weakref.ref(threading.current_thread())

    def finished(self) -> bool:
        thread = self.thread()
        return thread is None or not thread.is_alive()

    def close(self) -> None:
        with suppress(Exception):
            self.connection.close()


class PerThread:
    """One connection per thread and process.

    Fork safety: a connection opened by a parent process is never used, closed or even
    garbage-collected in a child (closing a PostgreSQL connection there would terminate the
    parent's session on the shared socket); the child opens its own. Connections of threads
    that have finished, and connections of an older generation (see :meth:`invalidate`), are
    closed when the next connection is opened.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._held: list[_Held] = []  # strong references, including a parent's (see above)
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self.generation = 0

    def get(self) -> Any:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid() and held.generation == self.generation:
            return held.connection
        return self._open()

    def _open(self) -> Any:
        pid = os.getpid()
        if self._pid != pid:  # forked: the parent's lock may have been held at fork time
            self._lock = threading.Lock()
            self._pid = pid
        held = _Held(self._connect(), self.generation)
        current = threading.current_thread()
        with self._lock:
            # This thread's old connection (replaced now) and those of finished threads.
            stale = [
                h for h in self._held if h.pid == pid and (h.finished() or h.thread() is current)
            ]
            for old in stale:
                old.close()
                self._held.remove(old)
            self._held.append(held)
        self._local.held = held
        return held.connection

    def bound_is(self, milliseconds: int) -> bool:
        """Whether this thread's connection (from :meth:`get`) was last given this wait bound."""
        held: _Held = self._local.held
        return held.bound == milliseconds

    def remember_bound(self, milliseconds: int) -> None:
        """Record the wait bound this thread's connection now has."""
        held: _Held = self._local.held
        held.bound = milliseconds

    def invalidate(self) -> None:
        """Make every thread open a new connection on its next use (the file was replaced)."""
        with self._lock:
            self.generation += 1

    def drop(self) -> None:
        """Close this thread's connection (after it broke); the next call reconnects."""
        held: _Held | None = getattr(self._local, "held", None)
        self._local.held = None
        if held is not None and held.pid == os.getpid():
            held.close()
            with self._lock, suppress(ValueError):
                self._held.remove(held)

    def close_all(self) -> None:
        pid = os.getpid()
        with self._lock:
            mine = [h for h in self._held if h.pid == pid]
            self._held = [h for h in self._held if h.pid != pid]
        for held in mine:
            held.close()
        self._local = threading.local()
