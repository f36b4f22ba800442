"""Redis: state shared by every process on every machine, kept in one Redis server.

Keys (one server or a primary; Redis Cluster is not supported, since a limiter with several
windows updates several keys in one script)::

    flowstone:breaker:<name>         hash: state, failures, opened_at, probe_id, probe_until
    flowstone:limiter-log:<name>     sorted set: score = admission time, member = "<seq>:<cost>"
    flowstone:limiter-sum:<name>     hash: used (the kept sum of the log), seq
    flowstone:leases:<name>          sorted set: score = expiry time, member = lease id
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from flowstone_dagster.redaction import redact_url
from flowstone_dagster.resilience.stores.base import (
    EPSILON,
    WAIT_MARGIN,
    BreakerRecord,
    Lease,
    PerThread,
    Reservation,
    operation_timeout,
    unavailable,
    window_key,
)

__all__ = ["RedisStore", "require_redis"]

T = TypeVar("T")


def require_redis() -> Any:
    """The ``redis`` client module, or an ImportError naming the extra that brings it."""
    try:
        import redis
    except ImportError as exc:
        raise ImportError(
            "a redis:// resilience store needs the [redis] extra: "
            f"pip install 'flowstone-dagster[redis]' ({exc})"
        ) from exc
    return redis


# The store's clock, as a string with every digit (Lua numbers passed to redis.call are
# formatted with 14 significant digits, which would round an epoch time to 0.1 ms).
_LUA_PRELUDE = """
local function fmt(x) return string.format('%.17g', x) end
local function clock(given)
    if given ~= '' then return tonumber(given) end
    local t = redis.call('TIME')
    return tonumber(t[1]) + tonumber(t[2]) / 1000000
end
local function cost_of(member) return tonumber(string.match(member, ':([^:]*)$')) end
"""

_READ_BREAKER = (
    _LUA_PRELUDE
    + """
return {fmt(clock(ARGV[1])), redis.call('HGETALL', KEYS[1])}
"""
)

# KEYS: (log, sum) per window; ARGV: now or '', cost, epsilon, margin, ttl?, then (limit,
# period) per window. Prunes every window, keeps its sum, and admits in all or in none.
_RESERVE = (
    _LUA_PRELUDE
    + """
local at = clock(ARGV[1])
local cost_text = ARGV[2]
local cost = tonumber(cost_text)
local eps, margin, ttl = tonumber(ARGV[3]), tonumber(ARGV[4]), ARGV[5] == '1'
local n = #KEYS / 2
local used, gone_any = {}, {}
local wait = 0
for i = 1, n do
    local log, sum = KEYS[2 * i - 1], KEYS[2 * i]
    local limit, period = tonumber(ARGV[4 + 2 * i]), tonumber(ARGV[5 + 2 * i])
    local horizon = fmt(at - period)
    local gone = redis.call('ZRANGEBYSCORE', log, '-inf', horizon)
    if #gone > 0 then redis.call('ZREMRANGEBYSCORE', log, '-inf', horizon) end
    local kept = redis.call('HGET', sum, 'used')
    local value = 0
    if redis.call('ZCARD', log) == 0 then
        value = 0
    elseif kept then
        value = tonumber(kept)
        for _, member in ipairs(gone) do value = value - cost_of(member) end
    else
        for _, member in ipairs(redis.call('ZRANGE', log, 0, -1)) do
            value = value + cost_of(member)
        end
    end
    if value < 0 then value = 0 end
    used[i], gone_any[i] = value, #gone > 0 or not kept
    if value + cost > limit + eps then
        local excess, freed, w = value + cost - limit, 0, period
        local rows = redis.call('ZRANGE', log, 0, -1, 'WITHSCORES')
        for j = 1, #rows, 2 do
            freed = freed + cost_of(rows[j])
            if freed >= excess - eps then
                w = math.max(tonumber(rows[j + 1]) + period - at, 0) + margin
                break
            end
        end
        if w > wait then wait = w end
    end
end
if wait > 0 then
    for i = 1, n do
        if gone_any[i] then redis.call('HSET', KEYS[2 * i], 'used', fmt(used[i])) end
    end
    return {0, fmt(at), fmt(wait)}
end
for i = 1, n do
    local log, sum = KEYS[2 * i - 1], KEYS[2 * i]
    local seq = redis.call('HINCRBY', sum, 'seq', 1)
    redis.call('ZADD', log, fmt(at), seq .. ':' .. cost_text)
    redis.call('HSET', sum, 'used', fmt(used[i] + cost))
    if ttl then
        local ms = math.ceil(tonumber(ARGV[5 + 2 * i]) * 1000) + 1000
        redis.call('PEXPIRE', log, ms)
        redis.call('PEXPIRE', sum, ms)
    end
end
return {1, fmt(at), '0'}
"""
)

_USAGE = (
    _LUA_PRELUDE
    + """
local at = clock(ARGV[1])
local total = 0
for _, member in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. fmt(at - tonumber(ARGV[2])),
                                   '+inf')) do
    total = total + cost_of(member)
