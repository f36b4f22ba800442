"""LLMResource inside Dagster: token metadata, set-up failures and step retries."""

import uuid
from collections.abc import Iterator
from typing import Any

import dagster as dg
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.llm import LLMResource
from flowstone_dagster.resilience import (
    CircuitBreakerConfig,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
)
from flowstone_dagster_tests.support.llm_servers import AnthropicServer, llm_server

pytestmark = pytest.mark.dagster

KEY = "sk-ant-dagster-5ecr3t-000111"


@pytest.fixture
def anthropic_api() -> Iterator[AnthropicServer]:
    with llm_server("anthropic", api_key=KEY) as server:
        yield server


def resilience(
    *, attempts: int = 3, breaker: CircuitBreakerConfig | None = None
) -> ResilienceResource:
    """The one resilience path on a private store; Dagster errors on (the default)."""
    return ResilienceResource(
        store_url=f"memory://llm-{uuid.uuid4().hex[:8]}",
        default_policy=ServicePolicy(
            retry=RetryConfig(max_attempts=attempts, base_delay=0.05),
            circuit_breaker=breaker or CircuitBreakerConfig(),
        ),
    )


def claude(server: AnthropicServer, **options: Any) -> LLMResource:
    options.setdefault("resilience", resilience())
    return LLMResource(
        provider="anthropic",
        model="claude-sonnet-5-5",
        api_key=KEY,
        base_url=server.base_url,
        **options,
    )


@dg.asset
def summaries(context: dg.AssetExecutionContext, llm: LLMResource) -> list[str]:
    with telemetry.observe(context):
        return [llm.call(f"Summarise ticket {n}", max_tokens=20) for n in (1, 2)]


def test_an_asset_gets_token_metadata_on_its_materialization(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    anthropic_api.reply("First summary", input_tokens=40, output_tokens=6)
    anthropic_api.reply("Second summary", input_tokens=42, output_tokens=7)
    result = dg.materialize(
        [summaries], resources={"llm": claude(anthropic_api)}, instance=dagster_instance
    )
    assert result.success
    assert result.output_for_node("summaries") == ["First summary", "Second summary"]
    [materialization] = result.asset_materializations_for_node("summaries")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["flowstone/llm.call/calls"] == 2
    assert metadata["flowstone/llm.call/attempts"] == 3  # the 529 was retried
    assert metadata["flowstone/llm.call/input_tokens"] == 82
    assert metadata["flowstone/llm.call/output_tokens"] == 13
    assert metadata["flowstone/llm.call/errors"] == 0
    assert len(anthropic_api.requests) == 3


def test_a_missing_key_fails_the_run_at_setup_before_any_request(
    anthropic_api: AnthropicServer,
    dagster_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    resource = LLMResource(
        provider="anthropic", model="claude-sonnet-5-5", base_url=anthropic_api.base_url
    )
    result = dg.materialize(
        [summaries],
        resources={"llm": resource},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_failure]
    assert "api_key: no API key" in str(failure.event_specific_data)
    assert anthropic_api.requests == []


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=2))
def labelled(llm: LLMResource) -> str:
    return llm.call("Label this")


