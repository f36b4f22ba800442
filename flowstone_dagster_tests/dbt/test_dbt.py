"""``DbtResource`` with real dbt-core 1.11 on DuckDB, on a copy of the fixture project.

One copy of the project is built once per module (seeds, models, tests); the tests then run
single commands against it. Tests that need a pristine or broken project make their own copy.
"""

from __future__ import annotations

import shutil
import stat
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.dbt import DbtResource, DbtResult
from flowstone_dagster.dbt.errors import (
    DbtExecutableNotFound,
    DbtNothingSelected,
    DbtProfileNotFound,
    DbtProjectNotFound,
)
from flowstone_dagster.dbt.resource import _effective_timeout
from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    DbtFailed,
    is_retryable,
)
from flowstone_dagster.resilience import (
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    deadline_scope,
)

pytestmark = pytest.mark.dbt

FIXTURE_PROJECT = Path(__file__).parent / "dbt_project"
SLOW_PROJECT = Path(__file__).parent / "dbt_slow_project"


def copy_project(destination: Path) -> Path:
    """A copy of the fixture project (dbt writes target/ and logs/ into the project)."""
    shutil.copytree(FIXTURE_PROJECT, destination, ignore=shutil.ignore_patterns("target", "logs"))
    return destination


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return copy_project(tmp_path_factory.mktemp("dbt") / "project")


@pytest.fixture(scope="module")
def dbt(project: Path) -> DbtResource:
    return DbtResource(project_dir=str(project), profiles_dir=str(project), timeout=300)


@pytest.fixture(scope="module")
def built(dbt: DbtResource) -> tuple[DbtResult, list[telemetry.TelemetryEvent]]:
    """``dbt build`` of the healthy nodes, once, with the telemetry it emitted."""
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        result = dbt.build()
    finally:
        remove()
    return result, events


def dbt_error(raised: pytest.ExceptionInfo[dg.Failure]) -> BaseException:
    """The dbt error a Dagster ``Failure`` stands for (the one mapping: what escapes a call is
    Dagster control flow unless the resilience resource's ``dagster_errors`` is off)."""
    cause = raised.value.__cause__
    assert cause is not None
    return cause


@pytest.fixture
def captured() -> Iterator[list[telemetry.TelemetryEvent]]:
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    yield events
    remove()


# -- a model run, a missing model, dbt tests -------------------------------------------------------


def test_runs_dbt_model_successfully(dbt: DbtResource, built: object, project: Path) -> None:
    result = dbt.run_model("customer_revenue", project_dir=str(project))

    assert result.models_run > 0
    assert result.errors == []
    assert result.models_run == 1
    [node] = result.nodes
    assert node.unique_id == "model.flowstone_fixture.customer_revenue"
    assert (node.name, node.resource_type, node.status, node.message) == (
        "customer_revenue",
        "model",
        "success",
        "OK",
    )
    assert node.execution_time > 0
    assert node.relation_name == '"fixture"."main"."customer_revenue"'
    assert node.compiled_path is not None
    assert "from" in Path(node.compiled_path).read_text().lower()
    assert result.exit_code == 0
    assert result.success
    assert result.elapsed > node.execution_time
    assert result.attempts == 1
    # The truth came from this invocation's own run_results.json, under the project's target/.
    assert (result.target_path / "run_results.json").is_file()
    assert result.target_path.parent == project / "target"
    assert result.invocation_id
    assert "Completed successfully" in result.output
    assert result.summary().models_run == 1


def test_detects_dbt_failures(dbt: DbtResource, built: object) -> None:
    """A model that does not exist: dbt warns and exits 0; we raise."""
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("nonexistent_model")

    assert raised.value.allow_retries is False
    error = dbt_error(raised)
    assert isinstance(error, DbtNothingSelected)
    assert "matches no enabled node" in str(error)
    assert error.argument == "select"
    assert "nonexistent_model" in str(error)
    assert error.exit_code == 0  # what dbt itself returned
    assert (
        "The selection criterion 'nonexistent_model' does not match any enabled nodes"
        in error.output
    )
    assert "Nothing to do" in error.output
    assert not is_retryable(error)


