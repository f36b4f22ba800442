"""``@dbt_assets`` materialized with ``dagster.materialize``, through ``DbtResource.stream`` and
``stream_dbt``, with real dbt-core 1.11 on DuckDB."""

import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest
from dagster_dbt import DbtCliResource, dbt_assets

from flowstone_dagster import telemetry
from flowstone_dagster.dbt import DbtResource, stream_dbt
from flowstone_dagster.errors import CallTimeout

pytestmark = [pytest.mark.dbt, pytest.mark.dagster]

FIXTURE_PROJECT = Path(__file__).parent / "dbt_project"
HEALTHY = {"raw_orders", "raw_customers", "stg_orders", "stg_customers", "customer_revenue"}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    destination = tmp_path_factory.mktemp("dbt_dagster") / "project"
    shutil.copytree(FIXTURE_PROJECT, destination, ignore=shutil.ignore_patterns("target", "logs"))
    return destination


@pytest.fixture(scope="module")
def manifest(project: Path) -> Path:
    """The project's manifest, from `dbt parse` run through the resource."""
    result = DbtResource(project_dir=str(project)).invoke("parse")
    return result.target_path / "manifest.json"


@pytest.fixture
def captured() -> Iterator[list[telemetry.TelemetryEvent]]:
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    yield events
    remove()


def _materialized(result: dg.ExecuteInProcessResult) -> dict[str, dict[str, Any]]:
    return {
        event.asset_key.path[-1]: event.materialization.metadata
        for event in result.get_asset_materialization_events()
        if event.asset_key is not None
    }


def test_dbt_assets_build_through_the_resource(
    project: Path,
    manifest: Path,
    dagster_instance: dg.DagsterInstance,
    captured: list[telemetry.TelemetryEvent],
) -> None:
    @dbt_assets(manifest=manifest, exclude="tag:deliberately_failing tag:deliberately_slow")
    def analytics(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["build"], context=context)

    result = dg.materialize(
        [analytics],
        resources={"dbt": DbtResource(project_dir=str(project))},
        instance=dagster_instance,
    )

    assert result.success
    materialized = _materialized(result)
    assert set(materialized) == HEALTHY
    revenue = materialized["customer_revenue"]
    # One key per fact: the status and the duration are dagster-dbt's, not repeated as ours.
    assert revenue["status"].value == "success"
    assert revenue["Execution Duration"].value > 0
    assert "flowstone/dbt.node/status" not in revenue
    assert "flowstone/dbt.node/execution_time_s" not in revenue
    assert revenue["flowstone/dbt.command/attempts"].value == 1
    assert revenue["unique_id"].value == "model.flowstone_fixture.customer_revenue"  # dagster-dbt's
    assert materialized["raw_orders"]["flowstone/dbt.node/message"].value == "INSERT 5"
    checks = result.get_asset_check_evaluations()
    assert len(checks) == 5
    assert all(check.passed for check in checks)

    [command] = [e for e in captured if e.name == "flowstone.dbt.command"]
    assert command.outcome == "ok"
    assert command.measures["command"] == "build"
    assert command.measures["nodes"] == 10
    nodes = [e for e in captured if e.name == "flowstone.dbt.node"]
    assert len(nodes) == 10
    assert {e.measures["resource_type"] for e in nodes} == {"seed", "model", "test"}


def test_dbt_assets_failure_fails_the_step_with_the_failed_nodes(
    project: Path, manifest: Path, dagster_instance: dg.DagsterInstance
) -> None:
    @dbt_assets(manifest=manifest, select="tag:deliberately_failing")
    def failing(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["build"], context=context)

    result = dg.materialize(
        [failing],
        resources={"dbt": DbtResource(project_dir=str(project))},
        instance=dagster_instance,
        raise_on_error=False,
    )

    assert not result.success
    # The healthy node of the selection still materialized before the step failed.
    assert set(_materialized(result)) == {"revenue_targets"}
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data
    assert data.user_failure_data is not None
    metadata = data.user_failure_data.metadata
    assert metadata["flowstone/dbt.command/exit_code"].value == 1
    # The command with the selection dagster-dbt gave dbt, the target directory and the log.
    assert "--select" in metadata["flowstone/dbt.command/command"].value
    assert metadata["flowstone/dbt.command/log_path"].value.endswith("dbt.log")
    assert "flowstone/dbt.command/target_path" in metadata
    assert metadata["flowstone/error_type"].value == "DbtFailed"
    assert metadata["flowstone/retryable"].value is False
    broken = metadata["flowstone/dbt.command/failed/model.flowstone_fixture.broken_model"].value
    assert "no_such_column" in broken
    assert "compiled/flowstone_fixture/models/broken_model.sql" in broken
    assert "flowstone/dbt.command/failed/test.flowstone_fixture.revenue_meets_target" in metadata
    assert data.error is not None
    assert "DbtFailed" in (data.error.cause.cls_name if data.error.cause else "")


