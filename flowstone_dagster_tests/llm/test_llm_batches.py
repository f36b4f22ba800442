"""Batch jobs against the fake providers' batch endpoints: Anthropic Message Batches and
OpenAI's files + Batch API; results in input order, per-item errors, resumed after a step
restart and by a re-execution of the run from failure (same inputs only)."""

import logging
import pickle
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import pytest

from flowstone_dagster.errors import ConfigurationError, FlowstoneError
from flowstone_dagster.llm import BatchPending, LLMResource
from flowstone_dagster.llm.batches import run_batch
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.llm import llm_jobs
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY
from flowstone_dagster_tests.support.llm_servers import LLMServer, OpenAIServer, llm_server


@pytest.fixture(params=["anthropic", "openai"])
def api(request: pytest.FixtureRequest) -> Iterator[LLMServer]:
    key = KEY if request.param == "anthropic" else OPENAI_KEY
    with llm_server(request.param, api_key=key) as server:
        yield server


def resource_for(server: LLMServer, *, dagster_errors: bool = False) -> LLMResource:
    anthropic = server.path == "/v1/messages"
    return LLMResource(
        provider="anthropic" if anthropic else "openai",
        model="claude-sonnet-5-5" if anthropic else "gpt-4o-mini",
        api_key=KEY if anthropic else OPENAI_KEY,
        base_url=server.base_url,
        resilience=ResilienceResource(
            store_url=f"memory://batch-{uuid.uuid4().hex[:8]}",
            default_policy=ServicePolicy(retry=RetryConfig(max_attempts=2, base_delay=0.05)),
            dagster_errors=dagster_errors,
        ),
    )


def test_a_batch_returns_results_in_input_order_with_item_errors(api: LLMServer) -> None:
    api.reply("spam", input_tokens=5, output_tokens=1)
    api.fail(400, "invalid_request_error", "prompt is too long")
    api.reply("ham", input_tokens=6, output_tokens=1)
    results = resource_for(api).batch(
        ["Label: free money", "Label: " + "x" * 10, "Label: hello"],
        job="labels-1",
        system="Answer spam or ham.",
        max_tokens=5,
        poll_interval=0.05,
    )
    assert [r.custom_id for r in results] == ["labels-1-0", "labels-1-1", "labels-1-2"]
    assert [r.response.text if r.response else None for r in results] == ["spam", None, "ham"]
    assert results[1].error == "invalid_request_error: prompt is too long"
    assert results[0].response is not None
    assert results[0].response.usage.input_tokens == 5
    # Each item was the request chat() would send, checked field by field by the server.
    items = [r.body for r in api.requests if r.method == "BATCH"]
    assert len(items) == 3
    if api.path == "/v1/messages":
        assert items[0]["system"] == "Answer spam or ham."
        assert items[0]["max_tokens"] == 5
    else:
        assert items[0]["messages"][0] == {"role": "system", "content": "Answer spam or ham."}
        assert items[0]["max_completion_tokens"] == 5


def test_a_batch_whose_every_item_failed_reports_each_error(api: LLMServer) -> None:
    # OpenAI: no output file at all (null output_file_id), only the error file.
    api.fail(400, "invalid_request_error", "first is bad")
    api.fail(400, "invalid_request_error", "second is bad")
    results = resource_for(api).batch(["a", "b"], job="all-bad", poll_interval=0.05)
    assert [r.error for r in results] == [
        "invalid_request_error: first is bad",
        "invalid_request_error: second is bad",
    ]
    assert not any(r.ok for r in results)


def test_a_batch_not_done_in_time_is_pending_and_resumes(api: LLMServer) -> None:
    api.batch_polls = 3
    llm = resource_for(api)
    with pytest.raises(BatchPending) as raised:
        llm.batch(["a", "b"], job="slow", poll_interval=0.05, max_poll_interval=0.05, max_wait=0.1)
    assert raised.value.batch_id in api.batches
    assert len(api.batches) == 1


def test_bad_batch_arguments_fail_before_anything_is_sent(api: LLMServer) -> None:
    llm = resource_for(api)
    with pytest.raises(ConfigurationError, match="prompts"):
        llm.batch([], job="x")
    with pytest.raises(ConfigurationError, match="job"):
        llm.batch(["a"], job="no spaces allowed")
    assert api.batches == {}


