"""The official SDK client handed out by get_client(): governed by the resilience path."""

import threading
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import anthropic
import dagster as dg
import openai
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import CircuitOpen
from flowstone_dagster.llm import LLMResource
from flowstone_dagster.resilience import (
    CircuitBreakerConfig,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
)
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY
from flowstone_dagster_tests.support.llm_servers import AnthropicServer, OpenAIServer, llm_server


@pytest.fixture
def anthropic_api() -> Iterator[AnthropicServer]:
    with llm_server("anthropic", api_key=KEY) as server:
        yield server


def governed(
    server: AnthropicServer | OpenAIServer, *, attempts: int = 3, threshold: int = 5, **options
) -> LLMResource:
    anthropic_side = server.path == "/v1/messages"
    return LLMResource(
        provider="anthropic" if anthropic_side else "openai",
        model="claude-sonnet-5-5" if anthropic_side else "gpt-4o-mini",
        api_key=KEY if anthropic_side else OPENAI_KEY,
        base_url=server.base_url,
        resilience=ResilienceResource(
            store_url=f"memory://gov-{uuid.uuid4().hex[:8]}",
            default_policy=ServicePolicy(
                retry=RetryConfig(max_attempts=attempts, base_delay=0.05),
                circuit_breaker=CircuitBreakerConfig(threshold=threshold, timeout=30),
            ),
            dagster_errors=False,
        ),
        **options,
    )


def test_the_sdk_client_is_retried_and_observed(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    anthropic_api.reply("Hello", input_tokens=9, output_tokens=2, cache_read=4)
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        sdk = governed(anthropic_api).get_client()
        assert isinstance(sdk, anthropic.Anthropic)
        message = sdk.messages.create(
            model="claude-sonnet-5-5",
            max_tokens=10,
            messages=[{"role": "user", "content": "Hi"}],
        )
    finally:
        remove()
    assert message.content[0].text == "Hello"
    assert len(anthropic_api.requests) == 2  # the 529 retried by the resilience path
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert event.attempts == 2
    assert event.measures["endpoint"] == "/v1/messages"
    assert event.measures["input_tokens"] == 13
    assert event.measures["cache_read_tokens"] == 4
    assert "flowstone.resilience.call" in {e.name for e in events}


def test_a_client_error_is_the_sdks_own_and_not_retried(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(400, "invalid_request_error", "bad request")
    sdk = governed(anthropic_api).get_client()
    with pytest.raises(anthropic.BadRequestError, match="bad request"):
        sdk.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert len(anthropic_api.requests) == 1


def test_exhausted_retries_hand_back_the_providers_answer(anthropic_api: AnthropicServer) -> None:
    for _ in range(2):
        anthropic_api.fail(503, "api_error", "unavailable")
    sdk = governed(anthropic_api, attempts=2).get_client()
    with pytest.raises(anthropic.InternalServerError):
        sdk.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}])
    assert len(anthropic_api.requests) == 2


def test_an_open_circuit_sends_nothing(anthropic_api: AnthropicServer) -> None:
    for _ in range(2):
        anthropic_api.fail(503, "api_error", "unavailable")
    llm = governed(anthropic_api, attempts=1, threshold=2)
    sdk = llm.get_client()
    for _ in range(2):
        with pytest.raises(anthropic.InternalServerError):
            sdk.messages.create(
                model="m", max_tokens=5, messages=[{"role": "user", "content": "Hi"}]
            )
    with pytest.raises(anthropic.APIConnectionError) as raised:
        sdk.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert isinstance(raised.value.__cause__, CircuitOpen)
    assert len(anthropic_api.requests) == 2
    # The breaker is the resource's own: llm.call sees it open too.
    with pytest.raises(CircuitOpen):
        llm.call("Hi")


def test_the_openai_sdk_client_shares_the_rpm_limit() -> None:
    with llm_server("openai", api_key=OPENAI_KEY) as server:
        llm = governed(server, rpm_limit=600, rpm_window=1.0)
        sdk = llm.get_client()
        assert isinstance(sdk, openai.OpenAI)
        sdk.chat.completions.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]
        )
        llm.call("b")
        limiter = llm.client().limiter("rpm")
        assert limiter is not None
        assert limiter.usage() == pytest.approx(2.0)
        assert server.requests[0].headers["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_a_retried_sdk_request_is_admitted_once_per_attempt() -> None:
    # The SDK's request object is sent again by the retries: each attempt checks its own rpm
    # admission at the wire, never the previous attempt's (late by the backoff).
    events: list[telemetry.TelemetryEvent] = []
    with llm_server("openai", api_key=OPENAI_KEY) as server:
        server.fail(503, "server_error", "unavailable")
        server.fail(503, "server_error", "unavailable")
        llm = governed(server, rpm_limit=600, rpm_window=1.0)
        remove = telemetry.add_listener(events.append)
        try:
            with llm.get_client() as sdk:
                sdk.chat.completions.create(
                    model="gpt-4o-mini", messages=[{"role": "user", "content": "a"}]
                )
        finally:
            remove()
        assert len(server.requests) == 3
        limiter = llm.client().limiter("rpm")
        assert limiter is not None
        assert limiter.usage() == pytest.approx(3.0)  # one unit per attempt, none taken again
    assert [e for e in events if e.name == "flowstone.ratelimit.readmitted"] == []


def test_a_keyless_local_server_gets_no_authorization_header() -> None:
    with llm_server("openai", api_key=None) as server:
        llm = LLMResource(
            provider="openai_compatible",
            model="llama3.2",
            base_url=server.base_url,
            resilience=ResilienceResource(store_url="memory://gov-local", dagster_errors=False),
        )
        llm.get_client().chat.completions.create(
            model="llama3.2", messages=[{"role": "user", "content": "a"}]
        )
    assert "Authorization" not in server.requests[0].headers


@pytest.mark.dagster
def test_the_sdk_clients_usage_reaches_the_materialization_from_worker_threads(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    @dg.asset
    def answers(context: dg.AssetExecutionContext, llm: LLMResource) -> int:
        with llm.get_client(context) as sdk, ThreadPoolExecutor(3) as pool:

            def ask(n: int) -> str:
                assert threading.current_thread() is not threading.main_thread()
                message = sdk.messages.create(
                    model="claude-sonnet-5-5",
                    max_tokens=5,
                    messages=[{"role": "user", "content": f"q{n}"}],
                )
                return message.content[0].text

            return len(list(pool.map(ask, range(3))))

    for _ in range(3):
        anthropic_api.reply("a", input_tokens=10, output_tokens=1)
    result = dg.materialize(
        [answers], resources={"llm": governed(anthropic_api)}, instance=dagster_instance
    )
    assert result.success
    metadata = result.asset_materializations_for_node("answers")[0].metadata
    assert metadata["flowstone/llm/calls"].value == 3
    assert metadata["flowstone/llm/prompt_tokens"].value == 30
    assert metadata["flowstone/llm/completion_tokens"].value == 3


def test_the_sdk_clients_timeout_bounds_a_trickling_reply(anthropic_api: AnthropicServer) -> None:
    import time

    anthropic_api.reply("word " * 160, chunk_size=4, trickle=0.2)  # the whole: over 40 s
    sdk = governed(anthropic_api, attempts=1, timeout=1.0).get_client()
    started = time.monotonic()
    with pytest.raises(anthropic.APITimeoutError):
        sdk.messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert time.monotonic() - started < 8.0