def _write_wrapper(path: Path, pid_file: Path) -> Path:
    """A dbt wrapper (like `uv run dbt`) that runs dbt as a child which ignores SIGINT.

    It answers `--version` itself: DbtCliResource asks for it, and dbt's own answer includes a
    lookup of the latest release on PyPI, which tests must not make.
    """
    dbt_path = shutil.which("dbt") or str(Path(sys.executable).parent / "dbt")
    path.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "Core:"; echo "  - installed: 1.11.16"; exit 0; fi\n'
        f'echo $$ > "{pid_file}"\n'
        f'"{dbt_path}" "$@" &\n'
        f'echo $! >> "{pid_file}"\n'
        "wait $!\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _running(pid: int, marker: str) -> bool:
    """A live (not zombie) process whose command line has ``marker`` (pids get reused)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and marker in command_line


def test_stream_dbt_with_a_plain_dbt_cli_resource_times_out_and_stops_dbt_and_its_children(
    project: Path, manifest: Path, dagster_instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    wrapper = _write_wrapper(tmp_path / "dbt-wrapper", pid_file)

    @dbt_assets(manifest=manifest, select="tag:deliberately_slow")
    def slow(context: dg.AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
        yield from stream_dbt(context, dbt, ["run"], timeout=5.0, kill_grace=1.0)

    result = dg.materialize(
        [slow],
        resources={"dbt": DbtCliResource(project_dir=str(project), dbt_executable=str(wrapper))},
        instance=dagster_instance,
        raise_on_error=False,
    )

    assert not result.success
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data
    assert data.user_failure_data is not None
    assert data.user_failure_data.metadata["flowstone/error_type"].value == "CallTimeout"
    assert data.error is not None
    assert data.error.cause is not None
    assert data.error.cause.cls_name == CallTimeout.__name__
    wrapper_pid, dbt_pid = (int(line) for line in pid_file.read_text().split())
    # DbtCliResource starts dbt in Dagster's process group: the descendants are found in /proc.
    assert not _running(wrapper_pid, "slow_model")
    assert not _running(dbt_pid, "slow_model")


def test_a_missing_project_fails_at_resource_set_up(
    tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    ran: list[str] = []

    @dg.asset
    def models(dbt: DbtResource) -> None:
        ran.append("body")  # never reached: the resource fails first
        dbt.run()

    result = dg.materialize(
        [models],
        resources={"dbt": DbtResource(project_dir=str(tmp_path / "no_project"))},
        instance=dagster_instance,
        raise_on_error=False,
    )

    assert not result.success
    assert ran == []
    [init_failure] = [
        event for event in result.all_events if event.event_type_value == "RESOURCE_INIT_FAILURE"
    ]
    error = init_failure.event_specific_data.error
    assert error is not None
    causes = []
    while error is not None:
        causes.append((error.cls_name, error.message))
        error = error.cause
    assert any(
        name == "DbtProjectNotFound"
        and "[dbt] project_dir: " in message
        and "no_project does not exist" in message
        for name, message in causes
    ), causes


def test_stream_chains_fetch_row_counts_and_column_metadata(
    project: Path, manifest: Path, dagster_instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """stream() is dagster-dbt's DbtEventIterator: row counts and column schemas as with plain
    dagster-dbt, and still flowstone's metadata and outcome checks."""
    # A database of its own (named like the manifest's catalog): dagster-dbt's in-process
    # DuckDB adapter keeps the file it counted rows in open after the step (plain dagster-dbt
    # too), and later tests' dbt processes must write the module's database.
    database = tmp_path / "fixture.duckdb"
    dbt = DbtResource(project_dir=str(project), vars={"duckdb_path": str(database)})

    @dbt_assets(manifest=manifest, exclude="tag:deliberately_failing tag:deliberately_slow")
    def analytics(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["build"], context=context).fetch_row_counts().fetch_column_metadata()

    result = dg.materialize([analytics], resources={"dbt": dbt}, instance=dagster_instance)

    assert result.success
    materialized = _materialized(result)
    assert set(materialized) == HEALTHY
    assert materialized["raw_orders"]["dagster/row_count"].value == 5
    assert materialized["raw_customers"]["dagster/row_count"].value == 3
    assert materialized["customer_revenue"]["dagster/row_count"].value == 3
    columns = materialized["customer_revenue"]["dagster/column_schema"].value.columns
    assert {column.name for column in columns} >= {"name", "revenue"}
    assert materialized["customer_revenue"]["flowstone/dbt.command/attempts"].value == 1