def test_an_error_retrying_cannot_fix_fails_the_step_without_step_retries(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    anthropic_api.fail(400, "invalid_request_error", "messages: content is too long")
    result = dg.materialize(
        [labelled],
        resources={"llm": claude(anthropic_api)},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    assert len(anthropic_api.requests) == 1  # neither the call nor the step was retried
    [failure] = [event for event in result.all_events if event.is_step_failure]
    assert "content is too long" in str(failure.event_specific_data)


def test_an_open_circuit_asks_dagster_to_retry_the_step_later(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    llm = claude(
        anthropic_api,
        resilience=resilience(attempts=1, breaker=CircuitBreakerConfig(threshold=2, timeout=1)),
    )
    breaker = llm.client().breaker
    assert breaker is not None
    for _ in range(breaker.threshold):  # open it as earlier failing steps would have
        anthropic_api.fail(503, "api_error", "down")
        with pytest.raises(Exception, match="503"):
            llm.call("x")

    @dg.asset
    def guarded(llm: LLMResource) -> str:
        return llm.call("Label this")

    anthropic_api.reply("after the pause")
    result = dg.materialize([guarded], resources={"llm": llm}, instance=dagster_instance)
    # The first step attempt met the open circuit (no request) and asked for a retry in 1 s;
    # the retry's call was the probe that closed it.
    retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
    assert len(retries) == 1
    assert result.output_for_node("guarded") == "after the pause"
    assert len(anthropic_api.requests) == breaker.threshold + 1


def test_several_providers_in_one_definitions(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    with llm_server("openai", api_key=None) as local:
        anthropic_api.reply("from claude")
        local.reply("from llama")

        @dg.asset
        def both(claude: LLMResource, local_llm: LLMResource) -> list[str]:
            return [claude.call("a"), local_llm.call("b")]

        defs = dg.Definitions(
            assets=[both],
            resources={
                "claude": claude(anthropic_api),
                "local_llm": LLMResource(
                    provider="openai_compatible",
                    model="llama3.2",
                    base_url=local.base_url,
                    resilience=resilience(),
                ),
            },
        )
        result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
            instance=dagster_instance
        )
    assert result.output_for_node("both") == ["from claude", "from llama"]


def _error_texts(error: Any) -> Iterator[str]:
    """Every message and stack line of a serialized error, its causes and contexts."""
    seen: set[int] = set()
    pending = [error]
    while pending:
        info = pending.pop()
        if info is None or id(info) in seen:
            continue
        seen.add(id(info))
        yield info.message
        yield info.cls_name or ""
        yield from info.stack
        pending += [info.cause, info.context]


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_a_key_echoed_by_the_server_never_reaches_the_event_log(
    kind: str, dagster_instance: dg.DagsterInstance
) -> None:
    sent = f"sk-{kind}-wrong-9f8e7d6c5b4a39281706"
    with llm_server(kind, api_key=KEY, echo_credentials=True) as server:
        llm = LLMResource(
            provider=kind,  # type: ignore[arg-type]
            model="m",
            api_key=sent,
            base_url=server.base_url,
            resilience=resilience(),
        )
        result = dg.materialize(
            [labelled], resources={"llm": llm}, instance=dagster_instance, raise_on_error=False
        )
        assert len(server.requests) == 1  # a 401 is not retried, neither call nor step
    assert not result.success
    [failure] = [event for event in result.all_events if event.is_step_failure]
    data = failure.step_failure_data
    assert data.error is not None
    texts = list(_error_texts(data.error))
    assert any("invalid" in text.lower() for text in texts)  # the server's message is there
    assert all(sent not in text for text in texts)
    assert sent not in str(failure.event_specific_data)
    assert sent not in str(data.user_failure_data)
    for record in dagster_instance.all_logs(result.run_id):
        assert sent not in record.user_message
        assert sent not in str(record.dagster_event)


@dg.asset
def plain_labels(llm: LLMResource) -> list[str]:
    # No context, no telemetry.observe: the usage still reaches the materialization.
    return [llm.call(f"Label ticket {n}", max_tokens=5) for n in (1, 2)]


def test_usage_reaches_the_materialization_without_observe(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    anthropic_api.reply("refund", input_tokens=40, output_tokens=2, cache_read=100)
    anthropic_api.reply("billing", input_tokens=42, output_tokens=3)
    result = dg.materialize(
        [plain_labels], resources={"llm": claude(anthropic_api)}, instance=dagster_instance
    )
    assert result.success
    [materialization] = result.asset_materializations_for_node("plain_labels")
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["flowstone/llm/calls"] == 2
    assert metadata["flowstone/llm/attempts"] == 3  # the 529 was retried
    assert metadata["flowstone/llm/prompt_tokens"] == 182  # cached tokens included
    assert metadata["flowstone/llm/completion_tokens"] == 5
    assert metadata["flowstone/llm/total_tokens"] == 187
    assert metadata["flowstone/llm/cache_read_tokens"] == 100
    assert metadata["flowstone/llm/errors"] == 0
    assert metadata["flowstone/llm/models"] == "claude-sonnet-5-5"


@dg.asset
def first_step(llm: LLMResource) -> str:
    return llm.call("one")


@dg.asset(deps=[first_step])
def second_step(llm: LLMResource) -> str:
    return llm.call("two") + llm.call("three")


def test_each_step_gets_its_own_totals(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    result = dg.materialize(
        [first_step, second_step],
        resources={"llm": claude(anthropic_api)},
        instance=dagster_instance,
    )
    assert result.success
    calls = {
        node: result.asset_materializations_for_node(node)[0].metadata["flowstone/llm/calls"].value
        for node in ("first_step", "second_step")
    }
    assert calls == {"first_step": 1, "second_step": 2}


def test_calls_outside_a_step_attach_nothing(anthropic_api: AnthropicServer) -> None:
    llm = claude(anthropic_api)
    assert llm.call("Hi") == "ok"  # no context, no error
