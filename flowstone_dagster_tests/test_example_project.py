"""The example project: its main job end to end, in process and through the CLI."""

import importlib
import os
import sqlite3
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import dagster as dg
import pytest

from flowstone_dagster_tests.support.postgres import PostgresCluster

ROOT = Path(__file__).resolve().parents[1]
DAYS = ("2025-01-14", "2025-01-15")
ORDERS_ON = {"2025-01-14": 47, "2025-01-15": 39}  # rows of example_project/data/orders.json

DEMO_VARIABLES = (
    "FLOWSTONE_DEMO_API_URL",
    "FLOWSTONE_DEMO_PG_URL",
    "FLOWSTONE_DEMO_WAREHOUSE",
    "FLOWSTONE_RESILIENCE_STORE",
    "FLOWSTONE_LLM_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "SLACK_WEBHOOK_URL",
    "SMTP_HOST",
)


def demo_environment(home: Path) -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in DEMO_VARIABLES}
    return {**environment, "DAGSTER_HOME": str(home)}


@pytest.fixture
def demo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """``example_project.definitions`` loaded with a fresh DAGSTER_HOME, no outside systems,
    and a fresh bundled source API (whose first request per day fails once)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    for name in DEMO_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("FLOWSTONE_DEMO_WAREHOUSE", str(home / "warehouse.duckdb"))
    from example_project import definitions, settings, source_api

    importlib.reload(source_api)
    importlib.reload(settings)
    return importlib.reload(definitions)


def stored_rows(home: Path, table: str, day: str) -> int:
    with sqlite3.connect(home / "warehouse.sqlite3") as connection:
        (count,) = connection.execute(
            f'SELECT count(*) FROM "{table}" WHERE order_date = ?', (day,)
        ).fetchone()
    return int(count)


@pytest.mark.dagster
@pytest.mark.dbt
@pytest.mark.workers
def test_the_main_job_for_two_days_then_a_rerun(demo: ModuleType, tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    job = demo.defs.resolve_job_def("daily_pipeline")
    logs: list[str] = []
    with dg.DagsterInstance.ephemeral() as instance:
        for day in (*DAYS, DAYS[1]):  # the second run of a day replaces its rows
            result = job.execute_in_process(partition_key=day, instance=instance)
            assert result.success
            logs += [entry.user_message for entry in instance.all_logs(result.run_id)]
        features = result.asset_materializations_for_node("order_features")[0].metadata
        scored = result.asset_materializations_for_node("scored_orders")[0].metadata
        summary = result.asset_materializations_for_node("daily_summary")[0].metadata
    assert features["dagster/partition_row_count"].value == ORDERS_ON[DAYS[1]]
    assert scored["flowstone/worker.call/calls"].value == 1
    assert 0 < scored["mean_return_risk"].value < 1
    assert summary["skipped"].value.startswith("LLM summary skipped: set ANTHROPIC_API_KEY")
    assert summary["notified"].value == "log"
    # The injected 503 was retried and recovered, visibly.
    assert any(m.startswith("flowstone.rest.load outcome=ok") and "attempts=2" in m for m in logs)
    assert any("Materialization Succeeded" in m for m in logs)
    for day in DAYS:
        assert stored_rows(home, "order_features", day) == ORDERS_ON[day]
        assert stored_rows(home, "scored_orders", day) == ORDERS_ON[day]


@pytest.mark.dagster
def test_an_unreachable_source_api_fails_clearly(
    demo: ModuleType, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWSTONE_DEMO_API_URL", "http://127.0.0.1:9")
    definitions = importlib.reload(demo)
    job = definitions.defs.resolve_job_def("daily_pipeline")
    with dg.DagsterInstance.ephemeral() as instance:
        result = job.execute_in_process(
            partition_key=DAYS[0],
            instance=instance,
            raise_on_error=False,
            op_selection=["order_audit"],
        )
    assert not result.success
    messages = []
    error = result.failure_data_for_node("order_audit").error  # type: ignore[union-attr]
    while error is not None:
        messages.append(error.message)
        error = error.cause
    text = "\n".join(messages)
    assert "GET http://127.0.0.1:9/raw_orders/2025-01-14" in text
    assert "TransportError" in text


@pytest.mark.dagster
@pytest.mark.dbt
@pytest.mark.workers
def test_make_demo_command_runs_dagster_job_execute_and_reports(tmp_path: Path) -> None:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text((ROOT / "example_project" / "dagster.yaml").read_text())
    result = subprocess.run(
        [sys.executable, "-m", "example_project.demo", DAYS[1]],
        cwd=ROOT,
        env=demo_environment(home),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert f"== partition {DAYS[1]}" in out
    assert "SUCCESS" in out
    assert "flowstone/db.store/calls" in out
    assert "attempts=2" in out  # the retried source API call, from the run's log
    assert "all steps succeeded" in out
    assert (home / f"demo-{DAYS[1]}.log").exists()


@pytest.mark.dagster
def test_definitions_validate_from_the_cli(tmp_path: Path) -> None:
    result = subprocess.run(
        [str(Path(sys.executable).with_name("dagster")), "definitions", "validate"],
        cwd=ROOT,
        env=demo_environment(tmp_path),
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "All code locations passed validation" in result.stderr + result.stdout


@pytest.mark.dagster
@pytest.mark.dbt
@pytest.mark.postgres
@pytest.mark.multiprocess
def test_scale_out_configuration_shares_the_circuit_breaker_across_step_processes(
    tmp_path: Path, pg_database: PostgresCluster
) -> None:
    """PostgreSQL instance storage and resilience store, the multiprocess executor, and a
    source API that is down: the step that fails first opens the shared breaker, and the
    later step (another process) is refused by it and asks Dagster to retry later."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    scale_out = ROOT / "example_project" / "scale_out"
    (home / "dagster.yaml").write_text((scale_out / "dagster.yaml").read_text())
    config = tmp_path / "run_config.yaml"
    config.write_text("execution:\n  config:\n    multiprocess:\n      max_concurrent: 1\n")
    environment = {
        **demo_environment(home),
        "FLOWSTONE_DAGSTER_PG_URL": pg_database.url,
        "FLOWSTONE_RESILIENCE_STORE": pg_database.url,
        "FLOWSTONE_DEMO_INJECT_FAILURES": "outage",
        "FLOWSTONE_DEMO_BREAKER_TIMEOUT": "1",
        "FLOWSTONE_DEMO_WAREHOUSE": str(home / "warehouse.duckdb"),
    }
    result = subprocess.run(
        [
            str(Path(sys.executable).with_name("dagster")),
            "job",
            "execute",
            "-m",
            "example_project",
            "-j",
            "daily_pipeline",
            "-c",
            str(config),
            "--tags",
            '{"dagster/partition": "2025-01-15"}',
        ],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode != 0  # the source API is down for good

    os.environ["FLOWSTONE_DAGSTER_PG_URL"] = pg_database.url
    try:
        with dg.DagsterInstance.from_config(str(home)) as instance:
            (run,) = instance.get_runs()
            steps = {s.step_key: s for s in instance.get_run_step_stats(run.run_id)}
            logs = instance.all_logs(run.run_id)
    finally:
        del os.environ["FLOWSTONE_DAGSTER_PG_URL"]
    assert steps["warehouse"].status is not None
    assert steps["warehouse"].status.value == "SUCCESS"
    by_step: dict[str, list[str]] = {}
    for entry in logs:
        by_step.setdefault(entry.step_key or "", []).append(entry.user_message)
    first, later = sorted(("order_audit", "order_features"), key=lambda k: steps[k].start_time)
    # The first step called the API (3 attempts, 503 each), which opened the shared breaker...
    assert any(
        m.startswith("flowstone.retry.exhausted") and "attempts=3" in m for m in by_step[first]
    )
    assert not any("flowstone.circuit.rejected" in m for m in by_step[first])
    # ...which refused the later step, in another process, without its calls reaching the API.
    assert any("flowstone.circuit.rejected" in m for m in by_step[later])
    retried = [
        entry
        for entry in logs
        if entry.step_key == later
        and entry.dagster_event is not None
        and entry.dagster_event.event_type_value == "STEP_UP_FOR_RETRY"
    ]
    assert retried