def test_an_asset_subset_without_seeds_runs_seed_then_run_without_error(
    project: Path, manifest: Path, dagster_instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    """`dbt seed` on a subset with no seeds has nothing to do: not an error (dagster issue
    18184)."""
    # A database of its own: after fetch_row_counts, dagster-dbt's in-process DuckDB adapter
    # keeps the file open (plain dagster-dbt too), so no later dbt process could write it.
    dbt = DbtResource(project_dir=str(project), vars={"duckdb_path": str(tmp_path / "db.duckdb")})
    dbt.seed()

    @dbt_assets(manifest=manifest, exclude="tag:deliberately_failing tag:deliberately_slow")
    def analytics(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["seed"], context=context)
        yield from dbt.stream(["run"], context=context)

    result = dg.materialize(
        [analytics],
        selection=["stg_orders", "stg_customers"],
        resources={"dbt": dbt},
        instance=dagster_instance,
    )
    assert result.success
    assert set(_materialized(result)) == {"stg_orders", "stg_customers"}


def test_stream_starts_dbt_in_a_session_of_its_own_and_a_timeout_stops_the_group(
    project: Path, manifest: Path, dagster_instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    pid_file = tmp_path / "pids"
    wrapper = _write_wrapper(tmp_path / "dbt-wrapper", pid_file)
    session_file = tmp_path / "session"
    # The wrapper also records its session id (field 6 of /proc/<pid>/stat).
    script = wrapper.read_text().replace(
        f'echo $$ > "{pid_file}"\n',
        f'echo $$ > "{pid_file}"\nawk \'{{print $6}}\' /proc/$$/stat > "{session_file}"\n',
    )
    wrapper.write_text(script)

    @dbt_assets(manifest=manifest, select="tag:deliberately_slow")
    def slow(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["run"], context=context, timeout=5.0)

    result = dg.materialize(
        [slow],
        resources={
            "dbt": DbtResource(
                project_dir=str(project), dbt_executable=str(wrapper), kill_grace=1.0
            )
        },
        instance=dagster_instance,
        raise_on_error=False,
    )

    assert not result.success
    [failure] = result.get_step_failure_events()
    assert failure.step_failure_data.user_failure_data is not None
    metadata = failure.step_failure_data.user_failure_data.metadata
    assert metadata["flowstone/error_type"].value == "CallTimeout"
    wrapper_pid, dbt_pid = (int(line) for line in pid_file.read_text().split())
    # dagster-dbt started the launcher, which exec'd the wrapper under setsid: it leads its
    # own session (and group), which the timeout stopped as a whole.
    assert int(session_file.read_text()) == wrapper_pid
    assert not _running(wrapper_pid, "slow_model")
    assert not _running(dbt_pid, "slow_model")


SLOW_PROJECT = Path(__file__).parent / "dbt_slow_project"


def test_stream_timeout_none_means_no_limit(
    tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    """The resource says 2 s; the call's timeout=None lifts it for the 8 s model."""
    slow_project = shutil.copytree(
        SLOW_PROJECT, tmp_path / "slow", ignore=shutil.ignore_patterns("target", "logs")
    )
    parsed = DbtResource(project_dir=str(slow_project), profiles_dir=str(slow_project))
    slow_manifest = parsed.invoke("parse").target_path / "manifest.json"
    dbt = DbtResource(project_dir=str(slow_project), profiles_dir=str(slow_project), timeout=2.0)

    @dbt_assets(manifest=slow_manifest)
    def sleepy(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["run"], context=context, timeout=None)

    result = dg.materialize([sleepy], resources={"dbt": dbt}, instance=dagster_instance)
    assert result.success
    assert set(_materialized(result)) == {"sleepy_model"}
