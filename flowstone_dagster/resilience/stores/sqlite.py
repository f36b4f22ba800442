"""The default store: a SQLite file shared by every process of one machine."""

from __future__ import annotations

import logging
import os
import sqlite3
import stat
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import TypeVar

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, StoreUnavailable
from flowstone_dagster.resilience.stores.base import (
    EPSILON,
    READ_BREAKER,
    BreakerRecord,
    Lease,
    PerThread,
    Reservation,
    longest_wait,
    operation_milliseconds,
    operation_timeout,
    record_of,
    unavailable,
    wait_until_fits,
    window_keys,
)

__all__ = ["SQLiteStore", "ensure_private"]

T = TypeVar("T")

logger = logging.getLogger(__name__)

_SCHEMA = """
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
CREATE TABLE IF NOT EXISTS flowstone_leases (
    name TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    expires_at REAL NOT NULL,
    PRIMARY KEY (name, lease_id)
);
"""

_UPSERT_BREAKER = (
    "INSERT INTO flowstone_breakers (name, state, failures, opened_at, probe_id, probe_until) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (name) DO UPDATE SET state = excluded.state, "
    "failures = excluded.failures, opened_at = excluded.opened_at, "
    "probe_id = excluded.probe_id, probe_until = excluded.probe_until"
)


def ensure_private(path: Path, *, own_directory: bool) -> None:
    """Create ``path``'s directory (0700) and file (0600) when missing; refuse ones owned by
    another user.

    ``own_directory``: the directory is ours alone (the default store's), so its owner and
    mode are checked too; an explicit path may live in a shared directory.
    """
    directory = path.parent
    uid = os.geteuid()
    if own_directory:
        with suppress(FileExistsError):
            directory.mkdir(mode=0o700, parents=True)
        info = os.lstat(directory)
        if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
            raise ConfigurationError(
                f"{directory} is not a directory (a symlink or file planted there?); remove it "
                "or set store_url / $FLOWSTONE_RESILIENCE_STORE to a path of your own",
                field="store_url",
            )
        if info.st_uid != uid:
            raise ConfigurationError(
                f"the resilience store directory {directory} belongs to uid {info.st_uid}, not "
                f"to this user (uid {uid}): another user could forge breaker and limiter "
                "state. Remove it, or set DAGSTER_HOME, store_url or "
                "$FLOWSTONE_RESILIENCE_STORE to a directory of your own",
                field="store_url",
            )
        if info.st_mode & 0o022:
            raise ConfigurationError(
                f"the resilience store directory {directory} is writable by other users "
                f"(mode {stat.S_IMODE(info.st_mode):o}); run chmod 700 {directory}",
                field="store_url",
            )
    else:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        descriptor = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        info = os.lstat(path)
        if stat.S_ISLNK(info.st_mode):
            raise ConfigurationError(
                f"the resilience store {path} is a symlink; use the real path",
                field="store_url",
            ) from None
        if info.st_uid != uid:
            raise ConfigurationError(
                f"the resilience store {path} belongs to uid {info.st_uid}, not to this user "
                f"(uid {uid}); remove it or point store_url at a file of your own",
                field="store_url",
            ) from None
    else:
        os.close(descriptor)


