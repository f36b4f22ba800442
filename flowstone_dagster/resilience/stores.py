"""Shared state for circuit breakers and rate limiters, chosen by a URL.

Dagster runs each step in its own process, so a breaker or limiter that lives in one process's
memory protects nothing. Their state lives in a :class:`StateStore` that every process opens by
the same URL::

    from flowstone_dagster.resilience import open_store

    store = open_store("sqlite:////var/lib/dagster/flowstone/resilience.sqlite3")
    store = open_store("postgresql://dagster:secret@db:5432/dagster")
    store = open_store("memory://tests")          # this process only

=====================================  =====================================================
URL                                    atomicity
=====================================  =====================================================
``sqlite:///<absolute path>``          every update is one ``BEGIN IMMEDIATE`` transaction
(default; one machine)                 (WAL journal, ``busy_timeout`` 30 s); reads of a
                                       closed breaker are single ``SELECT`` statements
``postgresql://user:pw@host/db``       every update is one transaction holding a
(many machines)                        transaction-level advisory lock on the breaker's or
                                       limiter's name; timestamps come from the server's
                                       clock (``clock_timestamp()``), so machines need not
                                       agree on the time
``memory://`` / ``memory://<name>``    a ``threading.Lock``; one store per name per process
=====================================  =====================================================

:func:`open_store` caches one store per URL per process and is fork-safe: a child process
created by ``fork`` gets fresh stores with their own connections (and an empty memory store).
Connections are per thread. The default URL is :func:`default_store_url`.
"""

from __future__ import annotations

import getpass
import os
import sqlite3
import tempfile
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.http import redact_url

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "STORE_URL_ENV",
    "BreakerRecord",
    "MemoryStore",
    "PostgresStore",
    "Reservation",
    "SQLiteStore",
    "StateStore",
    "close_stores",
    "default_store_url",
    "open_store",
]

T = TypeVar("T")

#: Environment variable that overrides the default store URL of every process.
STORE_URL_ENV = "FLOWSTONE_RESILIENCE_STORE"

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half_open"

#: Tolerance for sums of float costs, and the margin added to computed waits so that a caller
#: that sleeps exactly that long finds the capacity free.
_EPSILON = 1e-9
_WAIT_MARGIN = 1e-4


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


@dataclass(frozen=True, slots=True)
class Reservation:
    """A limiter's answer: ``admitted`` at store time ``at``, or not before ``wait`` seconds."""

    admitted: bool
    at: float
    wait: float


class StateStore(Protocol):
    """Where breakers and limiters keep their state; see the module docs for the guarantees.

    Times are seconds since the epoch on the store's clock; a caller may pass ``now`` to use
    its own clock instead (the property tests do, to control time).
    """

    url: str

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

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        """Units admitted in the last ``period`` seconds."""
        ...

    def delete_limiter(self, name: str) -> None:
        """Forget every reservation of the limiter."""
        ...

    def close(self) -> None:
        """Close the connections this process holds (the store is reopened on next use)."""
        ...


