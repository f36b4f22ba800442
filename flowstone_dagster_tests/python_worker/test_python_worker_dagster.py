"""PythonWorkerResource inside Dagster: scoring under materialize, worker logs in the step log."""

import os
from pathlib import Path

import dagster as dg
import numpy as np
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import PythonWorkerError
from flowstone_dagster.python_worker import PythonWorkerResource
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy

pytestmark = [pytest.mark.workers, pytest.mark.dagster]

WORKER_MODULES = str(Path(__file__).parent / "worker_modules")


def _children_leading_a_group() -> set[int]:
    """This process's children that lead their own process group: the workers."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                text = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            _state, ppid, pgid = text[text.rindex(")") + 2 :].split()[:3]
            if int(ppid) == os.getpid() and int(pgid) == int(entry):
                found.add(int(entry))
    return found


@dg.asset
def iris_model(context: dg.AssetExecutionContext, workers: PythonWorkerResource) -> str:
    directory = Path(context.instance.storage_directory())
    directory.mkdir(parents=True, exist_ok=True)
    path = str(directory / "iris-model.pkl")
    with telemetry.observe(context):
        workers.call("ml", "fit_and_save", (path,))
        workers.call("test_module", "noisy", (1,))  # prints and logs, into this step's log
    return path


@dg.asset
def iris_scores(
    context: dg.AssetExecutionContext, workers: PythonWorkerResource, iris_model: str
) -> list[int]:
    from sklearn.datasets import load_iris

    features, _ = load_iris(return_X_y=True)
    batches = [features[i : i + 30] for i in range(0, 150, 30)]
    with telemetry.observe(context):
        predictions = workers.map("ml", "predict", batches, kwargs={"model_path": iris_model})
    return [int(label) for p in predictions for label in p["labels"]]


def test_an_asset_scores_with_the_pool_and_worker_logs_reach_the_step_log(
    dagster_instance: dg.DagsterInstance,
) -> None:
    workers = PythonWorkerResource(paths=[WORKER_MODULES], pool_size=2)
    result = dg.materialize(
        [iris_model, iris_scores], resources={"workers": workers}, instance=dagster_instance
    )
    assert result.success
    scores = result.output_for_node("iris_scores")
    assert len(scores) == 150
    assert np.mean(np.array(scores) == np.repeat([0, 1, 2], 50)) > 0.9

    # telemetry.observe attached the step's worker-call totals to the materialization
    materializations = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.asset_materializations_for_node("iris_scores")
    }
    metadata = materializations["iris_scores"]
    assert metadata["flowstone/worker.call/calls"].value == 5
    assert metadata["flowstone/worker.call/errors"].value == 0

    # the worker's stdout, stderr and logging records are in iris_model's step log, with its pid
    logs = [
        entry
        for entry in dagster_instance.all_logs(result.run_id)
        if entry.step_key == "iris_model" and "[worker " in (entry.user_message or "")
    ]
    messages = "\n".join(entry.user_message for entry in logs)
    assert "stdout] stdout line 0" in messages
    assert "stderr] stderr line 0" in messages
    assert "] test_module: logged at warning" in messages
    warning = next(e for e in logs if "logged at warning" in e.user_message)
    assert warning.level == 30
    # and the pool was torn down with the step: no worker outlives it
    assert _children_leading_a_group() == set()


def test_a_failing_call_fails_the_step_with_the_remote_error(
    dagster_instance: dg.DagsterInstance,
) -> None:
    @dg.asset
    def broken(workers: PythonWorkerResource) -> None:
        workers.call("test_module", "raise_error")

    result = dg.materialize(
        [broken],
        resources={"workers": PythonWorkerResource(paths=[WORKER_MODULES], pool_size=1)},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    error = failure.step_failure_data.error
    assert error is not None
    text = error.to_string()
    assert "PythonWorkerError" in text
    assert "ValueError: something went wrong in the worker" in text
    assert "remote traceback:" in text  # the worker's traceback is part of the step's error
    assert _children_leading_a_group() == set()


def test_with_resilience_errors_become_dagster_control_flow(
    dagster_instance: dg.DagsterInstance, tmp_path: Path
) -> None:
    resilience = ResilienceResource(
        store_url="memory://python-worker-dagster",
        policies={
            "python_worker": ServicePolicy(
                retry=RetryConfig(max_attempts=2, base_delay=0.01, jitter=0),
                circuit_breaker=None,
            )
        },
    )
    marker = str(tmp_path / "crashed-once")

    @dg.asset
    def recovers(workers: PythonWorkerResource) -> str:
        return workers.call("crashing", "crash_once", (marker,))  # crash, retried, succeeds

    @dg.asset
    def user_error(workers: PythonWorkerResource) -> None:
        workers.call("test_module", "raise_error")

    @dg.asset
    def caught(workers: PythonWorkerResource) -> str:
        try:
            workers.call("test_module", "raise_error", dagster_errors=False)
        except PythonWorkerError as exc:
            return exc.remote_type
        return "no error"

    workers = PythonWorkerResource(paths=[WORKER_MODULES], pool_size=1, resilience=resilience)
    result = dg.materialize(
        [recovers, user_error, caught],
        resources={"workers": workers},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert result.output_for_node("recovers") == "second attempt"
    assert result.output_for_node("caught") == "ValueError"
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "user_error"
    # a user error is not worth a step retry: Failure(allow_retries=False)
    assert failure.step_failure_data.user_failure_data is not None
    assert (
        failure.step_failure_data.user_failure_data.metadata["flowstone/error_type"].value
        == "PythonWorkerError"
    )
    assert failure.step_failure_data.user_failure_data.metadata["flowstone/retryable"].value is (
        False
    )
