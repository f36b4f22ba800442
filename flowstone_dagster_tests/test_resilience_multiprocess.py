"""Breakers and limiters shared by separate OS processes, on SQLite, PostgreSQL and Redis."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flowstone_dagster.resilience import CircuitBreaker, state
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