def _wait_until_fits(
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
        if freed >= excess - _EPSILON:
            return max(ts + period - now, 0.0) + _WAIT_MARGIN
    return period  # only when rows changed under us; the caller asks again


# --------------------------------------------------------------------------------------------
# memory


class _Log:
    __slots__ = ("entries", "used")

    def __init__(self) -> None:
        self.entries: deque[tuple[float, float]] = deque()
        self.used = 0.0


class MemoryStore:
    """State in this process's memory, guarded by a lock: for tests and the in-process executor.

    ``open_store("memory://name")`` returns the same store for the same name within a process.
    """

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._lock = threading.Lock()
        self._breakers: dict[str, BreakerRecord] = {}
        self._logs: dict[str, _Log] = {}

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
        with self._lock:  # the hot path, kept short: it decides the cost of every admission
            at = time.time() if now is None else now
            log = self._logs.get(name) or self._pruned(name, period, at)
            entries = log.entries
            if entries and entries[0][0] <= at - period:
                log = self._pruned(name, period, at)
            if log.used + cost <= limit + _EPSILON:
                entries.append((at, cost))
                log.used += cost
                return Reservation(True, at, 0.0)
            wait = _wait_until_fits(
                entries, used=log.used, cost=cost, limit=limit, period=period, now=at
            )
            return Reservation(False, at, wait)

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        with self._lock:
            return self._pruned(name, period, time.time() if now is None else now).used

    def delete_limiter(self, name: str) -> None:
        with self._lock:
            self._logs.pop(name, None)

    def close(self) -> None:
        """Nothing to close."""


# --------------------------------------------------------------------------------------------
# SQLite

_SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS flowstone_breakers (
    name TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    failures INTEGER NOT NULL,
    opened_at REAL NOT NULL,
    probe_id TEXT,
    probe_until REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS flowstone_limiter_log (
    name TEXT NOT NULL,
    ts REAL NOT NULL,
    cost REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS flowstone_limiter_log_name_ts ON flowstone_limiter_log (name, ts);
CREATE TABLE IF NOT EXISTS flowstone_limiters (
    name TEXT PRIMARY KEY,
    used REAL NOT NULL
);
"""

_UPSERT_BREAKER_SQLITE = (
    "INSERT INTO flowstone_breakers (name, state, failures, opened_at, probe_id, probe_until) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
    "failures = excluded.failures, opened_at = excluded.opened_at, "
    "probe_id = excluded.probe_id, probe_until = excluded.probe_until"
)

_READ_BREAKER = (
    "SELECT state, failures, opened_at, probe_id, probe_until FROM flowstone_breakers "
    "WHERE name = ?"
)


def _record(row: Any) -> BreakerRecord:
    if row is None:
        return CLOSED_RECORD
    return BreakerRecord(row[0], int(row[1]), float(row[2]), row[3], float(row[4]))


class _Held:
    """A connection, the process that opened it and (weakly) the thread that uses it."""

    __slots__ = ("connection", "pid", "thread")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.pid = os.getpid()
        self.thread = weakref.ref(threading.current_thread())

    def finished(self) -> bool:
        thread = self.thread()
        return thread is None or not thread.is_alive()

    def close(self) -> None:
        with suppress(Exception):
            self.connection.close()


class _PerThread:
    """One connection per thread and process.

    Fork safety: a connection opened by a parent process is never used, closed or even
    garbage-collected in a child (closing a PostgreSQL connection there would terminate the
    parent's session on the shared socket); the child opens its own. Connections of threads
    that have finished are closed when the next connection is opened.
    """

    def __init__(self, connect: Callable[[], Any]) -> None:
        self._connect = connect
        self._local = threading.local()
        self._held: list[_Held] = []  # strong references, including a parent's (see above)
        self._lock = threading.Lock()
        self._pid = os.getpid()

    def get(self) -> Any:
        held: _Held | None = getattr(self._local, "held", None)
        if held is not None and held.pid == os.getpid():
            return held.connection
        return self._open()

    def _open(self) -> Any:
        pid = os.getpid()
        if self._pid != pid:  # forked: the parent's lock may have been held at fork time
            self._lock = threading.Lock()
            self._pid = pid
        held = _Held(self._connect())
        with self._lock:
            for old in [h for h in self._held if h.pid == pid and h.finished()]:
                old.close()
                self._held.remove(old)
            self._held.append(held)
        self._local.held = held
        return held.connection

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


class SQLiteStore:
    """State in a SQLite file shared by every process of one machine (the default store).

    Updates run in ``BEGIN IMMEDIATE`` transactions, so that concurrent processes serialise on
    the database's write lock; the journal is WAL (readers never block the writer) and
    ``busy_timeout`` is 30 s. Commits do not fsync (``synchronous=NORMAL``): a power loss may
    forget the last breaker transitions, which only makes the breaker forget recent failures.
    """

    def __init__(self, url: str, path: Path) -> None:
        self.url = url
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._connections = _PerThread(self._connect)
        self._connections.get().executescript("BEGIN IMMEDIATE;" + _SQLITE_SCHEMA + "COMMIT;")

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    def _connect(self) -> sqlite3.Connection:
        connection = sqlite3.connect(
            str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False
        )
        connection.execute("PRAGMA busy_timeout = 30000")
        # Switching a new file to WAL needs an exclusive lock and SQLite answers "database is
        # locked" at once (without the busy handler) while another process does the same.
        give_up = time.monotonic() + 30.0
        delay = 0.001
        while connection.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            try:
                connection.execute("PRAGMA journal_mode = WAL")
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) or time.monotonic() > give_up:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 0.05)
        connection.execute("PRAGMA synchronous = NORMAL")
        return connection

    @contextmanager
    def _immediate(self) -> Iterator[sqlite3.Connection]:
        connection: sqlite3.Connection = self._connections.get()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
            connection.execute("COMMIT")
        except BaseException:
            # Also when COMMIT itself fails (busy, disk full): never leave the thread's
            # connection inside a transaction, or every later BEGIN would fail.
            with suppress(sqlite3.Error):
                connection.execute("ROLLBACK")
            raise

    def read_breaker(self, name: str) -> BreakerRecord:
        connection: sqlite3.Connection = self._connections.get()
        return _record(connection.execute(_READ_BREAKER, (name,)).fetchone())

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        with self._immediate() as connection:
            current = _record(connection.execute(_READ_BREAKER, (name,)).fetchone())
            record, result = update(current, time.time() if now is None else now)
            if record != current:
                connection.execute(
                    _UPSERT_BREAKER_SQLITE,
                    (
                        name,
                        record.state,
                        record.failures,
                        record.opened_at,
                        record.probe_id,
                        record.probe_until,
                    ),
                )
            return result

    def delete_breaker(self, name: str) -> None:
        with self._immediate() as connection:
            connection.execute("DELETE FROM flowstone_breakers WHERE name = ?", (name,))

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        # The limiter's row keeps the sum of its log, so that a decision costs O(entries that
        # expire), not O(entries in the window).
        with self._immediate() as connection:
            at = time.time() if now is None else now
            expired = connection.execute(
                "DELETE FROM flowstone_limiter_log WHERE name = ? AND ts <= ? RETURNING cost",
                (name, at - period),
            ).fetchall()
            row = connection.execute(
                "SELECT used FROM flowstone_limiters WHERE name = ?", (name,)
            ).fetchone()
            if row is None:  # first use (or a log written before the sum was kept)
                (used,) = connection.execute(
                    "SELECT coalesce(sum(cost), 0.0) FROM flowstone_limiter_log WHERE name = ?",
                    (name,),
                ).fetchone()
            else:
                used = row[0] - sum(cost_ for (cost_,) in expired)
            used = max(used, 0.0)
            if used + cost <= limit + _EPSILON:
                connection.execute(
                    "INSERT INTO flowstone_limiter_log (name, ts, cost) VALUES (?, ?, ?)",
                    (name, at, cost),
                )
                self._save_used(connection, name, used + cost)
                return Reservation(True, at, 0.0)
            if expired or row is None:
                self._save_used(connection, name, used)
            rows = connection.execute(
                "SELECT ts, cost FROM flowstone_limiter_log WHERE name = ? ORDER BY ts", (name,)
            )
            wait = _wait_until_fits(rows, used=used, cost=cost, limit=limit, period=period, now=at)
            return Reservation(False, at, wait)

    @staticmethod
    def _save_used(connection: sqlite3.Connection, name: str, used: float) -> None:
        connection.execute(
            "INSERT INTO flowstone_limiters (name, used) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET used = excluded.used",
            (name, used),
        )

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        connection: sqlite3.Connection = self._connections.get()
        at = time.time() if now is None else now
        (used,) = connection.execute(
            "SELECT coalesce(sum(cost), 0.0) FROM flowstone_limiter_log WHERE name = ? AND ts > ?",
            (name, at - period),
        ).fetchone()
        return float(used)

    def delete_limiter(self, name: str) -> None:
        with self._immediate() as connection:
            connection.execute("DELETE FROM flowstone_limiter_log WHERE name = ?", (name,))
            connection.execute("DELETE FROM flowstone_limiters WHERE name = ?", (name,))

    def close(self) -> None:
        self._connections.close_all()


# --------------------------------------------------------------------------------------------
# PostgreSQL

_PG_SCHEMA = """
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended('flowstone.resilience.schema', 0));
CREATE TABLE IF NOT EXISTS flowstone_breakers (
    name text PRIMARY KEY,
    state text NOT NULL,
    failures integer NOT NULL,
    opened_at double precision NOT NULL,
    probe_id text,
    probe_until double precision NOT NULL
);
CREATE TABLE IF NOT EXISTS flowstone_limiter_log (
    name text NOT NULL,
    ts double precision NOT NULL,
    cost double precision NOT NULL
);
CREATE INDEX IF NOT EXISTS flowstone_limiter_log_name_ts ON flowstone_limiter_log (name, ts);
CREATE TABLE IF NOT EXISTS flowstone_limiters (
    name text PRIMARY KEY,
    used double precision NOT NULL
);
COMMIT;
"""

# One round trip: open the transaction, lock the breaker's name, read the record and the clock.
_PG_LOCK_AND_READ_BREAKER = """
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
SELECT coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8,
       b.state, b.failures, b.opened_at, b.probe_id, b.probe_until
FROM (SELECT 1) AS one LEFT JOIN flowstone_breakers AS b ON b.name = %(name)s
"""

_PG_UPSERT_BREAKER_AND_COMMIT = """
INSERT INTO flowstone_breakers (name, state, failures, opened_at, probe_id, probe_until)
VALUES (%(name)s, %(state)s, %(failures)s, %(opened_at)s, %(probe_id)s, %(probe_until)s)
ON CONFLICT (name) DO UPDATE SET state = excluded.state, failures = excluded.failures,
    opened_at = excluded.opened_at, probe_id = excluded.probe_id,
    probe_until = excluded.probe_until;
COMMIT
"""

# One round trip: lock the limiter's name, prune, update the kept sum, and insert when the cost
# fits (O(expired entries), not O(window)). Under
# READ COMMITTED each statement takes a new snapshot, so the last one sees every reservation
# committed before the lock was granted.
_PG_RESERVE = """
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
WITH c AS (SELECT coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8 AS now),
gone AS (
    DELETE FROM flowstone_limiter_log AS l USING c
    WHERE l.name = %(name)s AND l.ts <= c.now - %(period)s
    RETURNING l.cost
),
prev AS (SELECT used FROM flowstone_limiters WHERE name = %(name)s),
u AS (
    SELECT greatest(
        CASE WHEN EXISTS (SELECT 1 FROM prev)
            THEN (SELECT used FROM prev) - coalesce((SELECT sum(cost) FROM gone), 0)
            ELSE (SELECT coalesce(sum(l.cost), 0) FROM flowstone_limiter_log AS l, c
                  WHERE l.name = %(name)s AND l.ts > c.now - %(period)s)
        END, 0)::float8 AS used
),
ins AS (
    INSERT INTO flowstone_limiter_log (name, ts, cost)
    SELECT %(name)s, c.now, %(cost)s FROM c, u WHERE u.used + %(cost)s <= %(limit)s
    RETURNING ts
),
save AS (
    INSERT INTO flowstone_limiters (name, used)
    SELECT %(name)s, u.used + CASE WHEN EXISTS (SELECT 1 FROM ins) THEN %(cost)s ELSE 0 END
    FROM u
    ON CONFLICT (name) DO UPDATE SET used = excluded.used
)
SELECT c.now, u.used, EXISTS (SELECT 1 FROM ins) FROM c, u
"""


class PostgresStore:
    """State in PostgreSQL tables, shared by every process on every machine.

    Each update is one transaction that first takes a transaction-level advisory lock on the
    breaker's or limiter's name (``pg_advisory_xact_lock``), so concurrent updates of the same
    name serialise and different names never wait for each other. Times come from the server's
    clock. The tables (``flowstone_breakers``, ``flowstone_limiter_log``) are created on first
    use; the database Dagster's instance uses is fine.
    """

    def __init__(self, url: str) -> None:
        import psycopg2

        self.url = url
        self._psycopg2 = psycopg2
        self._connections = _PerThread(self._connect)
        self._run(lambda cursor: cursor.execute(_PG_SCHEMA))

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    def _connect(self) -> Any:
        connection = self._psycopg2.connect(self.url, connect_timeout=10)
        connection.autocommit = True  # transactions are explicit BEGIN ... COMMIT
        return connection

    def _run(self, work: Callable[[Any], T]) -> T:
        connection = self._connections.get()
        try:
            with connection.cursor() as cursor:
                return work(cursor)
        except BaseException:
            if connection.closed:
                self._connections.drop()
            else:
                try:
                    with connection.cursor() as cursor:
                        cursor.execute("ROLLBACK")
                except Exception:
                    self._connections.drop()
            raise

    def read_breaker(self, name: str) -> BreakerRecord:
        def work(cursor: Any) -> BreakerRecord:
            cursor.execute(_READ_BREAKER.replace("?", "%s"), (name,))
            return _record(cursor.fetchone())

        return self._run(work)

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        def work(cursor: Any) -> T:
            cursor.execute(
                _PG_LOCK_AND_READ_BREAKER,
                {"key": f"flowstone.breaker:{name}", "name": name, "now": now},
            )
            row = cursor.fetchone()
            current = _record(row[1:] if row[1] is not None else None)
            record, result = update(current, float(row[0]))
            if record != current:
                cursor.execute(
                    _PG_UPSERT_BREAKER_AND_COMMIT,
                    {
                        "name": name,
                        "state": record.state,
                        "failures": record.failures,
                        "opened_at": record.opened_at,
                        "probe_id": record.probe_id,
                        "probe_until": record.probe_until,
                    },
                )
            else:
                cursor.execute("COMMIT")
            return result

        return self._run(work)

    def delete_breaker(self, name: str) -> None:
        self._run(
            lambda cursor: cursor.execute("DELETE FROM flowstone_breakers WHERE name = %s", (name,))
        )

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        def work(cursor: Any) -> Reservation:
            cursor.execute(
                _PG_RESERVE,
                {
                    "key": f"flowstone.limiter:{name}",
                    "name": name,
                    "now": now,
                    "period": float(period),
                    "cost": float(cost),
                    "limit": float(limit) + _EPSILON,
                },
            )
            at, used, admitted = cursor.fetchone()
            if admitted:
                cursor.execute("COMMIT")
                return Reservation(True, float(at), 0.0)
            cursor.execute(
                "SELECT ts, cost FROM flowstone_limiter_log WHERE name = %s AND ts > %s "
                "ORDER BY ts",
                (name, at - period),
            )
            rows = cursor.fetchall()
            cursor.execute("COMMIT")
            return Reservation(
                False,
                float(at),
                _wait_until_fits(
                    rows, used=used, cost=cost, limit=limit, period=period, now=float(at)
                ),
            )

        return self._run(work)

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        def work(cursor: Any) -> float:
            cursor.execute(
                "SELECT coalesce(sum(cost), 0)::float8 FROM flowstone_limiter_log "
                "WHERE name = %(name)s AND ts > "
                "coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8 - %(period)s",
                {"name": name, "now": now, "period": float(period)},
            )
            return float(cursor.fetchone()[0])

        return self._run(work)

    def delete_limiter(self, name: str) -> None:
        self._run(
            lambda cursor: cursor.execute(
                "BEGIN; DELETE FROM flowstone_limiter_log WHERE name = %(name)s; "
                "DELETE FROM flowstone_limiters WHERE name = %(name)s; COMMIT",
                {"name": name},
            )
        )

    def close(self) -> None:
        self._connections.close_all()


# --------------------------------------------------------------------------------------------
# factory


def default_store_url() -> str:
    """The store URL used when none is given.

    ``$FLOWSTONE_RESILIENCE_STORE`` when set; otherwise a SQLite file
    ``$DAGSTER_HOME/flowstone/resilience.sqlite3``; without ``DAGSTER_HOME``, the same file in a
    per-user directory under the system's temp dir (``/tmp/flowstone-<user>/``).
    """
    explicit = os.environ.get(STORE_URL_ENV)
    if explicit:
        return explicit
    home = os.environ.get("DAGSTER_HOME")
    if home:
        directory = Path(home).expanduser().resolve() / "flowstone"
    else:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (containers)
            user = str(os.getuid())
        directory = Path(tempfile.gettempdir()) / f"flowstone-{user}"
    return f"sqlite://{directory / 'resilience.sqlite3'}"


def _sqlite_path(url: str) -> Path:
    raw = url[len("sqlite://") :]
    if not raw.startswith("/") or raw.strip("/") in ("", ":memory:"):
        raise ConfigurationError(
            f"{url!r} is not a SQLite file URL; use sqlite:///<absolute path> "
            "(for example sqlite:////var/lib/dagster/resilience.sqlite3) or memory://",
            field="store_url",
        )
    return Path("/" + raw.lstrip("/"))


def _create(url: str) -> StateStore:
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "memory":
        return MemoryStore(url)
    if scheme == "sqlite":
        return SQLiteStore(url, _sqlite_path(url))
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    raise ConfigurationError(
        f"unsupported resilience store URL {redact_url(url)!r}; "
        "use sqlite:///<path>, postgresql://user:password@host:port/db or memory://",
        field="store_url",
    )


_stores: dict[str, StateStore] = {}
_stores_lock = threading.Lock()


def open_store(url: str | None = None) -> StateStore:
    """The process's store for ``url`` (default :func:`default_store_url`), opened once.

    ::

        store = open_store("memory://my-test")
        assert open_store("memory://my-test") is store

    Raises :class:`~flowstone_dagster.errors.ConfigurationError` for an unknown scheme.
    """
    if url is None:
        url = default_store_url()
    store = _stores.get(url)
    if store is not None:
        return store
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = _create(url)
        return store


def close_stores() -> None:
    """Close and forget every store this process opened (tests and shutdown)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


#: Stores inherited from a parent process: kept referenced, never used or closed, so that the
#: parent's connections are not torn down from the child.
_inherited: list[StateStore] = []


def _after_fork_in_child() -> None:
    global _stores_lock  # noqa: PLW0603 - a lock held at fork time must not be inherited
    _stores_lock = threading.Lock()
    _inherited.extend(_stores.values())
    _stores.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
