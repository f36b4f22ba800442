"""PythonWorkerResource and its pool against real worker processes: calls, errors, the API."""

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pydantic
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
    FlowstoneError,
    MaxAttemptsExceeded,
    PythonWorkerError,
    WorkerCrashed,
    is_retryable,
)
from flowstone_dagster.python_worker import PythonWorkerResource
from flowstone_dagster.python_worker.pool import WorkerPool
from flowstone_dagster.python_worker.process import WorkerSpec
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy

pytestmark = pytest.mark.workers

WORKER_MODULES = str(Path(__file__).parent / "worker_modules")


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,)), size=2) as pool:
        yield pool


# -- a call, a remote exception, nested data -----------------------------------------------------


def test_calls_python_function(pool: WorkerPool) -> None:
    assert pool.call("test_module", "add", [2, 3]) == 5


def test_handles_python_exceptions(pool: WorkerPool) -> None:
    with pytest.raises(PythonWorkerError) as raised:
        pool.call("test_module", "raise_error", [])
    error = raised.value
    assert error.remote_type == "ValueError"
    assert error.remote_message == "something went wrong in the worker"
    assert 'raise ValueError("something went wrong in the worker")' in error.remote_traceback
    assert "in raise_error" in error.remote_traceback
    assert not is_retryable(error)


def test_passes_complex_data_structures(pool: WorkerPool) -> None:
    data = {"key": "value", "numbers": [1, 2, 3]}
    result = pool.call("test_module", "process_data", [data])
    assert isinstance(result, dict)
    assert result == {"keys": ["key", "numbers"], "total": 6, "echo": data}


# -- the API -------------------------------------------------------------------------------------


def test_kwargs_and_dotted_function_names(pool: WorkerPool) -> None:
    assert pool.call("test_module", "add", kwargs={"a": "x", "b": "y"}) == "xy"
    assert pool.call("test_module", "Scorer.double", (21,)) == 42
    assert pool.call("os.path", "join", ("a", "b")) == "a/b"  # any importable module


@pytest.mark.parametrize(
    ("module", "function", "field"),
    [
        ("test_module; import os", "add", "module"),
        ("test_module", "add()", "function"),
        ("", "add", "module"),
        ("test_module", "", "function"),
        ("test-module", "add", "module"),
        ("test_module", "class", "function"),  # a keyword
        ("test_module", "Scorer..double", "function"),
        ("__import__('os')", "system", "module"),
        (42, "add", "module"),
    ],
)
def test_names_are_validated_before_reaching_a_worker(
    pool: WorkerPool, events: list[telemetry.TelemetryEvent], module: Any, function: Any, field: str
) -> None:
    with pytest.raises(ConfigurationError) as raised:
        pool.call(module, function, (1, 2))
    assert raised.value.field == field
    assert "dotted Python name" in str(raised.value)
    assert not [e for e in events if e.name == "flowstone.worker.call"]  # nothing was sent


def test_bad_args_and_timeout_are_configuration_errors(pool: WorkerPool) -> None:
    with pytest.raises(ConfigurationError, match="args"):
        pool.call("test_module", "add", "23")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="kwargs"):
        pool.call("test_module", "add", (), [("a", 1)])  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="timeout"):
        pool.call("test_module", "add", (1, 2), timeout=0)


def test_missing_module_or_function_says_where_to_look(pool: WorkerPool) -> None:
    with pytest.raises(PythonWorkerError) as raised:
        pool.call("no_such_module", "run")
    assert raised.value.remote_type == "ModuleNotFoundError"
    assert any("`paths`" in note for note in raised.value.__notes__)
    with pytest.raises(PythonWorkerError) as raised:
        pool.call("test_module", "no_such_function")
    assert raised.value.remote_type == "AttributeError"
    with pytest.raises(PythonWorkerError, match="not a function"):
        pool.call("test_module", "NOT_A_FUNCTION")


