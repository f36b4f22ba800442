"""Empty selections, transient failures retried with ``dbt retry``, diagnostics and target
directory housekeeping, with real dbt-core on DuckDB (the small project: no snapshots)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.dbt import DbtResource, DbtResult
from flowstone_dagster.dbt.errors import (
    DbtNothingSelected,
    DbtTransientFailure,
)
from flowstone_dagster.errors import DbtFailed, MaxAttemptsExceeded, is_retryable
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy

pytestmark = pytest.mark.dbt

SMALL_PROJECT = Path(__file__).parent / "dbt_small_project"


def copy_small_project(destination: Path) -> Path:
    shutil.copytree(SMALL_PROJECT, destination, ignore=shutil.ignore_patterns("target", "logs"))
    return destination


def raw_resilience(name: str, attempts: int = 1) -> ResilienceResource:
    """dbt's own errors (no Dagster mapping), ``attempts`` tries with short waits."""
    return ResilienceResource(
        store_url=f"memory://{name}",
        dagster_errors=False,
        policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=attempts, base_delay=0.1))},
    )


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_small_project(tmp_path_factory.mktemp("dbt-small") / "project")


@pytest.fixture(scope="module")
def dbt(project: Path) -> DbtResource:
    return DbtResource(
        service="dbt", project_dir=str(project), resilience=raw_resilience("dbt-small")
    )


@pytest.fixture(scope="module")
def built(dbt: DbtResource) -> DbtResult:
    return dbt.build()


# -- empty selections ------------------------------------------------------------------------------

#: (command, select, options, the argument blamed or None when the empty result is accepted)
EMPTY_SELECTIONS: list[tuple[str, str | None, dict[str, Any], str | None]] = [
    ("snapshot", None, {}, None),  # the project has no snapshots: nothing to do, not an error
    ("run", "nope", {}, "select"),  # a typo
    ("build", "items", {"exclude": "items"}, "exclude"),  # the exclude emptied it
    ("seed", "items", {}, "select"),  # a model: nothing that `dbt seed` runs
    ("compile", "nope", {}, "select"),  # compile behaves like every other command
    ("ls", "nope", {}, "select"),
    ("run", None, {"selector": "nothing"}, "selector"),
    ("run", "nope", {"allow_empty": True}, None),  # the per-call opt-out
]


@pytest.mark.parametrize(("command", "select", "options", "blamed"), EMPTY_SELECTIONS)
def test_empty_selections(
    dbt: DbtResource,
    built: DbtResult,
    command: str,
    select: str | None,
    options: dict[str, Any],
    blamed: str | None,
) -> None:
    if blamed is None:
        result = dbt.invoke(command, select=select, **options)
        assert result.success
        assert result.nodes == ()
        return
    with pytest.raises(DbtNothingSelected) as raised:
        dbt.invoke(command, select=select, **options)
    assert raised.value.argument == blamed
    assert f"{blamed} " in str(raised.value)
    assert raised.value.exit_code == 0
    assert raised.value.target_path is not None
    assert "allow_empty=True" in str(raised.value)


def test_allow_empty_on_the_resource(project: Path, built: DbtResult) -> None:
    dbt = DbtResource(
        service="dbt",
        project_dir=str(project),
        allow_empty=True,
        resilience=raw_resilience("dbt-allow-empty"),
    )
    assert dbt.run(select="nope").nodes == ()
    with pytest.raises(DbtNothingSelected):  # a call's own setting wins
        dbt.run(select="nope", allow_empty=False)


def test_state_modified_with_nothing_modified_is_an_empty_success(
    dbt: DbtResource, built: DbtResult
) -> None:
    result = dbt.build(select="state:modified+", extra_args=["--state", str(built.target_path)])
    assert result.success
    assert result.nodes == ()


# -- transient failures: only what failed runs again -------------------------------------------


