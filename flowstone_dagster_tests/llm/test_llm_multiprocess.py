"""Two OS processes share one rpm_limit through a SQLite store: the server never sees more."""

import multiprocessing
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from flowstone_dagster.llm import LLMClient
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.support.llm_servers import llm_server

pytestmark = pytest.mark.multiprocess

KEY = "sk-proj-multiprocess-000222"
RPM = 600  # 10 requests per second, enforced by the server in 1-second windows
CALLS_PER_PROCESS = 15


def make_calls(base_url: str, store_url: str, calls: int, start_at: float) -> int:
    """Run in a spawned process: ``calls`` calls, one at a time, from ``start_at``."""
    client = LLMClient(
        "openai",
        model="gpt-4o-mini",
        api_key=KEY,
        base_url=base_url,
        rpm_limit=RPM,
        resilience=ResilienceResource(
            store_url=store_url,
            default_policy=ServicePolicy(retry=RetryConfig(max_attempts=1)),
            dagster_errors=False,
        ),
    )
    time.sleep(max(start_at - time.time(), 0))  # both processes start together
    done = sum(client.call(f"call {n}") == "ok" for n in range(calls))
    client.close()
    return done


def test_two_processes_share_one_rpm_limit(tmp_path: Path) -> None:
    store_url = f"sqlite://{tmp_path / 'limits.sqlite3'}"
    with llm_server("openai", api_key=KEY, rpm_limit=RPM) as server:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
            start_at = time.time() + 3.0  # after both workers have imported everything
            futures = [
                pool.submit(make_calls, server.base_url, store_url, CALLS_PER_PROCESS, start_at)
                for _ in range(2)
            ]
            assert [future.result(timeout=120) for future in futures] == [CALLS_PER_PROCESS] * 2
    assert server.rejected == []  # the server never had to refuse: no 429
    arrivals = sorted(request.at for request in server.requests)
    assert len(arrivals) == 2 * CALLS_PER_PROCESS
    per_window = RPM // 60
    for index in range(len(arrivals) - per_window):
        # any per_window + 1 requests span more than one second, as the server saw them
        assert arrivals[index + per_window] - arrivals[index] > 1.0
    # 30 calls at 10 per second: the budget was shared, not doubled
    assert arrivals[-1] - arrivals[0] >= 1.9