def test_remote_exception_keeps_type_message_traceback_and_cause(pool: WorkerPool) -> None:
    with pytest.raises(PythonWorkerError) as raised:
        pool.call("test_module", "raise_with_cause")
    error = raised.value
    assert error.remote_type == "RuntimeError"
    assert str(error) == "[python_worker] RuntimeError: wrapped failure"
    assert "KeyError: 'missing'" in error.remote_traceback  # the cause's traceback too
    assert "The above exception was the direct cause" in error.remote_traceback
    notes = "\n".join(error.__notes__)
    assert "raised by test_module.raise_with_cause in the worker (pid " in notes
    assert "remote traceback:" in notes


def test_sys_exit_in_user_code_fails_the_call_not_the_worker(pool: WorkerPool) -> None:
    before = set(pool.pids())
    with pytest.raises(PythonWorkerError) as raised:
        pool.call("test_module", "raise_exit", (4,))
    assert raised.value.remote_type == "SystemExit"
    assert set(pool.pids()) == before


def test_modules_are_imported_once_per_worker(tmp_path: Path) -> None:
    import_log = tmp_path / "imports.log"
    spec = WorkerSpec(
        python=sys.executable,
        paths=(WORKER_MODULES,),
        env={**__import__("os").environ, "IMPORT_LOG": str(import_log)},
    )
    with WorkerPool(spec, size=1) as single:
        results = [single.call("test_module", "add", (i, 1)) for i in range(20)]
        pid = single.pids()[0]
    assert results == [i + 1 for i in range(20)]
    assert import_log.read_text().split() == [str(pid)]


def test_submit_and_map(pool: WorkerPool) -> None:
    futures = [pool.submit("test_module", "add", (i, i)) for i in range(10)]
    assert [f.result(timeout=60) for f in futures] == [2 * i for i in range(10)]
    assert pool.map("test_module", "add", range(25), kwargs={"b": 100}) == [
        i + 100 for i in range(25)
    ]
    assert pool.map("test_module", "add", []) == []


def test_map_raises_the_earliest_failure_or_returns_exceptions(pool: WorkerPool) -> None:
    items: list[Any] = [1, "x", 3, None]
    with pytest.raises(PythonWorkerError) as raised:
        pool.map("test_module", "add", items, kwargs={"b": 1})
    assert raised.value.remote_type == "TypeError"
    assert 'can only concatenate str (not "int") to str' in raised.value.remote_message
    results = pool.map("test_module", "add", items, kwargs={"b": 1}, return_exceptions=True)
    assert results[0] == 2
    assert results[2] == 4
    assert isinstance(results[1], PythonWorkerError)
    assert isinstance(results[3], PythonWorkerError)


def test_a_closed_pool_refuses_calls() -> None:
    pool = WorkerPool(WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,)), size=1)
    assert pool.call("test_module", "add", (1, 1)) == 2
    pool.close()
    pool.close()  # idempotent
    with pytest.raises(FlowstoneError, match="closed"):
        pool.call("test_module", "add", (1, 1))


# -- output and logging --------------------------------------------------------------------------


def test_worker_output_and_logging_reach_the_log_tagged_with_the_pid(
    pool: WorkerPool, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="flowstone_dagster.python_worker"):
        # The protocol has its own pipes: prints, raw writes to fds 1 and 2 and a line without
        # its newline cannot corrupt it.
        assert pool.call("test_module", "noisy", (3,)) == "done"
        pid = pool.call("test_module", "whoami")["pid"]  # LIFO: the same, warm worker
        # Everything was forwarded before the call returned: no waiting here.
        records = [r for r in caplog.records if r.name == "flowstone_dagster.python_worker"]
    text = "\n".join(r.getMessage() for r in records)
    for i in range(3):
        assert f"stdout line {i}" in text
        assert f"stderr line {i}" in text
    assert "raw fd 1 write" in text
    assert "raw fd 2 write" in text
    assert f"[worker {pid} stdout] no newline at the end" in text
    levels = {r.getMessage(): r.levelno for r in records}
    assert levels[f"[worker {pid}] test_module: logged at info"] == logging.INFO
    assert levels[f"[worker {pid}] test_module: logged at warning"] == logging.WARNING
    assert "logged at debug" not in text  # the worker's root logger is at INFO
    stderr = [r for r in records if "stderr]" in r.getMessage()]
    assert stderr
    assert all(r.levelno == logging.WARNING for r in stderr)
    assert all(r.getMessage().startswith(f"[worker {pid} ") for r in records if "line" in r.msg)


