"""Fallbacks: another provider or model when the primary's circuit is open or it is
overloaded; the response and the metadata name the model that answered."""

import uuid
from collections.abc import Iterator

import dagster as dg
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import HTTPError
from flowstone_dagster.llm import LLMFallback, LLMResource, StreamInterrupted
from flowstone_dagster.resilience import (
    CircuitBreakerConfig,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
)
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY
from flowstone_dagster_tests.support.llm_servers import AnthropicServer, OpenAIServer, llm_server


@pytest.fixture
def servers() -> Iterator[tuple[AnthropicServer, OpenAIServer]]:
    with (
        llm_server("anthropic", api_key=KEY) as primary,
        llm_server("openai", api_key=OPENAI_KEY) as backup,
    ):
        yield primary, backup


def resource(
    primary: AnthropicServer, backup: OpenAIServer, *, dagster_errors: bool = False
) -> LLMResource:
    return LLMResource(
        provider="anthropic",
        model="claude-sonnet-5-5",
        api_key=KEY,
        base_url=primary.base_url,
        resilience=ResilienceResource(
            store_url=f"memory://fallback-{uuid.uuid4().hex[:8]}",
            default_policy=ServicePolicy(
                retry=RetryConfig(max_attempts=2, base_delay=0.05),
                circuit_breaker=CircuitBreakerConfig(threshold=2, timeout=60),
            ),
            dagster_errors=dagster_errors,
        ),
        fallbacks=[
            LLMFallback(
                provider="openai", model="gpt-4o-mini", api_key=OPENAI_KEY, base_url=backup.base_url
            )
        ],
    )


def test_an_overloaded_primary_falls_back(servers: tuple[AnthropicServer, OpenAIServer]) -> None:
    primary, backup = servers
    for _ in range(2):
        primary.fail(529, "overloaded_error", "Overloaded")
    backup.reply("from the backup")
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        response = resource(primary, backup).chat("Hi")
    finally:
        remove()
    assert response.text == "from the backup"
    assert response.model == "gpt-4o-mini"
    assert response.fallback.startswith("openai:gpt-4o-mini@http://127.0.0.1:")
    assert len(primary.requests) == 2  # retried first, then given up on
    assert backup.requests[0].body["messages"] == [{"role": "user", "content": "Hi"}]
    [switch] = [e for e in events if e.name == "flowstone.llm.fallback"]
    assert switch.measures["reason"] == "HTTPError"
    assert switch.measures["model"] == "claude-sonnet-5-5"


def test_an_open_circuit_falls_back_without_calling_the_primary(
    servers: tuple[AnthropicServer, OpenAIServer],
) -> None:
    primary, backup = servers
    llm = resource(primary, backup)
    for _ in range(2):
        primary.fail(500, "api_error", "boom")
    backup.reply("first")
    assert llm.call("one") == "first"  # two 500s: the primary's breaker opens
    backup.reply("second")
    assert llm.chat("two").fallback is not None
    assert len(primary.requests) == 2  # the open circuit sent nothing more
    assert len(backup.requests) == 2


def test_a_bad_request_does_not_fall_back(servers: tuple[AnthropicServer, OpenAIServer]) -> None:
    primary, backup = servers
    primary.fail(400, "invalid_request_error", "prompt is too long")
    with pytest.raises(HTTPError, match="prompt is too long"):
        resource(primary, backup).call("Hi")
    assert backup.requests == []


def test_when_every_model_fails_the_last_error_is_raised(
    servers: tuple[AnthropicServer, OpenAIServer],
) -> None:
    primary, backup = servers
    for _ in range(2):
        primary.fail(529, "overloaded_error", "Overloaded")
        backup.fail(503, "server_error", "unavailable")
    with pytest.raises(Exception, match="503") as raised:
        resource(primary, backup).call("Hi")
    assert "openai" in str(raised.value)


def test_a_stream_that_cannot_open_falls_back(
    servers: tuple[AnthropicServer, OpenAIServer],
) -> None:
    primary, backup = servers
    for _ in range(2):
        primary.fail(529, "overloaded_error", "Overloaded")
    backup.reply("streamed from the backup")
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        with resource(primary, backup).stream("Hi") as stream:
            text = "".join(stream)
    finally:
        remove()
    assert text == "streamed from the backup"
    assert stream.fallback is not None
    assert stream.fallback.startswith("openai:gpt-4o-mini@")
    assert stream.model == "gpt-4o-mini"
    assert stream.response is not None
    assert stream.response.fallback == stream.fallback
    assert backup.requests[0].body["stream"] is True
    [switch] = [e for e in events if e.name == "flowstone.llm.fallback"]
    assert switch.measures["stream"] is True
    [call] = [e for e in events if e.name == "flowstone.llm.call"]
    assert call.outcome == "ok"
    assert call.measures["model"] == "gpt-4o-mini"
    assert call.measures["fallback"] == stream.fallback


def test_a_stream_broken_after_its_first_text_never_falls_back(
    servers: tuple[AnthropicServer, OpenAIServer],
) -> None:
    # The text handed out cannot be taken back: a fallback would repeat it.
    primary, backup = servers
    primary.reply("one two three four", deltas=["one ", "two ", "three ", "four"], drop_after=2)
    with pytest.raises(StreamInterrupted) as raised:
        "".join(resource(primary, backup).stream("Hi"))
    assert raised.value.partial_text == "one two "
    assert backup.requests == []


def test_a_stream_with_a_bad_request_does_not_fall_back(
    servers: tuple[AnthropicServer, OpenAIServer],
) -> None:
    primary, backup = servers
    primary.fail(400, "invalid_request_error", "prompt is too long")
    with pytest.raises(HTTPError, match="prompt is too long"):
        "".join(resource(primary, backup).stream("Hi"))
    assert backup.requests == []


@pytest.mark.dagster
def test_the_materialization_names_the_model_that_answered(
    servers: tuple[AnthropicServer, OpenAIServer], dagster_instance: dg.DagsterInstance
) -> None:
    primary, backup = servers

    @dg.asset
    def labels(llm: LLMResource) -> str:
        return llm.call("Label")

    for _ in range(2):
        primary.fail(529, "overloaded_error", "Overloaded")
    backup.reply("refund", input_tokens=7, output_tokens=1)
    result = dg.materialize(
        [labels],
        resources={"llm": resource(primary, backup, dagster_errors=True)},
        instance=dagster_instance,
    )
    assert result.success
    metadata = result.asset_materializations_for_node("labels")[0].metadata
    assert metadata["flowstone/llm/models"].value == "gpt-4o-mini"
    assert metadata["flowstone/llm/calls"].value == 2  # the failed primary call, then the backup
    assert metadata["flowstone/llm/errors"].value == 1