@pytest.mark.dagster
def test_an_asset_invoked_directly_runs_its_batch(api: LLMServer) -> None:
    api.batch_polls = 0

    @dg.asset
    def labels(context: dg.AssetExecutionContext, llm: LLMResource) -> list[str | None]:
        results = llm.batch(["a", "b"], job="direct", poll_interval=0.05, context=context)
        return [r.response.text if r.response else None for r in results]

    llm = resource_for(api)
    assert labels(dg.build_asset_context(), llm=llm) == ["ok", "ok"]
    assert labels(dg.build_asset_context(), llm=llm) == ["ok", "ok"]
    assert len(api.batches) == 2  # no run: nothing to resume


@pytest.mark.dagster
def test_a_step_restart_resumes_the_batch_instead_of_resubmitting(
    api: LLMServer, dagster_instance: dg.DagsterInstance
) -> None:
    api.batch_polls = 2  # done on the third status poll

    @dg.asset(retry_policy=dg.RetryPolicy(max_retries=3))
    def labels(llm: LLMResource) -> list[str]:
        results = llm.batch(
            ["one", "two"], job="labels", poll_interval=0.05, max_poll_interval=0.05, max_wait=0.01
        )
        return [r.response.text for r in results if r.response is not None]

    api.reply("first")
    api.reply("second")
    result = dg.materialize(
        [labels],
        resources={"llm": resource_for(api, dagster_errors=True)},
        instance=dagster_instance,
    )
    assert result.success
    assert result.output_for_node("labels") == ["first", "second"]
    assert len(api.batches) == 1  # submitted once, resumed by the later step attempts
    retries = [
        e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY
    ]
    assert len(retries) == 2
    metadata = result.asset_materializations_for_node("labels")[0].metadata
    assert metadata["flowstone/llm/calls"].value >= 2


@pytest.mark.dagster
def test_two_assets_of_a_run_with_the_same_job_submit_their_own_batches(
    api: LLMServer, dagster_instance: dg.DagsterInstance
) -> None:
    api.batch_polls = 0

    @dg.asset
    def first_labels(llm: LLMResource) -> int:
        return len(llm.batch(["same row"], job="labels", poll_interval=0.05))

    @dg.asset(deps=[first_labels])
    def second_labels(llm: LLMResource) -> int:
        return len(llm.batch(["same row"], job="labels", poll_interval=0.05))

    result = dg.materialize(
        [first_labels, second_labels],
        resources={"llm": resource_for(api, dagster_errors=True)},
        instance=dagster_instance,
    )
    assert result.success
    assert len(api.batches) == 2  # same job and requests, but another asset's batch
    observed = [
        (e.asset_key.path, e.event_specific_data.asset_observation.metadata)
        for e in result.all_events
        if e.event_type == dg.DagsterEventType.ASSET_OBSERVATION
    ]
    assert [key for key, _ in observed] == [["first_labels"], ["second_labels"]]
    fingerprints = {m["flowstone/llm/batch_fingerprint"].value for _, m in observed}
    assert len(fingerprints) == 1
    assert {m["flowstone/llm/batch_id"].value for _, m in observed} == set(api.batches)


@pytest.mark.dagster
def test_a_batch_recorded_without_a_fingerprint_is_not_resumed(
    api: LLMServer, dagster_instance: dg.DagsterInstance
) -> None:
    api.batch_polls = 0

    @dg.asset
    def labels(context: dg.AssetExecutionContext, llm: LLMResource) -> int:
        # What an earlier flowstone-dagster recorded: no fingerprint, so the requests behind
        # the batch are unknown.
        context.log_event(
            dg.AssetObservation(
                asset_key="labels",
                metadata={"flowstone/llm/batch_id": "old_batch", "flowstone/llm/batch_job": "j"},
            )
        )
        return len(llm.batch(["a row"], job="j", poll_interval=0.05))

    result = dg.materialize(
        [labels], resources={"llm": resource_for(api)}, instance=dagster_instance
    )
    assert result.success
    assert len(api.batches) == 1  # a new batch; old_batch was never asked for
    assert not [request for request, _ in api.server.log if "old_batch" in request.path]
    [line] = [
        line
        for line in log_lines(dagster_instance, result.run_id, logging.INFO)
        if "old_batch" in line
    ]
    assert "recorded without the fingerprint" in line


# -- resumed by a re-execution of the run (from failure, in the UI) ---------------------------

ReconstructedJob = Any  # what dg.reconstructable returns (its class is not public)
IN_PROCESS: dict[str, Any] = {"execution": {"config": {"in_process": {}}}}


