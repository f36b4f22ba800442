"""PostgreSQL: state shared by every process on every machine."""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flowstone_dagster.redaction import redact_url
from flowstone_dagster.resilience.stores.base import (
    DEFAULT_STORE_TIMEOUT,
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

__all__ = ["PostgresStore"]

T = TypeVar("T")

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
CREATE TABLE IF NOT EXISTS flowstone_leases (
    name text NOT NULL,
    lease_id text NOT NULL,
    expires_at double precision NOT NULL,
    PRIMARY KEY (name, lease_id)
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


_PG_LOCK_AND_NOW = """
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
SELECT coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8
"""

# Prune one window's log and return (and keep) the units left in it.
_PG_USAGE = """
WITH gone AS (
    DELETE FROM flowstone_limiter_log
    WHERE name = %(name)s AND ts <= %(at)s - %(period)s
    RETURNING cost
),
prev AS (SELECT used FROM flowstone_limiters WHERE name = %(name)s),
u AS (
    SELECT greatest(
        CASE WHEN EXISTS (SELECT 1 FROM prev)
            THEN (SELECT used FROM prev) - coalesce((SELECT sum(cost) FROM gone), 0)
            ELSE (SELECT coalesce(sum(cost), 0) FROM flowstone_limiter_log
                  WHERE name = %(name)s AND ts > %(at)s - %(period)s)
        END, 0)::float8 AS used
),
save AS (
    INSERT INTO flowstone_limiters (name, used) SELECT %(name)s, used FROM u
    ON CONFLICT (name) DO UPDATE SET used = excluded.used
)
SELECT used FROM u
"""

_PG_ADMIT = """
INSERT INTO flowstone_limiter_log (name, ts, cost) VALUES (%(name)s, %(at)s, %(cost)s);
INSERT INTO flowstone_limiters (name, used) VALUES (%(name)s, %(used)s)
ON CONFLICT (name) DO UPDATE SET used = excluded.used
"""


# One round trip: lock the bulkhead's name, drop expired leases, take a slot when one is free.
_PG_ACQUIRE_LEASE = """
BEGIN;
SELECT pg_advisory_xact_lock(hashtextextended(%(key)s, 0));
WITH c AS (SELECT coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8 AS now),
gone AS (
    DELETE FROM flowstone_leases AS l USING c
    WHERE l.name = %(name)s AND l.expires_at <= c.now
    RETURNING l.lease_id
),
live AS (
    SELECT count(*) AS held, min(l.expires_at) AS first FROM flowstone_leases AS l, c
    WHERE l.name = %(name)s AND l.expires_at > c.now
),
ins AS (
    INSERT INTO flowstone_leases (name, lease_id, expires_at)
    SELECT %(name)s, %(lease_id)s, c.now + %(seconds)s FROM c, live WHERE live.held < %(limit)s
    RETURNING lease_id
)
SELECT c.now, EXISTS (SELECT 1 FROM ins), greatest(coalesce(live.first - c.now, 0), 0)
FROM c, live
"""


class PostgresStore:
    """State in PostgreSQL tables, shared by every process on every machine.

    Each update is one transaction that first takes a transaction-level advisory lock on the
    breaker's or limiter's name (``pg_advisory_xact_lock``), so concurrent updates of the same
    name serialise and different names never wait for each other. Times come from the server's
    clock. The tables (``flowstone_breakers``, ``flowstone_limiter_log``) are created on first
    use; the database Dagster's instance uses is fine.

    Every operation is bounded: ``statement_timeout`` and ``lock_timeout`` (the advisory lock
    included) from :func:`~.base.operation_timeout`, ``connect_timeout``, and TCP keepalives
    with ``tcp_user_timeout`` so that a network partition mid-transaction fails within
    seconds. Failures raise ``StoreUnavailable``.
    """

    local_clock = False  # the store's times (the server's, shared by every machine)

    def __init__(self, url: str) -> None:
        import psycopg2

        self.url = url
        self._psycopg2 = psycopg2
        self._connections = PerThread(self._connect)
        self._schema_ready = False

    def __repr__(self) -> str:
        return f"PostgresStore({redact_url(self.url)!r})"

    def _connect(self) -> Any:
        bound_ms = int(DEFAULT_STORE_TIMEOUT * 1000)
        connection = self._psycopg2.connect(
            self.url,
            connect_timeout=max(2, math.ceil(operation_timeout())),
            # A partition mid-transaction is noticed within seconds, not when TCP gives up.
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=2,
            tcp_user_timeout=bound_ms,
            application_name="flowstone-resilience",
        )
        connection.autocommit = True  # transactions are explicit BEGIN ... COMMIT
        return connection

    def _run(self, operation: str, work: Callable[[Any], T]) -> T:
        """``work`` on this thread's connection with every wait bounded (statement and lock
        timeouts from :func:`~.base.operation_timeout`); a failure becomes
        ``StoreUnavailable``. Tables dropped under us are created again, once."""
        for again in (True, False):
            try:
                connection = self._connections.get()
                milliseconds = operation_milliseconds()
                with connection.cursor() as cursor:
                    # Session settings, so every statement is bounded; sent only when the bound
                    # changes (a round trip each time would double the cost of an operation).
                    if not self._connections.bound_is(milliseconds):
                        cursor.execute(
                            "SET statement_timeout = %(ms)s; SET lock_timeout = %(ms)s",
                            {"ms": milliseconds},
                        )
                        self._connections.remember_bound(milliseconds)
                    if not self._schema_ready:
                        cursor.execute(_PG_SCHEMA)
                        self._schema_ready = True
                    return work(cursor)
            except self._psycopg2.Error as exc:
                self._recover(exc)
                if again and getattr(exc, "pgcode", None) == "42P01":  # undefined table
                    self._schema_ready = False
                    continue
                raise unavailable(self.url, operation, exc) from exc
            except OSError as exc:
                self._connections.drop()
                raise unavailable(self.url, operation, exc) from exc
        raise AssertionError("unreachable")  # pragma: no cover

    def _recover(self, exc: BaseException) -> None:
        """Leave this thread's connection usable (rolled back) or drop it."""
        try:
            connection = self._connections.get()
        except Exception:
            return
        if connection.closed:
            self._connections.drop()
            return
        try:
            with connection.cursor() as cursor:
                cursor.execute("ROLLBACK")
        except Exception:
            self._connections.drop()

    def read_breaker(self, name: str) -> BreakerRecord:
        def work(cursor: Any) -> BreakerRecord:
            cursor.execute(READ_BREAKER.replace("?", "%s"), (name,))
            return record_of(cursor.fetchone())

        return self._run("read breaker", work)

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
            current = record_of(row[1:] if row[1] is not None else None)
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

        return self._run("update breaker", work)

    def delete_breaker(self, name: str) -> None:
        self._run(
            "delete breaker",
            lambda cursor: cursor.execute(
                "DELETE FROM flowstone_breakers WHERE name = %s", (name,)
            ),
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
                    "limit": float(limit) + EPSILON,
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
                wait_until_fits(
                    rows, used=used, cost=cost, limit=limit, period=period, now=float(at)
                ),
            )

        return self._run("reserve", work)

    def reserve_all(
        self,
        name: str,
        cost: float,
        windows: Sequence[tuple[float, float]],
        now: float | None = None,
    ) -> Reservation:
        def work(cursor: Any) -> Reservation:
            cursor.execute(_PG_LOCK_AND_NOW, {"key": f"flowstone.limiter:{name}", "now": now})
            at = float(cursor.fetchone()[0])
            keyed = window_keys(name, windows)
            usage = []
            for key, _, period in keyed:
                cursor.execute(_PG_USAGE, {"name": key, "at": at, "period": float(period)})
                usage.append(float(cursor.fetchone()[0]))

            def wait_of(key: str, used: float, limit: float, period: float) -> float:
                cursor.execute(
                    "SELECT ts, cost FROM flowstone_limiter_log WHERE name = %s AND ts > %s "
                    "ORDER BY ts",
                    (key, at - period),
                )
                return wait_until_fits(
                    cursor.fetchall(), used=used, cost=cost, limit=limit, period=period, now=at
                )

            wait = longest_wait(keyed, usage, cost, wait_of)
            if wait == 0:
                for (key, _, _), used in zip(keyed, usage, strict=True):
                    cursor.execute(
                        _PG_ADMIT, {"name": key, "at": at, "cost": float(cost), "used": used + cost}
                    )
            cursor.execute("COMMIT")
            return Reservation(wait == 0, at, wait)

        return self._run("reserve", work)

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        def work(cursor: Any) -> float:
            cursor.execute(
                "SELECT coalesce(sum(cost), 0)::float8 FROM flowstone_limiter_log "
                "WHERE name = %(name)s AND ts > "
                "coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8 - %(period)s",
                {"name": name, "now": now, "period": float(period)},
            )
            return float(cursor.fetchone()[0])

        return self._run("read limiter", work)

    def delete_limiter(self, name: str) -> None:
        self._run(
            "delete limiter",
            lambda cursor: cursor.execute(
                "BEGIN; DELETE FROM flowstone_limiter_log WHERE name = %(name)s; "
                "DELETE FROM flowstone_limiters WHERE name = %(name)s; COMMIT",
                {"name": name},
            ),
        )

    def acquire_lease(
        self, name: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> Lease:
        lease_id = uuid.uuid4().hex

        def work(cursor: Any) -> Lease:
            cursor.execute(
                _PG_ACQUIRE_LEASE,
                {
                    "key": f"flowstone.bulkhead:{name}",
                    "name": name,
                    "now": now,
                    "lease_id": lease_id,
                    "seconds": float(lease_seconds),
                    "limit": int(limit),
                },
            )
            at, granted, wait = cursor.fetchone()
            cursor.execute("COMMIT")
            return Lease(lease_id if granted else None, float(at), 0.0 if granted else float(wait))

        return self._run("acquire lease", work)

    def release_lease(self, name: str, lease_id: str) -> None:
        self._run(
            "release lease",
            lambda cursor: cursor.execute(
                "DELETE FROM flowstone_leases WHERE name = %s AND lease_id = %s", (name, lease_id)
            ),
        )

    def active_leases(self, name: str, now: float | None = None) -> int:
        def work(cursor: Any) -> int:
            cursor.execute(
                "SELECT count(*) FROM flowstone_leases WHERE name = %(name)s AND expires_at > "
                "coalesce(%(now)s, extract(epoch FROM clock_timestamp()))::float8",
                {"name": name, "now": now},
            )
            return int(cursor.fetchone()[0])

        return self._run("read leases", work)

    def close(self) -> None:
        self._connections.close_all()
