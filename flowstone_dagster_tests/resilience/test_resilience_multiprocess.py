"""Breakers and limiters shared by separate OS processes, on SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flowstone_dagster.resilience import Bulkhead, CircuitBreaker, state
from flowstone_dagster_tests import resilience_jobs
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.multiprocess

PROCESSES = 4


@pytest.fixture(scope="module")
def pool() -> Iterator[ProcessPoolExecutor]:
    """Four spawned worker processes, started once for the module (spawn: no inherited state)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=context) as executor:
        # Import everything in every worker before the tests start timing anything.
        list(executor.map(time.sleep, [0.2] * PROCESSES))
        yield executor


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'resilience.sqlite3'}"
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.url


def test_a_breaker_opened_in_one_process_is_open_in_another(
    pool: ProcessPoolExecutor, store_url: str
) -> None:
    name = f"shared-{uuid.uuid4().hex[:8]}"
    opened = pool.submit(resilience_jobs.open_breaker, store_url, name, 3).result(timeout=60)
    assert opened == "open"
    assert pool.submit(resilience_jobs.probe_state, store_url, name).result(timeout=60) == (
        "refused:True"
    )
    # ... and in this process too.
    status = CircuitBreaker(name, timeout=300, store=store_url).status()
    assert (status.state, status.failures) == ("open", 3)


def test_concurrent_failure_counts_are_exact(pool: ProcessPoolExecutor, store_url: str) -> None:
    name = f"counted-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 0.3
    futures = [
        pool.submit(resilience_jobs.record_failures, store_url, name, 1000, 2, start_at)
        for _ in range(PROCESSES)
    ]
    assert sum(future.result(timeout=120) for future in futures) == 4000
    status = state(name, store=store_url)
    assert (status.state, status.failures) == ("closed", 4000)


def test_processes_never_exceed_the_limit_in_any_window(
    pool: ProcessPoolExecutor, store_url: str
) -> None:
    name = f"hammered-{uuid.uuid4().hex[:8]}"
    limit, period, duration = 20, 0.2, 1.5
    start_at = time.time() + 0.3
    futures = [
        pool.submit(
            resilience_jobs.hammer_limiter,
            store_url,
            name=name,
            limit=limit,
            period=period,
            duration=duration,
            start_at=start_at,
            seed=i,
        )
        for i in range(PROCESSES)
    ]
    per_process = [future.result(timeout=120) for future in futures]
    assert all(per_process), "every process was admitted some calls"
    admitted = sorted(entry for entries in per_process for entry in entries)
    # Every window [t, t + period) of admission times holds at most `limit` units.
    times = [at for at, _, _, _ in admitted]
    costs = [cost for _, cost, _, _ in admitted]
    j = 0
    window = 0
    for i, start in enumerate(times):
        while j < len(times) and times[j] < start + period:
            window += costs[j]
            j += 1
        assert window <= limit, f"{window} units in [{start}, {start + period})"
        window -= costs[i]
    # Each admission was decided while its caller was inside acquire().
    assert all(before - 0.05 <= at <= after + 0.05 for at, _, before, after in admitted)
    # And the limiter did not starve the callers: most of the budget was used.
    used = sum(costs)
    budget = limit * (duration / period + 1)
    assert used >= 0.5 * budget, f"only {used} of {budget:.0f} units admitted"


def test_a_bulkhead_never_lets_more_than_max_concurrent_calls_overlap(
    pool: ProcessPoolExecutor, store_url: str
) -> None:
    name = f"bulkhead-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 0.3
    futures = [
        pool.submit(
            resilience_jobs.bulkhead_calls,
            store_url,
            name=name,
            max_concurrent=2,
            calls=8,
            hold=0.03,
            start_at=start_at,
        )
        for _ in range(PROCESSES)
    ]
    intervals = [interval for future in futures for interval in future.result(timeout=120)]
    assert len(intervals) == 8 * PROCESSES
    # Sweep the starts and ends: an end at the same instant as a start comes first.
    edges = sorted([(end, -1) for _, end in intervals] + [(start, 1) for start, _ in intervals])
    running = peak = 0
    for _, step in edges:
        running += step
        peak = max(peak, running)
    assert peak == 2  # never more than 2, and the slots were used in parallel


def test_a_killed_holders_slot_frees_when_its_lease_expires(store_url: str, tmp_path: Path) -> None:
    name = f"killed-{uuid.uuid4().hex[:8]}"
    ready = tmp_path / "ready"
    context = multiprocessing.get_context("spawn")
    holder = context.Process(
        target=resilience_jobs.hold_a_slot_forever, args=(store_url, name, 2.0, str(ready))
    )
    holder.start()
    try:
        give_up = time.monotonic() + 60
        while not ready.exists():
            assert holder.is_alive()
            assert time.monotonic() < give_up
            time.sleep(0.02)
        taken = time.monotonic()
    finally:
        holder.kill()
        holder.join(timeout=30)
    bulkhead = Bulkhead(name, 1, lease_seconds=30.0, store=store_url)
    assert not bulkhead.try_acquire().granted  # the dead process still holds it ...
    lease_id = bulkhead.acquire(max_wait=10.0)  # ... until its 2 s lease expires
    waited = time.monotonic() - taken
    assert 1.5 <= waited < 6.0
    bulkhead.release(lease_id)
    assert bulkhead.active() == 0