@pytest.fixture
def openai_api() -> Iterator[OpenAIServer]:
    with llm_server("openai", api_key=OPENAI_KEY) as server:
        yield server


@pytest.fixture
def batch_job(api: LLMServer, monkeypatch: pytest.MonkeyPatch) -> ReconstructedJob:
    return batch_job_for(api, monkeypatch)


def batch_job_for(api: LLMServer, monkeypatch: pytest.MonkeyPatch) -> ReconstructedJob:
    """``llm_jobs``'s batch job for ``api``'s provider, its rows ``free money|hello``."""
    anthropic = api.path == "/v1/messages"
    monkeypatch.setenv(llm_jobs.BASE_URL_ENV, api.base_url)
    monkeypatch.setenv(llm_jobs.API_KEY_ENV, KEY if anthropic else OPENAI_KEY)
    monkeypatch.setenv(llm_jobs.ROWS_ENV, "free money|hello")
    getter = llm_jobs.get_anthropic_batch_job if anthropic else llm_jobs.get_openai_batch_job
    return dg.reconstructable(getter)


def run_failing_after_submit(
    job: ReconstructedJob, instance: dg.DagsterInstance, run_config: dict[str, Any]
) -> str:
    """A run whose batch step submits, finds the batch not done and fails (no step retry)."""
    with dg.execute_job(job, instance, run_config=run_config) as result:
        assert not result.success
        [failure] = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
        assert failure.step_key == "labelled_rows"
        return result.run_id


def reexecute_from_failure(
    job: ReconstructedJob, instance: dg.DagsterInstance, run_id: str
) -> tuple[str, list[str | None]]:
    with dg.execute_job(
        job, instance, reexecution_options=dg.ReexecutionOptions.from_failure(run_id, instance)
    ) as result:
        assert result.success
        return result.run_id, stored_labels(instance)


def stored_labels(instance: dg.DagsterInstance) -> list[str | None]:
    """The asset's value, as the default I/O manager stored it (by asset key)."""
    with open(Path(instance.storage_directory()) / "labelled_rows", "rb") as stored:
        labels: list[str | None] = pickle.load(stored)  # noqa: S301 (written by this test's run)
    return labels


def log_lines(instance: dg.DagsterInstance, run_id: str, level: int) -> list[str]:
    return [
        entry.user_message
        for entry in instance.all_logs(run_id)
        if entry.level == level and entry.dagster_event is None
    ]


@pytest.mark.dagster
@pytest.mark.parametrize(
    "run_config",
    [
        pytest.param(IN_PROCESS, id="in_process"),
        pytest.param({}, id="multiprocess", marks=pytest.mark.multiprocess),
    ],
)
def test_a_reexecution_from_failure_collects_the_parent_runs_batch(
    api: LLMServer,
    batch_job: ReconstructedJob,
    dagster_home_instance: dg.DagsterInstance,
    run_config: dict[str, Any],
) -> None:
    # batch_polls = 1: "in progress" at the failed run's only poll, ended at the next one.
    failed = run_failing_after_submit(batch_job, dagster_home_instance, run_config)
    [batch_id] = api.batches
    api.reply("spam")
    api.reply("ham")
    rerun, labels = reexecute_from_failure(batch_job, dagster_home_instance, failed)
    assert labels == ["spam", "ham"]
    assert list(api.batches) == [batch_id]  # collected, not submitted (and paid for) again
    run = dagster_home_instance.get_run_by_id(rerun)
    assert run is not None
    assert run.parent_run_id == failed
    # The re-executed run shows the batch it collected, and where it came from.
    [observed] = [
        record.event_log_entry.asset_observation
        for record in dagster_home_instance.get_records_for_run(
            rerun, of_type=dg.DagsterEventType.ASSET_OBSERVATION
        ).records
    ]
    assert observed is not None
    assert observed.metadata["flowstone/llm/batch_id"].value == batch_id
    assert observed.metadata["flowstone/llm/batch_resumed_from"].value == failed
    assert f"batch {batch_id} (labels) resumed from run {failed}" in log_lines(
        dagster_home_instance, rerun, logging.INFO
    )