def test_runs_dbt_tests(dbt: DbtResource, built: object) -> None:
    result = dbt.test_model("customer_revenue")

    assert "PASS" in result.output
    assert result.errors == []
    assert sorted(test.name for test in result.tests) == [
        "not_null_customer_revenue_customer_id",
        "not_null_customer_revenue_revenue",
        "unique_customer_revenue_customer_id",
    ]
    assert {(test.status, test.failures) for test in result.tests} == {("pass", 0)}
    assert result.summary().passed == 3
    assert result.models_run == 0


# -- results from run_results.json -----------------------------------------------------------------


def test_build_results_per_node(built: tuple[DbtResult, list[telemetry.TelemetryEvent]]) -> None:
    result, _ = built
    by_name = {node.name: node for node in result.nodes}
    assert by_name["raw_orders"].resource_type == "seed"
    assert by_name["raw_orders"].rows_affected == 5  # the adapter's count: the CSV's 5 rows
    assert by_name["raw_customers"].rows_affected == 3
    models = {"stg_orders", "stg_customers", "customer_revenue"}
    assert {n.name for n in result.nodes if n.resource_type == "model"} == models
    assert result.models_run == 3
    assert len(result.tests) == 5
    assert result.count("pass") == 5
    assert result.count("success") == 5
    # The deliberately failing and slow nodes are not in the default selection.
    assert not {"broken_model", "revenue_targets", "slow_model", "revenue_meets_target"} & set(
        by_name
    )


def test_telemetry_one_command_event_and_one_node_event_per_node(
    built: tuple[DbtResult, list[telemetry.TelemetryEvent]],
) -> None:
    result, events = built
    [command] = [e for e in events if e.name == "flowstone.dbt.command"]
    assert command.outcome == "ok"
    assert command.attempts == 1
    assert command.duration_s > 0
    assert dict(command.measures) == {
        "command": "build",
        "service": "dbt:project:default",  # the project and its target: its warehouse
        "exit_code": 0,
        "nodes": 10,
        "models_run": 3,
        "failed": 0,
        "tests": 5,
    }
    nodes = [e for e in events if e.name == "flowstone.dbt.node"]
    assert sorted(e.measures["unique_id"] for e in nodes) == sorted(
        n.unique_id for n in result.nodes
    )
    kinds = sorted({e.measures["resource_type"] for e in nodes})
    assert kinds == ["model", "seed", "test"]
    seed = next(e for e in nodes if e.measures["unique_id"].endswith("raw_orders"))
    assert seed.outcome == "ok"
    assert seed.measures["status"] == "success"
    assert seed.measures["rows_affected"] == 5
    assert seed.duration_s == pytest.approx(seed.measures["execution_time_s"], abs=1e-5)


def test_options_reach_dbt(dbt: DbtResource, built: object, tmp_path: Path) -> None:
    other_database = tmp_path / "other.duckdb"
    result = dbt.seed(
        select="raw_customers",
        vars={"duckdb_path": str(other_database)},
        threads=1,
        full_refresh=True,
    )
    # The profile reads var('duckdb_path'): the seed landed in the other database file.
    assert other_database.is_file()
    assert [n.name for n in result.nodes] == ["raw_customers"]
    assert result.command[:4] == ("dbt", "seed", "--select", "raw_customers")
    assert "--full-refresh" in result.command
    assert result.command[result.command.index("--threads") + 1] == "1"
    # vars may hold secrets: shown as a placeholder, never their values.
    assert result.command[result.command.index("--vars") + 1] == "<vars>"
    assert str(other_database) not in " ".join(result.command)


def test_a_criterion_that_matches_nothing_next_to_one_that_matches_is_a_warning(
    dbt: DbtResource, built: object
) -> None:
    result = dbt.run("stg_customers no_such_model")
    assert [n.name for n in result.nodes] == ["stg_customers"]
    assert result.warnings == (
        "The selection criterion 'no_such_model' does not match any enabled nodes",
    )