class LockHolder:
    """Another process holding a DuckDB file's lock until :meth:`release`."""

    def __init__(self, path: Path) -> None:
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-c",
                "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
                "c.execute('create table if not exists t (i int)'); print('locked', flush=True); "
                "sys.stdin.read()",
                str(path),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert self.process.stdout is not None
        assert self.process.stdout.readline().strip() == b"locked"

    def release(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            self.process.wait(timeout=60)


@pytest.fixture
def lock_probe(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LockHolder]:
    path = tmp_path / "probe.duckdb"
    monkeypatch.setenv("FLOWSTONE_DBT_LOCK_PROBE", str(path))
    holder = LockHolder(path)
    yield holder
    holder.release()


def test_a_lock_held_by_another_process_is_retried_and_only_the_failed_node_runs_again(
    tmp_path: Path, lock_probe: LockHolder
) -> None:
    project = copy_small_project(tmp_path / "project")
    events: list[telemetry.TelemetryEvent] = []

    def on_event(event: telemetry.TelemetryEvent) -> None:
        events.append(event)
        if event.name == "flowstone.retry":
            lock_probe.release()  # the other process lets go while the retry waits

    dbt = DbtResource(
        service="dbt", project_dir=str(project), resilience=raw_resilience("dbt-lock", 3)
    )
    remove = telemetry.add_listener(on_event)
    try:
        result = dbt.build()
    finally:
        remove()

    assert result.success
    assert result.attempts == 2
    [retry] = [e for e in events if e.name == "flowstone.retry"]
    assert retry.error_type == "DbtTransientFailure"
    # The first invocation: everything but the probe succeeded.
    assert result.previous is not None
    first = {node.name: node.status for node in result.previous.nodes}
    assert first["lock_probe"] == "error"
    assert {status for name, status in first.items() if name != "lock_probe"} == {"success"}
    # The second ran `dbt retry`: only the probe, not the seed nor the other models.
    run_results = orjson.loads((result.target_path / "run_results.json").read_bytes())
    assert [r["unique_id"] for r in run_results["results"]] == ["model.flowstone_small.lock_probe"]
    # The result merges both: every node once, each with its latest status.
    assert sorted(node.name for node in result.nodes) == sorted(first)
    assert {node.status for node in result.nodes} == {"success"}
    assert result.target_path != result.previous.target_path


def test_a_lock_that_stays_held_exhausts_the_attempts_with_a_transient_error(
    tmp_path: Path, lock_probe: LockHolder
) -> None:
    project = copy_small_project(tmp_path / "project")
    dbt = DbtResource(
        service="dbt", project_dir=str(project), resilience=raw_resilience("dbt-lock-held", 2)
    )
    with pytest.raises(MaxAttemptsExceeded) as raised:
        dbt.run(select="lock_probe")
    error = raised.value.__cause__
    assert isinstance(error, DbtTransientFailure)
    assert is_retryable(error)
    assert "Could not set lock on file" in str(error)
    assert "Traceback" not in str(error)
    assert [n["name"] for n in error.failed_nodes] == ["lock_probe"]


# -- diagnostics -----------------------------------------------------------------------------------


def test_dbt_failed_says_where_to_look(tmp_path: Path) -> None:
    project = copy_small_project(tmp_path / "project")
    (project / "models" / "broken.sql").write_text("select no_such_column from {{ ref('items') }}")
    (project / "models" / "after_broken.sql").write_text("select * from {{ ref('broken') }}")
    dbt = DbtResource(
        service="dbt", project_dir=str(project), resilience=raw_resilience("dbt-diagnostics")
    )
    with pytest.raises(DbtFailed) as raised:
        dbt.build(exclude="lock_probe")
    error = raised.value
    assert error.command == "dbt build --exclude lock_probe"
    assert error.target_path is not None
    assert (error.target_path / "run_results.json").is_file()
    assert error.log_path == error.target_path / "dbt.log"
    assert error.log_path.is_file()
    assert error.invocation_id
    assert [n["name"] for n in error.failed_nodes] == ["broken"]
    assert [n["name"] for n in error.skipped_nodes] == ["after_broken"]
    assert {"raw_items", "items", "item_totals", "constants"} <= {
        n["name"] for n in error.succeeded_nodes
    }
    assert error.failed_nodes[0]["compiled_path"].endswith("broken.sql")
    assert str(error.log_path) in str(error)
    assert "no_such_column" in str(error)


# -- housekeeping ----------------------------------------------------------------------------------


def test_only_the_last_target_directories_are_kept_and_failed_ones_longer(tmp_path: Path) -> None:
    project = copy_small_project(tmp_path / "project")
    dbt = DbtResource(
        service="dbt",
        project_dir=str(project),
        keep_target_dirs=2,
        resilience=raw_resilience("dbt-housekeeping"),
    )
    (project / "models" / "broken.sql").write_text("select no_such_column from nowhere")
    with pytest.raises(DbtFailed) as raised:
        dbt.run(select="broken")
    failed_dir = raised.value.target_path
    ran = [dbt.run(select="constants").target_path for _ in range(3)]

    kept = sorted(p for p in (project / "target").iterdir() if p.name.startswith("flowstone-"))
    assert set(kept) == {*ran[-2:], failed_dir}