@pytest.mark.dagster
def test_the_batch_is_found_up_the_reexecution_chain(
    api: LLMServer,
    batch_job: ReconstructedJob,
    dagster_home_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = run_failing_after_submit(batch_job, dagster_home_instance, IN_PROCESS)
    # A re-execution that fails before it reaches the batch (its source is unreadable): it
    # records nothing, so the next one must look past its parent, at the root run.
    monkeypatch.delenv(llm_jobs.ROWS_ENV)
    with dg.execute_job(
        batch_job,
        dagster_home_instance,
        reexecution_options=dg.ReexecutionOptions.from_failure(root, dagster_home_instance),
    ) as result:
        assert not result.success
        second = result.run_id
    assert not dagster_home_instance.get_records_for_run(
        second, of_type=dg.DagsterEventType.ASSET_OBSERVATION
    ).records
    monkeypatch.setenv(llm_jobs.ROWS_ENV, "free money|hello")
    third, labels = reexecute_from_failure(batch_job, dagster_home_instance, second)
    assert labels == ["ok", "ok"]
    assert len(api.batches) == 1
    run = dagster_home_instance.get_run_by_id(third)
    assert run is not None
    assert (run.parent_run_id, run.root_run_id) == (second, root)
    [batch_id] = api.batches
    assert f"batch {batch_id} (labels) resumed from run {root}" in log_lines(
        dagster_home_instance, third, logging.INFO
    )


@pytest.mark.dagster
def test_changed_inputs_are_not_resumed_from_the_parent_run(
    api: LLMServer,
    batch_job: ReconstructedJob,
    dagster_home_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed = run_failing_after_submit(batch_job, dagster_home_instance, IN_PROCESS)
    [old_id] = api.batches
    monkeypatch.setenv(llm_jobs.ROWS_ENV, "free money|hello|a third row")  # the data changed
    api.batch_polls = 0  # the new batch ends at its first poll
    rerun, labels = reexecute_from_failure(batch_job, dagster_home_instance, failed)
    assert labels == ["ok", "ok", "ok"]
    assert len(api.batches) == 2
    assert api.batches[old_id]["polls"] == 1  # never polled again
    [new_id] = set(api.batches) - {old_id}
    prompts = [body["messages"][-1]["content"] for _, body in api.batches[new_id]["requests"]]
    assert prompts == ["Label: free money", "Label: hello", "Label: a third row"]
    [line] = [
        line
        for line in log_lines(dagster_home_instance, rerun, logging.INFO)
        if "is not resumed" in line
    ]
    assert old_id in line
    assert "inputs changed" in line


@pytest.mark.dagster
def test_an_unrelated_run_of_the_same_job_submits_its_own_batch(
    api: LLMServer, batch_job: ReconstructedJob, dagster_home_instance: dg.DagsterInstance
) -> None:
    run_failing_after_submit(batch_job, dagster_home_instance, IN_PROCESS)
    [old_id] = api.batches
    api.batch_polls = 0
    with dg.execute_job(batch_job, dagster_home_instance, run_config=IN_PROCESS) as result:
        assert result.success  # a new run, not a re-execution: same job, same inputs
    assert len(api.batches) == 2
    assert api.batches[old_id]["polls"] == 1


@pytest.mark.dagster
def test_a_parent_batch_that_expired_is_submitted_again_with_a_warning(
    openai_api: OpenAIServer,
    dagster_home_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # OpenAI batches end as a whole (Anthropic's canceled or expired items are item errors).
    api = openai_api
    batch_job = batch_job_for(api, monkeypatch)
    failed = run_failing_after_submit(batch_job, dagster_home_instance, IN_PROCESS)
    [old_id] = api.batches
    api.end_batch(old_id, "expired")  # not done within its 24 h window
    api.batch_polls = 0
    api.reply("spam")
    api.reply("ham")
    rerun, labels = reexecute_from_failure(batch_job, dagster_home_instance, failed)
    assert labels == ["spam", "ham"]
    assert len(api.batches) == 2
    [warning] = log_lines(dagster_home_instance, rerun, logging.WARNING)
    assert old_id in warning
    assert "ended expired" in warning


def test_a_fresh_batch_that_ends_badly_raises(openai_api: OpenAIServer) -> None:
    def end_every_batch(_: float) -> None:
        for batch_id in openai_api.batches:
            openai_api.end_batch(batch_id, "failed")

    openai_api.batch_polls = 5
    with pytest.raises(FlowstoneError, match=r"OpenAI batch batch_\d+ ended failed"):
        run_batch(resource_for(openai_api).client(), ["a"], job="doomed", sleep=end_every_batch)
    assert len(openai_api.batches) == 1
