"""The example project on Dagster's Celery executor: real Celery workers (each in its own
directory, sharing nothing local), the daemon with a queued run coordinator, PostgreSQL
storage and warehouse, Redis as the broker and the resilience store, and a backfill submitted
with ``dagster job backfill`` (:mod:`example_project.cluster.deployment`).

What is asserted comes from the Dagster event log and the source API's own request log: steps
ran on more than one worker, a breaker opened by one worker's failures refused calls on
another, and a shared rate limit held at the server."""

from __future__ import annotations

import itertools
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import dagster as dg
import pytest

from example_project.cluster.deployment import CeleryDeployment
from example_project.cluster.report import step_workers
from example_project.source_api import DAYS
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = [
    pytest.mark.dagster,
    pytest.mark.dbt,
    pytest.mark.postgres,
    pytest.mark.redis,
    pytest.mark.multiprocess,
    pytest.mark.timeout(900),
]
LOADS = ("order_audit", "order_features")  # the steps that call the source API
T = TypeVar("T")


def requests_at_server(deployment: CeleryDeployment) -> list[tuple[float, int]]:
    lines = deployment.requests_log.read_text().split("\n")
    fields = (line.split() for line in lines if line)
    return [(float(at), int(status)) for at, status, _ in fields]


def messages(instance: dg.DagsterInstance, run_id: str) -> dict[str, list[str]]:
    by_step: dict[str, list[str]] = {}
    for entry in instance.all_logs(run_id):
        by_step.setdefault(entry.step_key or "", []).append(entry.user_message)
    return by_step


def test_a_backfill_runs_across_workers_within_a_shared_rate_limit(
    tmp_path: Path, pg_database: PostgresCluster, redis_url: str
) -> None:
    # One call a second to the source API for the whole deployment; every day's first request
    # fails once (503, Retry-After 0.2 s), so retries compete for the same budget.
    deployment = CeleryDeployment(tmp_path, pg_database.url, redis_url, workers=2, source_rate=1)
    with deployment.running():
        backfill_id = deployment.backfill(DAYS)
        runs = deployment.wait(backfill_id, runs=len(DAYS))
        with deployment.instance() as instance:
            assert {run.tags["dagster/partition"]: run.status for run in runs} == {
                day: dg.DagsterRunStatus.SUCCESS for day in DAYS
            }
            workers = {
                worker for run in runs for worker in step_workers(instance, run.run_id).values()
            }
            for run in runs:
                assert set(step_workers(instance, run.run_id)) == {
                    "warehouse",
                    "order_features",
                    "order_audit",
                    "scored_orders",
                    "daily_summary",
                }
    assert len(workers) == 2, f"every step ran on {workers}"
    requests = requests_at_server(deployment)
    # Each day: its first request failed once, then two loads succeeded.
    assert Counter(status for _, status in requests) == {503: len(DAYS), 200: 2 * len(DAYS)}
    # The limiter admits exactly one call per second across both workers (the resilience
    # tests check admissions exactly); at the server, allow 0.2 s of transit jitter.
    times = sorted(at for at, _ in requests)
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    assert min(gaps) > 0.8, f"two requests {min(gaps):.3f} s apart at the server"


def test_a_breaker_opened_on_one_worker_refuses_calls_on_another(
    tmp_path: Path, pg_database: PostgresCluster, redis_url: str
) -> None:
    deployment = CeleryDeployment(
        tmp_path,
        pg_database.url,
        redis_url,
        workers=2,
        inject_failures="outage",  # the source API is down for good
        breaker_timeout=2,
    )
    with deployment.running():
        backfill_id = deployment.backfill(DAYS)
        runs = deployment.wait(backfill_id, runs=len(DAYS))
        failing: dict[str, str] = {}  # worker -> a step whose calls failed there
        refused: dict[str, str] = {}  # worker -> a step refused by the open breaker there
        with deployment.instance() as instance:
            for run in runs:
                assert run.status == dg.DagsterRunStatus.FAILURE
                where = step_workers(instance, run.run_id)
                for step, lines in messages(instance, run.run_id).items():
                    if step not in LOADS:
                        continue
                    if any(line.startswith("flowstone.retry.exhausted") for line in lines):
                        failing[where[step]] = f"{run.tags['dagster/partition']}/{step}"
                    if any("flowstone.circuit.rejected" in line for line in lines):
                        refused[where[step]] = f"{run.tags['dagster/partition']}/{step}"
    assert failing, "no step's calls reached the API and failed"
    assert any(refused_on != failed_on for refused_on in refused for failed_on in failing), (
        f"failures on {failing}, refusals on {refused}: no refusal on another worker"
    )
    # Deployment-wide, the open breaker let through one probe per open period (2 s) after the
    # failures that opened it (3, plus up to 2 attempts already in flight on the other worker).
    times = sorted(at for at, _ in requests_at_server(deployment))
    open_periods = (times[-1] - times[0]) / (0.8 * 2)
    assert len(times) <= 5 + open_periods, f"{len(times)} requests in {times[-1] - times[0]:.1f} s"


def wait_until(condition: Callable[[], T | None], what: str, timeout: float = 600) -> T:
    give_up = time.monotonic() + timeout
    while (value := condition()) is None:
        if time.monotonic() > give_up:
            raise TimeoutError(f"gave up waiting for {what}")
        time.sleep(0.2)
    return value


def test_a_step_process_killed_mid_step_is_run_again_by_a_run_retry(
    tmp_path: Path, pg_database: PostgresCluster, redis_url: str
) -> None:
    deployment = CeleryDeployment(tmp_path, pg_database.url, redis_url, workers=2)
    with deployment.running(), deployment.instance() as instance:
        run_id = deployment.launch(DAYS[1])
        # dbt's build takes seconds: kill -9 the Celery pool process running it (as an OOM
        # kill or a segfault would), mid-step.
        hostname = wait_until(
            lambda: step_workers(instance, run_id).get("warehouse"), "the dbt step to start"
        )
        (killed,) = deployment.pool_processes(deployment.worker(hostname))
        os.kill(killed, signal.SIGKILL)

        def retry_finished() -> dg.DagsterRun | None:
            retries = instance.get_runs(
                filters=dg.RunsFilter(tags={"dagster/parent_run_id": run_id})
            )
            done = [run for run in retries if run.is_finished]
            return done[0] if done else None

        retry = wait_until(retry_finished, "the run's retry")
        original = instance.get_run_by_id(run_id)
        assert original is not None
        assert original.status == dg.DagsterRunStatus.FAILURE
        succeeded = {
            entry.step_key
            for entry in instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        }
        assert "warehouse" not in succeeded  # it really was killed mid-step
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        started = [
            entry.dagster_event.pid
            for entry in instance.all_logs(retry.run_id, of_type=dg.DagsterEventType.STEP_START)
            if entry.step_key == "warehouse" and entry.dagster_event is not None
        ]
        assert started
        assert killed not in started  # run again, in another process