# -- telemetry -----------------------------------------------------------------------------------


def test_each_call_emits_one_event(
    pool: WorkerPool, events: list[telemetry.TelemetryEvent]
) -> None:
    pool.call("test_module", "add", (2, 3))
    with pytest.raises(PythonWorkerError):
        pool.call("test_module", "raise_error")
    calls = [e for e in events if e.name == "flowstone.worker.call"]
    assert [e.outcome for e in calls] == ["ok", "error"]
    ok, failed = calls
    assert ok.measures["module"] == "test_module"
    assert ok.measures["function"] == "add"
    assert ok.measures["pid"] in pool.pids()
    assert ok.measures["bytes_in"] > 0
    assert ok.measures["bytes_out"] > 0
    assert ok.measures["buffers_in"] == ok.measures["buffers_out"] == 0
    assert ok.measures["queue_ms"] >= 0
    assert ok.attempts == 1
    assert ok.duration_s > 0
    assert failed.error_type == "PythonWorkerError"
    # sizes and names only: no argument or result values
    assert set(ok.measures) == {
        "module",
        "function",
        "pid",
        "bytes_in",
        "bytes_out",
        "buffers_in",
        "buffers_out",
        "queue_ms",
    }


def test_worker_start_and_exit_events(events: list[telemetry.TelemetryEvent]) -> None:
    with WorkerPool(WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,)), size=1) as single:
        single.call("test_module", "add", (1, 1))
        pid = single.pids()[0]
        with pytest.raises(WorkerCrashed):
            single.call("crashing", "exit_now", (5,))
        replacement = single.pids()[0]
        single.call("test_module", "add", (1, 1))
    starts = [e for e in events if e.name == "flowstone.worker.start"]
    exits = [e for e in events if e.name == "flowstone.worker.exit"]
    assert [e.measures["pid"] for e in starts] == [pid, replacement]
    assert all(e.duration_s > 0 for e in starts)
    assert starts[0].measures["python"] == sys.version.split()[0]
    crashed, shutdown = exits
    assert crashed.measures == {"pid": pid, "reason": "crashed", "calls": 2, "exit_code": 5}
    assert crashed.outcome == "error"
    assert shutdown.measures["reason"] == "shutdown"
    assert shutdown.measures["exit_code"] == 0
    assert shutdown.outcome == "ok"


# -- retries go through ResilienceResource -------------------------------------------------------


def test_without_resilience_a_crash_is_not_retried(tmp_path: Path) -> None:
    with WorkerPool(WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,)), size=1) as single:
        with pytest.raises(WorkerCrashed) as raised:
            single.call("crashing", "crash_once", (str(tmp_path / "marker"),))
        assert raised.value.exit_code == 9
        assert is_retryable(raised.value)
        # the next call succeeds in the replacement worker
        assert single.call("crashing", "crash_once", (str(tmp_path / "marker"),)) == (
            "second attempt"
        )


def test_with_resilience_a_crash_is_retried_in_a_fresh_worker(
    tmp_path: Path, events: list[telemetry.TelemetryEvent]
) -> None:
    resilience = ResilienceResource(
        store_url="memory://python-worker-retry",
        policies={
            "python_worker": ServicePolicy(
                retry=RetryConfig(max_attempts=2, base_delay=0.01, jitter=0),
                circuit_breaker=None,
            )
        },
    )
    spec = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,))
    with WorkerPool(spec, size=1, resilience=resilience) as single:
        result = single.call("crashing", "crash_once", (str(tmp_path / "marker"),))
        assert result == "second attempt"
        # a user error is not retried
        with pytest.raises(PythonWorkerError):
            single.call("test_module", "raise_error")
        # a crash every time exhausts the attempts
        with pytest.raises(MaxAttemptsExceeded) as raised:
            single.call("crashing", "exit_now", (7,))
        assert isinstance(raised.value.last_error, WorkerCrashed)
    calls = [e for e in events if e.name == "flowstone.worker.call"]
    assert [(e.outcome, e.attempts) for e in calls] == [("ok", 2), ("error", 1), ("error", 2)]


