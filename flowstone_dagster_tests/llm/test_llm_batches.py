"""Batch jobs against the fake providers' batch endpoints: Anthropic Message Batches and
OpenAI's files + Batch API; results in input order, per-item errors, resumed after a restart."""

import uuid
from collections.abc import Iterator

import dagster as dg
import pytest

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.llm import BatchPending, LLMResource
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY
from flowstone_dagster_tests.support.llm_servers import LLMServer, llm_server


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