class SQLiteStore:
    """State in a SQLite file shared by every process of one machine (the default store).

    Updates run in ``BEGIN IMMEDIATE`` transactions, so that concurrent processes serialise on
    the database's write lock; the journal is WAL (readers never block the writer). Every
    operation waits for the lock at most :func:`~.base.operation_timeout` (SQLite's
    ``busy_timeout``, set per operation). Commits do not fsync (``synchronous=NORMAL``): a
    power loss may forget the last breaker transitions, which only makes the breaker forget
    recent failures.

    The store notices when its file is deleted or replaced (device and inode no longer match
    the path): it reopens the path, with a WARNING and a ``flowstone.store.reopened`` event,
    so that processes never split between an old and a new file.
    """

    local_clock = True  # the store's times (this machine's time.time())

    def __init__(self, url: str, path: Path, *, private_directory: bool = False) -> None:
        self.url = url
        self.path = path
        self._private_directory = private_directory
        self._connections = PerThread(self._connect)
        self._identity: tuple[int, int] | None = None
        self._identity_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"SQLiteStore({self.url!r})"

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> sqlite3.Connection:
        ensure_private(self.path, own_directory=self._private_directory)
        connection = sqlite3.connect(
            str(self.path),
            timeout=operation_timeout(),
            isolation_level=None,
            check_same_thread=False,
        )
        # Switching a new file to WAL needs an exclusive lock and SQLite answers "database is
        # locked" at once (without the busy handler) while another process does the same.
        give_up = time.monotonic() + operation_timeout()
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
        connection.executescript("BEGIN IMMEDIATE;" + _SCHEMA + "COMMIT;")
        info = os.stat(self.path)
        with self._identity_lock:
            self._identity = (info.st_dev, info.st_ino)
        return connection

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection = self._connections.get()
        milliseconds = operation_milliseconds()
        if not self._connections.bound_is(milliseconds):
            connection.execute(f"PRAGMA busy_timeout = {milliseconds}")
            self._connections.remember_bound(milliseconds)
        return connection

    def _replaced(self) -> bool:
        """Whether the path no longer names the file the connections opened."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return True
        return (info.st_dev, info.st_ino) != self._identity

    def _reopen(self) -> None:
        logger.warning(
            "resilience store %s was deleted or replaced; reopening it (breaker and limiter "
            "state starts afresh)",
            self.path,
        )
        telemetry.emit("flowstone.store.reopened", outcome="ok", store=self.url)
        self._connections.invalidate()

    @contextmanager
    def _guarded(self, operation: str) -> Iterator[None]:
        try:
            yield
        except (StoreUnavailable, ConfigurationError):
            raise
        except (sqlite3.Error, OSError) as exc:
            if isinstance(exc, sqlite3.Error):
                # A broken connection must not be reused (it may sit inside a transaction).
                self._connections.drop()
            raise unavailable(self.url, operation, exc) from exc

    def _run(self, operation: str, work: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        """``work`` on this thread's connection, in a ``BEGIN IMMEDIATE`` transaction when
        ``write``; reopens the file first when it was replaced, and once more when it is
        replaced while we wait for the lock."""
        with self._guarded(operation):
            for _ in range(3):
                connection = self._connection()
                if self._replaced():
                    self._reopen()
                    continue
                if not write:
                    return work(connection)
                connection.execute("BEGIN IMMEDIATE")
                try:
                    if self._replaced():  # replaced while we waited for the lock
                        connection.execute("ROLLBACK")
                        self._reopen()
                        continue
                    result = work(connection)
                    connection.execute("COMMIT")
                    return result
                except BaseException:
                    # Also when COMMIT itself fails (busy, disk full): never leave the thread's
                    # connection inside a transaction, or every later BEGIN would fail.
                    with suppress(sqlite3.Error):
                        connection.execute("ROLLBACK")
                    raise
            raise sqlite3.OperationalError(f"{self.path} keeps being replaced")

    # -- breakers ------------------------------------------------------------------------------

    def read_breaker(self, name: str) -> BreakerRecord:
        return self._run(
            "read breaker",
            lambda c: record_of(c.execute(READ_BREAKER, (name,)).fetchone()),
            write=False,
        )

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        def work(connection: sqlite3.Connection) -> T:
            current = record_of(connection.execute(READ_BREAKER, (name,)).fetchone())
            record, result = update(current, time.time() if now is None else now)
            if record != current:
                connection.execute(
                    _UPSERT_BREAKER,
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

        return self._run("update breaker", work, write=True)

    def delete_breaker(self, name: str) -> None:
        self._run(
            "delete breaker",
            lambda c: c.execute("DELETE FROM flowstone_breakers WHERE name = ?", (name,)),
            write=True,
        )

    # -- limiters ------------------------------------------------------------------------------

    @staticmethod
    def _used(connection: sqlite3.Connection, name: str, period: float, at: float) -> float:
        """Prune the window and return the units in it (the kept sum, updated)."""
        # The limiter's row keeps the sum of its log, so that a decision costs O(entries that
        # expire), not O(entries in the window).
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
        if expired or row is None:
            SQLiteStore._save_used(connection, name, used)
        return float(used)

    @staticmethod
    def _admit(
        connection: sqlite3.Connection, name: str, cost: float, used: float, at: float
    ) -> None:
        connection.execute(
            "INSERT INTO flowstone_limiter_log (name, ts, cost) VALUES (?, ?, ?)", (name, at, cost)
        )
        SQLiteStore._save_used(connection, name, used + cost)

    @staticmethod
    def _wait(
        connection: sqlite3.Connection,
        name: str,
        *,
        used: float,
        cost: float,
        limit: float,
        period: float,
        at: float,
    ) -> float:
        rows = connection.execute(
            "SELECT ts, cost FROM flowstone_limiter_log WHERE name = ? ORDER BY ts", (name,)
        )
        return wait_until_fits(rows, used=used, cost=cost, limit=limit, period=period, now=at)

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        def work(connection: sqlite3.Connection) -> Reservation:
            at = time.time() if now is None else now
            used = self._used(connection, name, period, at)
            if used + cost <= limit + EPSILON:
                self._admit(connection, name, cost, used, at)
                return Reservation(True, at, 0.0)
            wait = self._wait(
                connection, name, used=used, cost=cost, limit=limit, period=period, at=at
            )
            return Reservation(False, at, wait)

        return self._run("reserve", work, write=True)

    def reserve_all(
        self,
        name: str,
        cost: float,
        windows: Sequence[tuple[float, float]],
        now: float | None = None,
    ) -> Reservation:
        def work(connection: sqlite3.Connection) -> Reservation:
            at = time.time() if now is None else now
            keyed = window_keys(name, windows)
            usage = [self._used(connection, key, period, at) for key, _, period in keyed]

            def wait_of(key: str, used: float, limit: float, period: float) -> float:
                return self._wait(
                    connection, key, used=used, cost=cost, limit=limit, period=period, at=at
                )

            wait = longest_wait(keyed, usage, cost, wait_of)
            if wait > 0:
                return Reservation(False, at, wait)
            for (key, _, _), used in zip(keyed, usage, strict=True):
                self._admit(connection, key, cost, used, at)
            return Reservation(True, at, 0.0)

        return self._run("reserve", work, write=True)

    @staticmethod
    def _save_used(connection: sqlite3.Connection, name: str, used: float) -> None:
        connection.execute(
            "INSERT INTO flowstone_limiters (name, used) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET used = excluded.used",
            (name, used),
        )

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        def work(connection: sqlite3.Connection) -> float:
            at = time.time() if now is None else now
            (used,) = connection.execute(
                "SELECT coalesce(sum(cost), 0.0) FROM flowstone_limiter_log "
                "WHERE name = ? AND ts > ?",
                (name, at - period),
            ).fetchone()
            return float(used)

        return self._run("read limiter", work, write=False)

    def delete_limiter(self, name: str) -> None:
        def work(connection: sqlite3.Connection) -> None:
            connection.execute("DELETE FROM flowstone_limiter_log WHERE name = ?", (name,))
            connection.execute("DELETE FROM flowstone_limiters WHERE name = ?", (name,))

        self._run("delete limiter", work, write=True)

    # -- bulkheads -----------------------------------------------------------------------------

    def acquire_lease(
        self, name: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> Lease:
        def work(connection: sqlite3.Connection) -> Lease:
            at = time.time() if now is None else now
            connection.execute(
                "DELETE FROM flowstone_leases WHERE name = ? AND expires_at <= ?", (name, at)
            )
            held, first = connection.execute(
                "SELECT count(*), min(expires_at) FROM flowstone_leases WHERE name = ?", (name,)
            ).fetchone()
            if held >= limit:
                return Lease(None, at, max(first - at, 0.0))
            lease_id = uuid.uuid4().hex
            connection.execute(
                "INSERT INTO flowstone_leases (name, lease_id, expires_at) VALUES (?, ?, ?)",
                (name, lease_id, at + lease_seconds),
            )
            return Lease(lease_id, at, 0.0)

        return self._run("acquire lease", work, write=True)

    def release_lease(self, name: str, lease_id: str) -> None:
        self._run(
            "release lease",
            lambda c: c.execute(
                "DELETE FROM flowstone_leases WHERE name = ? AND lease_id = ?", (name, lease_id)
            ),
            write=True,
        )

    def active_leases(self, name: str, now: float | None = None) -> int:
        def work(connection: sqlite3.Connection) -> int:
            at = time.time() if now is None else now
            (held,) = connection.execute(
                "SELECT count(*) FROM flowstone_leases WHERE name = ? AND expires_at > ?",
                (name, at),
            ).fetchone()
            return int(held)

        return self._run("read leases", work, write=False)

    def close(self) -> None:
        self._connections.close_all()