end
return fmt(total)
"""
)

# KEYS: the leases; ARGV: now or '', limit, lease seconds, lease id, ttl?
_ACQUIRE_LEASE = (
    _LUA_PRELUDE
    + """
local at = clock(ARGV[1])
local limit, seconds = tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', fmt(at))
if redis.call('ZCARD', KEYS[1]) < limit then
    redis.call('ZADD', KEYS[1], fmt(at + seconds), ARGV[4])
    if ARGV[5] == '1' then
        redis.call('PEXPIRE', KEYS[1], math.ceil(seconds * 1000) + 1000)
    end
    return {1, fmt(at), '0'}
end
local first = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
return {0, fmt(at), fmt(math.max(tonumber(first[2]) - at, 0))}
"""
)

_COUNT_LEASES = (
    _LUA_PRELUDE
    + """
local at = clock(ARGV[1])
return redis.call('ZCOUNT', KEYS[1], '(' .. fmt(at), '+inf')
"""
)

_SCRIPTS = (_READ_BREAKER, _RESERVE, _USAGE, _ACQUIRE_LEASE, _COUNT_LEASES)
_SHA = {script: hashlib.sha1(script.encode()).hexdigest() for script in _SCRIPTS}  # noqa: S324


def _text(value: float | None) -> str:
    return "" if value is None else repr(float(value))


def _str(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


class _Connection:
    """One connection (``redis.Connection``), its scripts loaded, its socket timeout settable."""

    def __init__(self, raw: Any) -> None:
        self.raw = raw
        self.timeout: float | None = None

    def bound(self, seconds: float) -> None:
        if seconds != self.timeout:
            self.raw.socket_timeout = seconds
            sock = getattr(self.raw, "_sock", None)
            if sock is not None:
                sock.settimeout(seconds)
            self.timeout = seconds

    def call(self, *args: Any) -> Any:
        self.raw.send_command(*args)
        return self.raw.read_response()

    def pipeline(self, *commands: tuple[Any, ...]) -> list[Any]:
        """Send ``commands`` in one write and read every reply (an error reply raises, and the
        connection is then dropped by the caller: later replies were not read)."""
        self.raw.send_packed_command(self.raw.pack_commands(commands))
        return [self.raw.read_response() for _ in commands]

    def script(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        return self.call("EVALSHA", _SHA[script], len(keys), *keys, *args)

    def close(self) -> None:
        self.raw.disconnect()


class RedisStore:
    """State in one Redis server, shared by every process on every machine.

    Limiter reservations and bulkhead leases are Lua scripts (one atomic step on the server:
    prune, check, add); a breaker update is an optimistic transaction (``WATCH`` the breaker,
    read it, compute the new record in Python, ``MULTI``/``HSET``/``EXEC``; repeated when
    another process changed the breaker meanwhile). Times come from the server's clock
    (``TIME``), so machines need not agree on the time. Limiter logs and leases expire from
    Redis once no entry in them can matter any more.

    Every operation is bounded: the socket's connect and read timeouts are
    :func:`~.base.operation_timeout` (the call's remaining deadline, at most 10 s), and the
    client's own retries are off. Every failure raises ``StoreUnavailable`` (URL redacted).
    One connection per thread and process (a forked child opens its own).
    """

    local_clock = False  # the store's times (the server's, shared by every machine)

    def __init__(self, url: str) -> None:
        self._redis = require_redis()
        self.url = url
        self._connections = PerThread(self._connect)

    def __repr__(self) -> str:
        return f"RedisStore({redact_url(self.url)!r})"

    def _connect(self) -> _Connection:
        redis = self._redis
        options = redis.connection.parse_url(self.url)
        connection_class = options.pop("connection_class", redis.Connection)
        seconds = operation_timeout()
        options.update(
            socket_timeout=seconds,
            socket_connect_timeout=seconds,
            socket_keepalive=True,
            client_name=f"flowstone-resilience-{os.getpid()}",
        )
        raw = connection_class(**options)  # no retry: Retry(NoBackoff(), 0)
        connection = _Connection(raw)
        connection.timeout = seconds
        raw.connect()
        connection.pipeline(*(("SCRIPT", "LOAD", script) for script in _SCRIPTS))
        return connection

    def _run(self, operation: str, work: Callable[[_Connection], T]) -> T:
        """``work`` on this thread's connection, bounded by :func:`~.base.operation_timeout`;
        a failure drops the connection and becomes ``StoreUnavailable``. A script cache
        flushed under us (``NOSCRIPT``) is loaded again, once."""
        redis = self._redis
        for again in (True, False):
            try:
                connection: _Connection = self._connections.get()
                connection.bound(operation_timeout())
                return work(connection)
            except redis.exceptions.NoScriptError as exc:
                self._connections.drop()
                if again:
                    continue
                raise unavailable(self.url, operation, exc) from exc
            except (redis.RedisError, OSError) as exc:
                self._connections.drop()
                raise unavailable(self.url, operation, exc) from exc
            except BaseException:
                self._connections.drop()  # never reuse a connection left mid-transaction
                raise
        raise AssertionError("unreachable")  # pragma: no cover

    # -- breakers ------------------------------------------------------------------------------

    @staticmethod
    def _record(flat: Sequence[Any]) -> BreakerRecord:
        if not flat:
            return BreakerRecord()
        fields = {_str(flat[i]): _str(flat[i + 1]) for i in range(0, len(flat), 2)}
        return BreakerRecord(
            fields.get("state", "closed"),
            int(fields.get("failures", 0)),
            float(fields.get("opened_at", 0.0)),
            fields.get("probe_id") or None,
            float(fields.get("probe_until", 0.0)),
        )

    def read_breaker(self, name: str) -> BreakerRecord:
        key = f"flowstone:breaker:{name}"
        return self._run("read breaker", lambda c: self._record(c.call("HGETALL", key)))

    def update_breaker(
        self,
        name: str,
        update: Callable[[BreakerRecord, float], tuple[BreakerRecord, T]],
        now: float | None = None,
    ) -> T:
        key = f"flowstone:breaker:{name}"
        redis = self._redis

        def work(connection: _Connection) -> T:
            give_up = time.monotonic() + operation_timeout()
            while True:
                _, (at, flat) = connection.pipeline(
                    ("WATCH", key), ("EVALSHA", _SHA[_READ_BREAKER], 1, key, _text(now))
                )
                current = self._record(flat)
                record, result = update(current, float(at))
                if record == current:
                    connection.call("UNWATCH")
                    return result
                fields: list[Any] = [
                    "state", record.state,
                    "failures", record.failures,
                    "opened_at", repr(record.opened_at),
                    "probe_until", repr(record.probe_until),
                ]  # fmt: skip
                if record.probe_id is not None:
                    fields += ["probe_id", record.probe_id]
                replies = connection.pipeline(
                    ("MULTI",), ("DEL", key), ("HSET", key, *fields), ("EXEC",)
                )
                if replies[-1] is not None:
                    return result
                # Another process changed the breaker after our read: read it again.
                if time.monotonic() > give_up:
                    raise redis.exceptions.TimeoutError(
                        f"breaker {name!r} kept changing for {operation_timeout():.3g} s"
                    )

        return self._run("update breaker", work)

    def delete_breaker(self, name: str) -> None:
        self._run("delete breaker", lambda c: c.call("DEL", f"flowstone:breaker:{name}"))

    # -- limiters ------------------------------------------------------------------------------

    def reserve(
        self, name: str, cost: float, limit: float, period: float, now: float | None = None
    ) -> Reservation:
        return self._reserve([(name, limit, period)], cost, now)

    def reserve_all(
        self,
        name: str,
        cost: float,
        windows: Sequence[tuple[float, float]],
        now: float | None = None,
    ) -> Reservation:
        keyed = [(window_key(name, limit, period), limit, period) for limit, period in windows]
        return self._reserve(keyed, cost, now)

    def _reserve(
        self, keyed: Sequence[tuple[str, float, float]], cost: float, now: float | None
    ) -> Reservation:
        keys: list[str] = []
        args: list[Any] = [_text(now), repr(float(cost)), repr(EPSILON), repr(WAIT_MARGIN)]
        # Logs expire on their own only on the server's clock (a caller's clock may run apart).
        args.append("1" if now is None else "0")
        for key, limit, period in keyed:
            keys += [f"flowstone:limiter-log:{key}", f"flowstone:limiter-sum:{key}"]
            args += [repr(float(limit)), repr(float(period))]

        def work(connection: _Connection) -> Reservation:
            admitted, at, wait = connection.script(_RESERVE, keys, args)
            return Reservation(bool(admitted), float(at), float(wait))

        return self._run("reserve", work)

    def limiter_usage(self, name: str, period: float, now: float | None = None) -> float:
        return self._run(
            "read limiter",
            lambda c: float(
                c.script(_USAGE, [f"flowstone:limiter-log:{name}"], [_text(now), repr(period)])
            ),
        )

    def delete_limiter(self, name: str) -> None:
        self._run(
            "delete limiter",
            lambda c: c.call(
                "DEL", f"flowstone:limiter-log:{name}", f"flowstone:limiter-sum:{name}"
            ),
        )

    # -- bulkheads -----------------------------------------------------------------------------

    def acquire_lease(
        self, name: str, limit: int, lease_seconds: float, now: float | None = None
    ) -> Lease:
        lease_id = uuid.uuid4().hex
        args = [_text(now), str(int(limit)), repr(float(lease_seconds)), lease_id]
        args.append("1" if now is None else "0")

        def work(connection: _Connection) -> Lease:
            granted, at, wait = connection.script(
                _ACQUIRE_LEASE, [f"flowstone:leases:{name}"], args
            )
            return Lease(lease_id if granted else None, float(at), float(wait))

        return self._run("acquire lease", work)

    def release_lease(self, name: str, lease_id: str) -> None:
        self._run("release lease", lambda c: c.call("ZREM", f"flowstone:leases:{name}", lease_id))

    def active_leases(self, name: str, now: float | None = None) -> int:
        return self._run(
            "read leases",
            lambda c: int(c.script(_COUNT_LEASES, [f"flowstone:leases:{name}"], [_text(now)])),
        )

    def close(self) -> None:
        self._connections.close_all()
