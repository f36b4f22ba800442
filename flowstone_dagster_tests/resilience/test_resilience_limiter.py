"""Rate limiters: modes, waits, costs, and a model-based property test on every store."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, RateLimited
from flowstone_dagster.resilience import RateLimiter, RateLimitExceeded, StateStore, open_store
from flowstone_dagster_tests.support.postgres import PostgresCluster


@pytest.fixture
def name() -> str:
    return f"limit-{uuid.uuid4().hex[:8]}"


def test_reject_mode_raises_with_the_wait(store_url: str, name: str) -> None:
    limiter = RateLimiter(name, limit=3, period=10.0, mode="reject", store=store_url)
    for _ in range(3):
        limiter.acquire()
    with pytest.raises(RateLimitExceeded) as caught:
        limiter.acquire()
    assert isinstance(caught.value, RateLimited)
    assert 9.0 < caught.value.retry_after <= 10.01
    assert limiter.usage() == 3


def test_wait_mode_goes_as_soon_as_capacity_frees(store_url: str, name: str) -> None:
    limiter = RateLimiter(name, limit=2, period=0.3, store=store_url)
    started = time.monotonic()
    first = [limiter.acquire() for _ in range(2)]
    third = limiter.acquire()  # waits for the first reservation to leave the window
    elapsed = time.monotonic() - started
    assert third - first[0] >= 0.3
    assert 0.29 <= elapsed < 0.6  # no oversleeping


def test_waits_are_computed_not_polled(name: str) -> None:
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:
        sleeps.append(seconds)
        time.sleep(seconds)

    limiter = RateLimiter(name, limit=1, period=0.2, store="memory://", sleep=sleep)
    limiter.acquire()
    limiter.acquire()
    assert len(sleeps) == 1
    assert 0.15 < sleeps[0] <= 0.21


def test_a_wait_beyond_max_wait_is_refused_at_once(store_url: str, name: str) -> None:
    limiter = RateLimiter(name, limit=1, period=30.0, max_wait=1.0, store=store_url)
    limiter.acquire()
    started = time.monotonic()
    with pytest.raises(RateLimitExceeded) as caught:
        limiter.acquire()
    assert time.monotonic() - started < 0.5
    assert caught.value.retry_after > 29


def test_costs(store_url: str, name: str) -> None:
    limiter = RateLimiter(name, limit=10, period=60.0, mode="reject", store=store_url)
    limiter.acquire(cost=7)
    limiter.acquire(cost=3)
    with pytest.raises(RateLimitExceeded):
        limiter.acquire(cost=1)
    with pytest.raises(ConfigurationError, match="cost: 11 is more than the limit 10"):
        limiter.acquire(cost=11)
    with pytest.raises(ConfigurationError, match="cost"):
        limiter.acquire(cost=0)


def test_context_manager_decorator_and_reset(name: str) -> None:
    limiter = RateLimiter(name, limit=2, period=60.0, mode="reject", store="memory://")
    with limiter:
        pass

    @limiter
    def call() -> str:
        return "called"

    assert call() == "called"
    with pytest.raises(RateLimitExceeded):
        call()
    limiter.reset()
    assert call() == "called"


def test_threads_never_exceed_the_limit(store_url: str, name: str) -> None:
    limit, period = 5, 0.25
    admitted: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        limiter = RateLimiter(name, limit=limit, period=period, store=store_url)
        for _ in range(4):
            at = limiter.acquire()
            with lock:
                admitted.append(at)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    admitted.sort()
    assert len(admitted) == 16
    for i, start in enumerate(admitted):
        in_window = [t for t in admitted[i:] if t < start + period]
        assert len(in_window) <= limit


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigurationError, match="limit"):
        RateLimiter("x", limit=0, store="memory://")
    with pytest.raises(ConfigurationError, match="period"):
        RateLimiter("x", limit=1, period=0, store="memory://")
    with pytest.raises(ConfigurationError, match="mode"):
        RateLimiter("x", limit=1, mode="block", store="memory://")  # type: ignore[arg-type]


def test_telemetry(name: str, events: list[telemetry.TelemetryEvent]) -> None:
    limiter = RateLimiter(name, limit=1, period=0.05, max_wait=1, store="memory://")
    limiter.acquire()
    limiter.acquire()
    (waited,) = [e for e in events if e.name == "flowstone.ratelimit.wait"]
    assert waited.measures["limiter"] == name
    assert waited.measures["wait_s"] > 0.03
    limiter.mode = "reject"
    with pytest.raises(RateLimitExceeded):
        limiter.acquire()
    (rejected,) = [e for e in events if e.name == "flowstone.ratelimit.rejected"]
    assert rejected.error_type == "RateLimitExceeded"
    assert rejected.measures["retry_after_s"] > 0


# -- the model -----------------------------------------------------------------------------------


def run_limiter_model(store: StateStore, examples: int) -> None:
    class LimiterMachine(RuleBasedStateMachine):
        """Times are multiples of 1/4 s, so every sum and comparison is exact in binary."""

        def __init__(self) -> None:
            super().__init__()
            self.now = 1_000_000.0
            self.log: list[tuple[float, int]] = []  # the model's admitted reservations
            self.limiter: RateLimiter | None = None

        @initialize(limit=st.integers(1, 5), period=st.sampled_from([0.5, 1.0, 2.5]))
        def setup(self, limit: int, period: float) -> None:
            self.limiter = RateLimiter(
                f"model-{uuid.uuid4().hex}",
                limit=limit,
                period=period,
                mode="reject",
                store=store,
                clock=lambda: self.now,
            )

        def _limiter(self) -> RateLimiter:
            assert self.limiter is not None
            return self.limiter

        def _used(self, at: float) -> int:
            return sum(cost for ts, cost in self.log if ts > at - self._limiter().period)

        @rule(seconds=st.sampled_from([0.0, 0.25, 0.5, 1.0, 2.5]))
        def advance(self, seconds: float) -> None:
            self.now += seconds

        @rule(data=st.data())
        def acquire(self, data: st.DataObject) -> None:
            limiter = self._limiter()
            cost = data.draw(st.integers(1, int(limiter.limit)))
            reservation = limiter.try_acquire(cost)
            fits = self._used(self.now) + cost <= limiter.limit
            assert reservation.admitted == fits
            if fits:
                assert reservation.at == self.now
                self.log.append((self.now, cost))
                return
            # The wait is the earliest moment the cost fits, to within the margin.
            later = self.now + reservation.wait
            assert self._used(later) + cost <= limiter.limit
            live = sorted(ts + limiter.period for ts, _ in self.log)
            earliest = min(
                t for t in live if t > self.now and self._used(t) + cost <= limiter.limit
            )
            assert reservation.wait == pytest.approx(earliest - self.now, abs=1e-3)

        @invariant()
        def no_window_exceeds_the_limit(self) -> None:
            if self.limiter is None:
                return
            period = self.limiter.period
            for start, _ in self.log:
                in_window = sum(c for ts, c in self.log if start <= ts < start + period)
                assert in_window <= self.limiter.limit
            assert self.limiter.usage() == self._used(self.now)

    run_state_machine_as_test(
        LimiterMachine,
        settings=settings(max_examples=examples, stateful_step_count=30, deadline=None),
    )


def test_limiter_matches_the_model_in_memory() -> None:
    run_limiter_model(open_store(f"memory://{uuid.uuid4().hex}"), examples=150)


def test_limiter_matches_the_model_on_sqlite(tmp_path: Path) -> None:
    run_limiter_model(open_store(f"sqlite://{tmp_path / 'model.sqlite3'}"), examples=60)


@pytest.mark.postgres
def test_limiter_matches_the_model_on_postgresql(pg_database: PostgresCluster) -> None:
    run_limiter_model(open_store(pg_database.url), examples=40)


@pytest.mark.redis
def test_limiter_matches_the_model_on_redis(redis_url: str) -> None:
    run_limiter_model(open_store(redis_url), examples=60)