# -- failures --------------------------------------------------------------------------------------


def test_failing_model_raises_dbt_failed_with_the_node(
    dbt: DbtResource, built: object, captured: list[telemetry.TelemetryEvent]
) -> None:
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("broken_model")

    failure = raised.value
    assert failure.allow_retries is False
    assert failure.metadata["flowstone/dbt.command/exit_code"].value == 1
    assert "no_such_column" in str(
        failure.metadata["flowstone/dbt.command/failed/model.flowstone_fixture.broken_model"].value
    )
    error = dbt_error(raised)
    assert type(error) is DbtFailed
    assert error.exit_code == 1
    assert "broken_model (error)" in str(error)
    assert 'Referenced column "no_such_column" not found' in str(error)
    [node] = error.failed_nodes
    assert node["unique_id"] == "model.flowstone_fixture.broken_model"
    assert node["status"] == "error"
    assert "no_such_column" in node["message"]
    assert (
        Path(node["compiled_path"])
        .read_text()
        .strip()
        .endswith('select no_such_column from "fixture"."main"."stg_orders"')
    )
    assert "Completed with 1 error" in error.output
    assert not is_retryable(error)
    [command] = [e for e in captured if e.name == "flowstone.dbt.command"]
    assert (command.outcome, command.error_type) == ("error", "DbtFailed")
    [node_event] = [e for e in captured if e.name == "flowstone.dbt.node"]
    assert (node_event.outcome, node_event.measures["status"]) == ("error", "error")


def test_failing_test_raises_with_its_failure_count(dbt: DbtResource, built: object) -> None:
    with pytest.raises(dg.Failure) as raised:
        dbt.build("revenue_targets+")

    error = dbt_error(raised)
    assert isinstance(error, DbtFailed)
    assert error.exit_code == 1
    [node] = error.failed_nodes
    assert node["unique_id"] == "test.flowstone_fixture.revenue_meets_target"
    assert (node["status"], node["failures"]) == ("fail", 3)
    assert node["message"] == "Got 3 results, configured to fail if != 0"
    assert Path(node["compiled_path"]).is_file()


def test_sql_errors_and_test_failures_are_not_retried(
    project: Path, built: object, captured: list[telemetry.TelemetryEvent]
) -> None:
    dbt = DbtResource(
        service="dbt",  # the policies below are keyed by it
        project_dir=str(project),
        resilience=ResilienceResource(
            store_url="memory://dbt-no-retry",
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.01))},
        ),
    )
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("broken_model")
    assert isinstance(dbt_error(raised), DbtFailed)
    with pytest.raises(dg.Failure) as raised:
        dbt.test("revenue_meets_target")
    assert isinstance(dbt_error(raised), DbtFailed)

    commands = [e for e in captured if e.name == "flowstone.dbt.command"]
    assert [e.attempts for e in commands] == [1, 1]
    assert not [e for e in captured if e.name == "flowstone.retry"]
    # The warehouse answered: for the breaker these calls succeeded.
    assert dbt.resilience is not None
    breaker = dbt.resilience.breaker("dbt")
    assert breaker is not None
    assert breaker.status().failures == 0


# -- set-up errors, before anything runs -----------------------------------------------------------


def test_missing_project(tmp_path: Path) -> None:
    dbt = DbtResource(project_dir=str(tmp_path / "nowhere"))
    with pytest.raises(DbtProjectNotFound) as raised:
        dbt.run_model("orders")
    assert isinstance(raised.value, ConfigurationError)
    assert raised.value.field == "project_dir"
    assert "does not exist" in str(raised.value)
    assert "dbt_project.yml" in str(raised.value)

    (tmp_path / "empty").mkdir()
    with pytest.raises(DbtProjectNotFound, match=r"holds no dbt_project\.yml"):
        DbtResource(project_dir=str(tmp_path / "empty")).run()
    assert list((tmp_path / "empty").iterdir()) == []  # dbt never started