# -- the resource --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"python": "/no/such/python"}, "python"),
        ({"python": __file__}, "python"),  # not executable
        ({"paths": ["/no/such/dir"]}, "paths"),
        ({"cwd": "/no/such/dir"}, "cwd"),
    ],
)
def test_bad_configuration_fails_at_set_up_naming_the_field(  # ranges: test_resource_constraints
    config: dict[str, Any], field: str
) -> None:
    resource = PythonWorkerResource(**config)
    with (
        pytest.raises(dg.DagsterResourceFunctionError) as raised,
        dg.build_resources({"workers": resource}),
    ):
        pass
    error = raised.value.__cause__
    assert isinstance(error, ConfigurationError)
    assert error.field == field


def test_an_interpreter_that_cannot_run_the_worker_is_reported(tmp_path: Path) -> None:
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'this is not python' >&2\nexit 12\n")
    broken.chmod(0o755)
    with dg.build_resources({"workers": PythonWorkerResource(python=str(broken))}) as resources:
        with pytest.raises(WorkerCrashed) as raised:
            resources.workers.call("test_module", "add", (1, 2), dagster_errors=False)
        # by default (no resilience configured) the one mapping makes it Dagster control flow
        with pytest.raises(dg.Failure) as mapped:
            resources.workers.call("test_module", "add", (1, 2))
    assert raised.value.exit_code == 12
    assert "while starting" in str(raised.value)
    assert "this is not python" in str(raised.value)  # its stderr, quoted
    assert "check `python`" in str(raised.value)
    assert mapped.value.allow_retries  # a crash is retryable: the step's RetryPolicy may retry
    assert isinstance(mapped.value.__cause__, WorkerCrashed)
    assert "while starting" in str(mapped.value.description)


def test_resource_outside_dagster_and_env(tmp_path: Path) -> None:
    resource = PythonWorkerResource(
        paths=[WORKER_MODULES],
        pool_size=1,
        env={"FLOWSTONE_PROBE": "s3cr3t-probe-value"},
        cwd=str(tmp_path),
    )
    try:
        pids = resource.start()
        assert len(pids) == 1
        assert resource.call("os", "getenv", ("FLOWSTONE_PROBE",)) == "s3cr3t-probe-value"
        assert resource.call("os", "getcwd") == str(tmp_path)
        assert resource.submit("test_module", "add", (1, 2)).result(timeout=60) == 3
        assert resource.map("test_module", "add", [1, 2], kwargs={"b": 1}) == [2, 3]
    finally:
        resource.close()
    assert "s3cr3t" not in repr(resource)  # env values may be secrets
    isolated = PythonWorkerResource(pool_size=1, inherit_env=False, env={"ONLY": "this"})
    try:
        environment = isolated.call("os", "environ.copy")
    finally:
        isolated.close()
    assert environment.get("ONLY") == "this"
    assert "PATH" not in environment


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"pool_size": 0}, "pool_size"),
        ({"timeout": 0}, "timeout"),
        ({"start_timeout": -1}, "start_timeout"),
        ({"max_calls_per_worker": 0}, "max_calls_per_worker"),
        ({"max_queued": -1}, "max_queued"),
        ({"queue_timeout": 0}, "queue_timeout"),
        ({"memory_limit_mb": 0}, "memory_limit_mb"),
    ],
)
def test_resource_constraints_fail_when_built_naming_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        PythonWorkerResource(**options)
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]