def test_missing_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    project = copy_project(tmp_path / "project")
    (project / "profiles.yml").unlink()
    monkeypatch.delenv("DBT_PROFILES_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.dbt/profiles.yml either

    with pytest.raises(DbtProfileNotFound) as raised:
        DbtResource(project_dir=str(project)).run()
    assert raised.value.field == "profiles_dir"
    assert "no profiles.yml in" in str(raised.value)
    assert not (project / "target").exists()  # dbt never started

    shutil.copy(FIXTURE_PROJECT / "profiles.yml", tmp_path / "profiles.yml")
    with pytest.raises(DbtProfileNotFound) as raised:
        DbtResource(project_dir=str(project), profiles_dir=str(tmp_path), target="prod").run()
    assert raised.value.field == "target"
    assert "has no target 'prod' (it has: duckdb, postgres)" in str(raised.value)

    with pytest.raises(DbtProfileNotFound) as raised:
        DbtResource(project_dir=str(project), profiles_dir=str(tmp_path), profile="other").run()
    assert raised.value.field == "profile"
    assert "has no profile 'other' (it has: flowstone_fixture)" in str(raised.value)
    assert not (project / "target").exists()


def test_missing_dbt_executable(project: Path) -> None:
    with pytest.raises(DbtExecutableNotFound) as raised:
        DbtResource(project_dir=str(project), dbt_executable="dbt-not-installed").run()
    assert raised.value.field == "dbt_executable"
    assert "neither on PATH nor in" in str(raised.value)

    with pytest.raises(DbtExecutableNotFound, match="is not an executable file"):
        DbtResource(project_dir=str(project), dbt_executable="/opt/none/bin/dbt").run()


def test_bad_values_name_their_field(project: Path) -> None:
    dbt = DbtResource(project_dir=str(project))
    with pytest.raises(ConfigurationError, match="threads: must be at least 1"):
        dbt.run(threads=0)
    with pytest.raises(ConfigurationError, match="timeout: must be positive"):
        dbt.run(timeout=0)
    with pytest.raises(ConfigurationError, match="vars: must be JSON-serialisable"):
        dbt.run(vars={"when": object()})


@pytest.mark.parametrize(
    ("options", "field"),
    [({"threads": 0}, "threads"), ({"timeout": 0}, "timeout"), ({"kill_grace": -1}, "kill_grace")],
)
def test_resource_constraints_fail_when_built_naming_the_field(
    project: Path, options: dict[str, Any], field: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        DbtResource(project_dir=str(project), **options)
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


# -- concurrency and timeouts ----------------------------------------------------------------------


def test_concurrent_invocations_read_their_own_results(
    dbt: DbtResource, built: object, tmp_path: Path
) -> None:
    results: dict[str, DbtResult] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(2)

    def seed(name: str) -> None:
        try:
            barrier.wait()
            # Separate DuckDB files: DuckDB allows one writer per file.
            results[name] = dbt.seed(name, vars={"duckdb_path": str(tmp_path / f"{name}.db")})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=seed, args=(n,)) for n in ("raw_orders", "raw_customers")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    assert [n.name for n in results["raw_orders"].nodes] == ["raw_orders"]
    assert [n.name for n in results["raw_customers"].nodes] == ["raw_customers"]
    assert results["raw_orders"].nodes[0].rows_affected == 5
    assert results["raw_customers"].nodes[0].rows_affected == 3
    assert results["raw_orders"].target_path != results["raw_customers"].target_path
    assert results["raw_orders"].invocation_id != results["raw_customers"].invocation_id


def _write_wrapper(path: Path, pid_file: Path, dbt_path: str) -> Path:
    """A dbt wrapper like `uv run dbt`: dbt runs as its child, which ignores SIGINT.

    A non-interactive shell starts background jobs with SIGINT ignored, so only the SIGKILL
    that follows the grace period stops dbt: stopping the wrapper alone would leave it running.
    """
    path.write_text(
        "#!/bin/sh\n"
        f'echo $$ > "{pid_file}"\n'
        f'"{dbt_path}" "$@" &\n'
        f'echo $! >> "{pid_file}"\n'
        "wait $!\n"
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def _running(pid: int, marker: str) -> bool:
    """Whether ``pid`` is a live process whose command line has ``marker``.

    A zombie awaiting its reaper counts as stopped; the marker guards against the pid having
    been reused by another process (other test suites share the machine).
    """
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        command_line = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and marker in command_line


def test_timeout_stops_dbt_and_its_children(project: Path, built: object, tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    dbt_path = shutil.which("dbt") or str(Path(sys.executable).parent / "dbt")
    wrapper = _write_wrapper(tmp_path / "dbt-wrapper", pid_file, dbt_path)
    dbt = DbtResource(project_dir=str(project), dbt_executable=str(wrapper), kill_grace=1.0)

    started = time.monotonic()
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("slow_model", timeout=4.0)
    took = time.monotonic() - started

    assert raised.value.allow_retries is True  # a timeout is transient: the step may retry
    error = dbt_error(raised)
    assert isinstance(error, CallTimeout)
    assert error.timeout == 4.0
    assert "dbt and its child processes were stopped" in str(error)
    # dbt's lines before the interrupt, not its KeyboardInterrupt traceback; and the log.
    assert "before the interrupt" in str(error)
    assert "slow_model" in str(error)
    assert "KeyboardInterrupt" not in str(error)
    assert "dbt.log" in str(error)
    wrapper_pid, dbt_pid = (int(line) for line in pid_file.read_text().split())
    assert not _running(wrapper_pid, "slow_model")
    assert not _running(dbt_pid, "slow_model")
    assert took < 120  # the slow model alone would run for many minutes


def test_without_dagster_errors_the_dbt_error_is_raised_as_it_is(
    project: Path, built: object
) -> None:
    dbt = DbtResource(
        project_dir=str(project),
        resilience=ResilienceResource(store_url="memory://dbt-raw-errors", dagster_errors=False),
    )
    with pytest.raises(DbtFailed) as raised:
        dbt.run_model("broken_model")
    assert type(raised.value) is DbtFailed
    assert raised.value.failed_nodes[0]["unique_id"] == "model.flowstone_fixture.broken_model"


# -- deadlines -------------------------------------------------------------------------------------


def test_dbt_timeout_is_the_smaller_of_its_own_and_the_policy_timeout() -> None:
    assert _effective_timeout(3600.0) == 3600.0
    assert _effective_timeout(None) is None
    with deadline_scope(30.0):
        shortened, unlimited = _effective_timeout(3600.0), _effective_timeout(None)
        assert shortened is not None
        assert 29.0 < shortened <= 30.0
        assert unlimited is not None
        assert 29.0 < unlimited <= 30.0
        assert _effective_timeout(10.0) == 10.0


def test_a_retry_deadline_never_stops_a_running_dbt_command(
    tmp_path: Path, captured: list[telemetry.TelemetryEvent]
) -> None:
    """A retry deadline of 5 s bounds when a retry may start, not the 8 s model: only the
    policy's `timeout` (longer than the model) and dbt's own `timeout` bound a running command.
    Before the fix, the deadline was published as the attempt's limit and dbt was stopped."""
    project = shutil.copytree(
        SLOW_PROJECT, tmp_path / "slow", ignore=shutil.ignore_patterns("target", "logs")
    )
    dbt = DbtResource(
        service="dbt",  # the policies below are keyed by it
        project_dir=str(project),
        profiles_dir=str(project),
        resilience=ResilienceResource(
            store_url="memory://dbt-deadline",
            policies={
                "dbt": ServicePolicy(retry=RetryConfig(max_attempts=2, deadline=5.0), timeout=120)
            },
        ),
    )

    started = time.monotonic()
    result = dbt.run_model("sleepy_model")
    took = time.monotonic() - started

    assert result.success
    assert result.attempts == 1
    [node] = result.nodes
    assert (node.name, node.status) == ("sleepy_model", "success")
    assert node.execution_time >= 7.5
    assert took > 5.0  # the command outlived the retry deadline and was not stopped
    [call] = [e for e in captured if e.name == "flowstone.resilience.call"]
    assert (call.outcome, call.attempts) == ("ok", 1)
