"""LLMResource and LLMClient against Anthropic- and OpenAI-shaped servers on loopback."""

import json
import threading
import time
import uuid
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import dagster as dg
import pydantic
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    CircuitOpen,
    ConfigurationError,
    Forbidden,
    HTTPError,
    MaxAttemptsExceeded,
    NotFound,
    RateLimited,
    TransportError,
    Unauthorized,
)
from flowstone_dagster.llm import (
    InvalidJSON,
    LLMClient,
    LLMResource,
    StreamInterrupted,
    rate_limit_wait,
)
from flowstone_dagster.llm.failures import parse_duration
from flowstone_dagster.resilience import (
    CircuitBreakerConfig,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
)
from flowstone_dagster_tests.support.llm_servers import AnthropicServer, OpenAIServer, llm_server

KEY = "sk-ant-test-5ecr3t-0123456789"
OPENAI_KEY = "sk-proj-test-5ecr3t-9876543210"


@pytest.fixture
def anthropic_api() -> Iterator[AnthropicServer]:
    with llm_server("anthropic", api_key=KEY) as server:
        yield server


@pytest.fixture
def openai_api() -> Iterator[OpenAIServer]:
    with llm_server("openai", api_key=OPENAI_KEY) as server:
        yield server


def store() -> str:
    return f"memory://llm-{uuid.uuid4().hex[:8]}"


def resilience(
    *,
    attempts: int = 3,
    max_delay: float = 10.0,
    threshold: int | None = 5,
    open_for: float = 30.0,
    store_url: str | None = None,
) -> ResilienceResource:
    """The one resilience path, on a private store, raising the taxonomy's errors."""
    return ResilienceResource(
        store_url=store_url or store(),
        default_policy=ServicePolicy(
            retry=RetryConfig(max_attempts=attempts, base_delay=0.05, max_delay=max_delay),
            circuit_breaker=(
                CircuitBreakerConfig(threshold=threshold, timeout=open_for)
                if threshold is not None
                else None
            ),
        ),
        dagster_errors=False,
    )


RESILIENCE_OPTIONS = ("attempts", "max_delay", "threshold", "open_for", "store_url")


def _split(options: dict[str, Any]) -> ResilienceResource:
    return resilience(**{k: options.pop(k) for k in RESILIENCE_OPTIONS if k in options})


def anthropic_client(server: AnthropicServer, **options: Any) -> LLMClient:
    guard = _split(options)
    return LLMClient(
        "anthropic",
        model="claude-3-sonnet-20240229",
        api_key=KEY,
        base_url=server.base_url,
        resilience=guard,
        **options,
    )


def openai_client(server: OpenAIServer, **options: Any) -> LLMClient:
    guard = _split(options)
    options.setdefault("provider", "openai")
    provider = options.pop("provider")
    options.setdefault("api_key", OPENAI_KEY)
    return LLMClient(
        provider, model="gpt-4o-mini", base_url=server.base_url, resilience=guard, **options
    )


# -- a call, a rate limit retried, a timeout -----------------------------------------------------


def test_calls_anthropic_api_successfully(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply("Test response")
    llm = LLMResource(
        provider="anthropic",
        model="claude-3-sonnet-20240229",
        api_key=KEY,
        base_url=anthropic_api.base_url,
        rpm_limit=100,
        resilience=resilience(),
    )
    assert llm.call("Test prompt") == "Test response"
    [request] = anthropic_api.requests
    assert request.body["model"] == "claude-3-sonnet-20240229"
    assert request.body["messages"] == [{"role": "user", "content": "Test prompt"}]


def test_handles_rate_limiting_with_retry(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(429, "rate_limit_error", "Rate limit exceeded", headers={"retry-after": "1"})
    anthropic_api.reply("Success after retry")
    client = anthropic_client(anthropic_api, attempts=4, rpm_limit=100)
    response = client.chat("Test prompt")
    assert response.text == "Success after retry"
    assert response.attempts == 2
    first, second = anthropic_api.requests
    assert second.at - first.at >= 0.95  # waited what retry-after asked, not the 0.05 s backoff


def test_handles_timeout_errors(anthropic_api: AnthropicServer) -> None:
    release = threading.Event()
    anthropic_api.stall(release)
    client = anthropic_client(anthropic_api, attempts=1, threshold=None)
    try:
        with pytest.raises(CallTimeout) as raised:
            client.call("Test", timeout=0.1)
    finally:
        release.set()
    assert raised.value.timeout == pytest.approx(0.1)
    assert len(anthropic_api.requests) == 1


# -- requests on the wire, field by field --------------------------------------------------------


def test_anthropic_request_headers_and_body(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply("Bonjour")
    client = anthropic_client(anthropic_api)
    text = client.call(
        [
            {"role": "system", "content": "Answer in French."},
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Again"},
        ],
        system="Be brief.",
        max_tokens=50,
        stop=["\n\n"],
    )
    assert text == "Bonjour"
    [request] = anthropic_api.requests
    headers = {key.lower(): value for key, value in request.headers.items()}
    # What anthropic 2.14 sends (measured): the key as a Bearer token and its API version.
    assert headers["authorization"] == f"Bearer {KEY}"
    assert headers["anthropic-version"] == "2026-10-21"
    assert headers["content-type"] == "application/json"
    assert headers["x-stainless-retry-count"] == "0"  # the SDK's own retries are off
    assert request.path == "/v1/messages"
    assert request.body == {
        "model": "claude-3-sonnet-20240229",
        "max_tokens": 50,
        "system": "Be brief.\n\nAnswer in French.",  # the top-level field, never a message
        "messages": [
            {"role": "user", "content": "Hello"},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "user", "content": "Again"},
        ],
        "stop_sequences": ["\n\n"],
    }


def test_anthropic_always_sends_max_tokens(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply("ok")
    anthropic_client(anthropic_api, max_tokens=77).call("Hi")
    assert anthropic_api.requests[0].body["max_tokens"] == 77


def test_anthropic_response_fields(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply(
        "Cut", stop_reason="max_tokens", input_tokens=12, output_tokens=3, model="claude-x-1"
    )
    response = anthropic_client(anthropic_api).chat("Hi")
    assert (response.text, response.model, response.stop_reason) == (
        "Cut",
        "claude-x-1",
        "max_tokens",
    )
    assert (response.usage.input_tokens, response.usage.output_tokens) == (12, 3)
    assert response.truncated
    assert response.raw.id.startswith("msg_")


def test_openai_request_headers_and_body(openai_api: OpenAIServer) -> None:
    openai_api.reply("Hi!", input_tokens=9, output_tokens=2)
    response = openai_client(openai_api).chat(
        "Hello", system="Be brief.", max_tokens=20, temperature=1.5, stop="END"
    )
    assert (response.text, response.stop_reason, response.usage.output_tokens) == ("Hi!", "stop", 2)
    [request] = openai_api.requests
    assert request.headers["Authorization"] == f"Bearer {OPENAI_KEY}"
    assert request.path == "/v1/chat/completions"
    assert request.body == {
        "model": "gpt-4o-mini",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hello"},
        ],
        "max_completion_tokens": 20,  # OpenAI's current field; max_tokens is deprecated
        "temperature": 1.5,
        "stop": ["END"],
    }


def test_openai_compatible_sends_max_tokens_and_no_stray_key(
    openai_api: OpenAIServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-real-openai-key-never-sent")
    openai_api.api_key = None  # a local server that wants no key
    openai_api.reply("local answer")
    client = openai_client(openai_api, provider="openai_compatible", api_key=None)
    assert client.call("Hello", max_tokens=5) == "local answer"
    [request] = openai_api.requests
    assert "Authorization" not in request.headers
    assert request.body["max_tokens"] == 5
    assert "max_completion_tokens" not in request.body
    assert client.service == f"llm:openai_compatible:http://127.0.0.1:{openai_api.server.port}"


def test_anthropic_has_no_temperature(anthropic_api: AnthropicServer) -> None:
    with pytest.raises(ConfigurationError, match="temperature: the Messages API"):
        anthropic_client(anthropic_api).call("Hi", temperature=0.2)
    with pytest.raises(ConfigurationError, match="temperature"):
        anthropic_client(anthropic_api, temperature=0.5)
    assert anthropic_api.requests == []


def test_bad_messages_fail_before_any_request(anthropic_api: AnthropicServer) -> None:
    client = anthropic_client(anthropic_api)
    with pytest.raises(ConfigurationError, match=r"messages\[1\]: role must be one of"):
        client.call([{"role": "user", "content": "a"}, {"role": "robot", "content": "b"}])
    with pytest.raises(ConfigurationError, match="prompt: must not be empty"):
        client.call("")
    with pytest.raises(ConfigurationError, match="at least one user or assistant"):
        client.call([{"role": "system", "content": "only a system prompt"}])
    assert anthropic_api.requests == []


# -- errors: retried or not ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [(500, "api_error"), (503, "api_error"), (529, "overloaded_error"), (504, "timeout_error")],
)
def test_transient_statuses_are_retried(
    anthropic_api: AnthropicServer, status: int, kind: str
) -> None:
    anthropic_api.fail(status, kind, "try again")
    anthropic_api.reply("recovered")
    assert anthropic_client(anthropic_api).call("Hi") == "recovered"
    assert len(anthropic_api.requests) == 2


@pytest.mark.parametrize(
    ("status", "kind", "message", "error"),
    [
        (
            400,
            "invalid_request_error",
            "messages: text content blocks must be non-empty",
            HTTPError,
        ),
        (401, "authentication_error", "invalid x-api-key", Unauthorized),
        (403, "permission_error", "Your API key does not have permission", Forbidden),
        (404, "not_found_error", "model: claude-nope", NotFound),
        (422, "invalid_request_error", "unprocessable", HTTPError),
    ],
)
def test_client_errors_are_not_retried_and_keep_the_provider_message(
    anthropic_api: AnthropicServer, status: int, kind: str, message: str, error: type
) -> None:
    anthropic_api.fail(status, kind, message)
    with pytest.raises(error) as raised:
        anthropic_client(anthropic_api).call("Hi")
    assert raised.value.status == status
    assert f"{kind}: {message}" in str(raised.value)
    assert KEY not in str(raised.value)
    assert len(anthropic_api.requests) == 1


def test_openai_error_body_is_read(openai_api: OpenAIServer) -> None:
    openai_api.fail(400, "invalid_request_error", "Invalid 'messages[0].content': empty.")
    with pytest.raises(HTTPError, match=r"Invalid 'messages\[0\].content': empty."):
        openai_client(openai_api).call("Hi")


def test_a_wrong_key_is_unauthorized_with_the_servers_message(
    anthropic_api: AnthropicServer,
) -> None:
    client = LLMClient(
        "anthropic",
        model="m",
        api_key="sk-wrong-key-000000",
        base_url=anthropic_api.base_url,
        resilience=resilience(),
    )
    with pytest.raises(Unauthorized, match="authentication_error: invalid x-api-key") as raised:
        client.call("Hi")
    assert "sk-wrong-key-000000" not in str(raised.value)


def test_retries_exhausted_name_the_last_error(anthropic_api: AnthropicServer) -> None:
    for _ in range(3):
        anthropic_api.fail(529, "overloaded_error", "Overloaded")
    with pytest.raises(MaxAttemptsExceeded) as raised:
        anthropic_client(anthropic_api, attempts=3, threshold=None).call("Hi")
    assert raised.value.attempts == 3
    assert isinstance(raised.value.last_error, HTTPError)
    assert raised.value.last_error.status == 529
    assert len(anthropic_api.requests) == 3


def test_retry_after_as_http_date_is_honoured(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(
        429,
        "rate_limit_error",
        "slow down",
        headers={"retry-after": formatdate(time.time() + 2, usegmt=True)},
    )
    anthropic_api.reply("ok")
    assert anthropic_client(anthropic_api).call("Hi") == "ok"
    first, second = anthropic_api.requests
    assert second.at - first.at >= 0.9  # an HTTP date has 1 s resolution


def test_openai_reset_headers_are_honoured(openai_api: OpenAIServer) -> None:
    openai_api.fail(
        429,
        "requests",
        "Rate limit reached for requests",
        headers={"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "1s200ms"},
    )
    openai_api.reply("ok")
    assert openai_client(openai_api).call("Hi") == "ok"
    first, second = openai_api.requests
    assert second.at - first.at >= 1.15


def test_a_long_retry_after_ends_the_retries(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(429, "rate_limit_error", "slow down", headers={"retry-after": "120"})
    with pytest.raises(RateLimited) as raised:  # as documented; not MaxAttemptsExceeded
        anthropic_client(anthropic_api, max_delay=10).call("Hi")
    assert raised.value.retry_after == 120
    assert len(anthropic_api.requests) == 1


def test_rate_limit_wait_reads_every_header_shape() -> None:
    now = 1_700_000_000.0
    assert rate_limit_wait({"retry-after": "3"}, now=now) == 3
    assert rate_limit_wait({"retry-after-ms": "250"}, now=now) == 0.25
    assert rate_limit_wait(
        {
            "anthropic-ratelimit-tokens-remaining": "0",
            "anthropic-ratelimit-tokens-reset": "2023-11-14T22:13:25Z",
            "anthropic-ratelimit-requests-remaining": "10",
            "anthropic-ratelimit-requests-reset": "2023-11-14T22:15:00Z",
        },
        now=now,
    ) == pytest.approx(5.0)
    assert (
        rate_limit_wait(
            {
                "retry-after": "1",
                "x-ratelimit-remaining-tokens": "0",
                "x-ratelimit-reset-tokens": "6m0s",
            },
            now=now,
        )
        == 360.0
    )
    assert rate_limit_wait({}, now=now) is None
    assert parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3.5s") == 3723.5
    assert parse_duration("soon") is None


def test_a_refused_connection_is_a_transport_error() -> None:
    from flowstone_dagster_tests.support.net import free_port

    client = LLMClient(
        "anthropic",
        model="m",
        api_key=KEY,
        base_url=f"http://127.0.0.1:{free_port()}",
        resilience=resilience(attempts=2),
    )
    with pytest.raises(MaxAttemptsExceeded) as raised:
        client.call("Hi")
    assert isinstance(raised.value.last_error, TransportError)
    assert raised.value.attempts == 2


def test_a_timeout_is_retried_then_succeeds(anthropic_api: AnthropicServer) -> None:
    release = threading.Event()
    anthropic_api.stall(release)
    anthropic_api.reply("second try")
    try:
        assert anthropic_client(anthropic_api, timeout=0.2).call("Hi") == "second try"
    finally:
        release.set()
    assert len(anthropic_api.requests) == 2


# -- circuit breaker -----------------------------------------------------------------------------


def test_the_breaker_opens_after_repeated_failures(anthropic_api: AnthropicServer) -> None:
    client = anthropic_client(anthropic_api, attempts=1, threshold=2, open_for=60)
    for _ in range(2):
        anthropic_api.fail(503, "api_error", "down")
        with pytest.raises(MaxAttemptsExceeded) as failed:
            client.call("Hi")
        assert isinstance(failed.value.last_error, HTTPError)
    with pytest.raises(CircuitOpen) as raised:
        client.call("Hi")
    # The breaker covers what fails together: the provider at one origin.
    assert raised.value.name == f"llm:anthropic:http://127.0.0.1:{anthropic_api.server.port}"
    assert len(anthropic_api.requests) == 2  # the third call never reached the server


def test_a_429_never_opens_the_breaker(anthropic_api: AnthropicServer) -> None:
    client = anthropic_client(anthropic_api, attempts=1, threshold=1)
    anthropic_api.fail(429, "rate_limit_error", "slow down", headers={"retry-after": "0"})
    with pytest.raises(MaxAttemptsExceeded):
        client.call("Hi")
    anthropic_api.reply("still open for business")
    assert client.call("Hi") == "still open for business"


def test_two_resources_on_different_base_urls_do_not_share_a_breaker() -> None:
    shared = store()
    with (
        llm_server("anthropic", api_key=KEY) as failing,
        llm_server("anthropic", api_key=KEY) as healthy,
    ):

        def resource(server: AnthropicServer) -> LLMResource:
            return LLMResource(
                provider="anthropic",
                model="claude-sonnet-5-5",
                api_key=KEY,
                base_url=server.base_url,
                resilience=resilience(attempts=1, threshold=2, open_for=60, store_url=shared),
            )

        down, up = resource(failing), resource(healthy)
        assert down.client().service != up.client().service
        for _ in range(2):
            failing.fail(503, "api_error", "down")
            with pytest.raises(MaxAttemptsExceeded):
                down.call("Hi")
        with pytest.raises(CircuitOpen):
            down.call("Hi")
        for n in range(3):
            healthy.reply(f"fine {n}")
            assert up.call("Hi") == f"fine {n}"
    assert len(failing.requests) == 2
    assert len(healthy.requests) == 3  # its breaker is its own: every request went out


def test_each_configured_provider_has_its_own_breaker(
    anthropic_api: AnthropicServer, openai_api: OpenAIServer
) -> None:
    shared = store()
    claude = LLMClient(
        "anthropic",
        model="m",
        api_key=KEY,
        base_url=anthropic_api.base_url,
        resilience=resilience(attempts=1, threshold=1, store_url=shared),
    )
    gpt = LLMClient(
        "openai",
        model="m",
        api_key=OPENAI_KEY,
        base_url=openai_api.base_url,
        resilience=resilience(attempts=1, threshold=1, store_url=shared),
    )
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    with pytest.raises(MaxAttemptsExceeded):
        claude.call("Hi")
    with pytest.raises(CircuitOpen):
        claude.call("Hi")
    openai_api.reply("still fine")
    assert gpt.call("Hi") == "still fine"


# -- JSON ----------------------------------------------------------------------------------------


def test_json_replies_are_parsed(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply('```json\n{"label": "spam", "score": 0.9}\n```')
    assert anthropic_client(anthropic_api).call("Classify", json=True) == {
        "label": "spam",
        "score": 0.9,
    }
    assert "JSON" in anthropic_api.requests[0].body["system"]


def test_invalid_json_is_a_clear_error_carrying_the_text(
    anthropic_api: AnthropicServer, events: list[telemetry.TelemetryEvent]
) -> None:
    anthropic_api.reply("Sure! The label is spam.")
    with pytest.raises(InvalidJSON, match="not valid JSON") as raised:
        anthropic_client(anthropic_api).call("Classify", json=True)
    assert raised.value.text == "Sure! The label is spam."
    assert len(anthropic_api.requests) == 1  # not retried: the call itself worked
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert (event.outcome, event.error_type) == ("error", "InvalidJSON")
    assert event.measures["output_tokens"] > 0


def test_a_cut_json_reply_says_to_raise_max_tokens(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply('{"items": [1, 2', stop_reason="max_tokens")
    with pytest.raises(InvalidJSON, match="raise max_tokens"):
        anthropic_client(anthropic_api).chat("List", json=True)


def test_openai_json_mode_uses_response_format(openai_api: OpenAIServer) -> None:
    openai_api.reply('{"ok": true}')
    assert openai_client(openai_api).call("Answer", json=True) == {"ok": True}
    body = openai_api.requests[0].body
    assert body["response_format"] == {"type": "json_object"}
    assert "json" in body["messages"][0]["content"].lower()  # the server insists, as OpenAI does


# -- streams -------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [None, 3, 1])
def test_anthropic_stream_delivers_deltas_then_usage(
    anthropic_api: AnthropicServer, chunk_size: int | None
) -> None:
    anthropic_api.reply(
        "The quick brown fox", input_tokens=7, output_tokens=5, chunk_size=chunk_size
    )
    with anthropic_client(anthropic_api).stream("Tell me", system="Be short") as stream:
        deltas = list(stream)
    assert deltas == ["The ", "quick ", "brown ", "fox"]
    assert stream.text == "The quick brown fox"
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (7, 5)
    assert stream.stop_reason == "end_turn"
    assert stream.response is not None
    assert stream.response.text == stream.text
    body = anthropic_api.requests[0].body
    assert body["stream"] is True
    assert body["system"] == "Be short"


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_openai_stream_delivers_deltas_then_usage(
    openai_api: OpenAIServer, chunk_size: int | None
) -> None:
    openai_api.reply("one two three", input_tokens=4, output_tokens=3, chunk_size=chunk_size)
    stream = openai_client(openai_api).stream("Count")
    assert list(stream) == ["one ", "two ", "three"]
    assert (stream.usage.input_tokens, stream.usage.output_tokens, stream.stop_reason) == (
        4,
        3,
        "stop",
    )
    assert openai_api.requests[0].body["stream_options"] == {"include_usage": True}


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_a_dropped_stream_raises_with_the_text_so_far(kind: str) -> None:
    with llm_server(kind, api_key=KEY) as server:
        server.reply("alpha beta gamma delta", drop_after=2, chunk_size=5)
        client = LLMClient(
            kind, model="m", api_key=KEY, base_url=server.base_url, resilience=resilience()
        )
        stream = client.stream("Hi")
        with pytest.raises(StreamInterrupted) as raised:
            list(stream)
    assert stream.text == "alpha beta "
    assert raised.value.partial_text == "alpha beta "
    assert isinstance(raised.value.error, TransportError)
    assert raised.value.retryable


@pytest.mark.parametrize("kind", ["anthropic", "openai"])
def test_a_stream_without_its_final_event_is_not_a_silent_truncation(kind: str) -> None:
    with llm_server(kind, api_key=KEY) as server:
        server.reply("alpha beta", end_early=True)
        client = LLMClient(
            kind, model="m", api_key=KEY, base_url=server.base_url, resilience=resilience()
        )
        with pytest.raises(StreamInterrupted, match="ended without its final event") as raised:
            list(client.stream("Hi"))
    assert raised.value.partial_text == "alpha beta"


def test_an_error_event_mid_stream_raises(anthropic_api: AnthropicServer) -> None:
    anthropic_api.reply("alpha beta gamma", stream_error=(1, "overloaded_error", "Overloaded"))
    with pytest.raises(StreamInterrupted) as raised:
        list(anthropic_client(anthropic_api).stream("Hi"))
    assert raised.value.partial_text == "alpha "
    assert isinstance(raised.value.error, HTTPError)
    assert raised.value.error.status == 529
    assert len(anthropic_api.requests) == 1  # text was delivered: never replayed


def test_a_stream_failing_before_any_text_is_retried(anthropic_api: AnthropicServer) -> None:
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    anthropic_api.reply("alpha", stream_error=(0, "overloaded_error", "Overloaded"))
    anthropic_api.reply("finally here")
    stream = anthropic_client(anthropic_api).stream("Hi")
    assert "".join(stream) == "finally here"
    assert stream.attempts == 3


def test_leaving_a_stream_early_closes_it(
    anthropic_api: AnthropicServer, events: list[telemetry.TelemetryEvent]
) -> None:
    anthropic_api.reply("one two three four")
    with anthropic_client(anthropic_api).stream("Hi") as stream:
        for delta in stream:
            assert delta == "one "
            break
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert event.outcome == "cancelled"
    assert stream.usage is None


# -- limits --------------------------------------------------------------------------------------


def test_rpm_limit_queues_instead_of_earning_429s() -> None:
    with llm_server("openai", api_key=OPENAI_KEY, rpm_limit=120) as server:  # 2 per second
        client = LLMClient(
            "openai",
            model="m",
            api_key=OPENAI_KEY,
            base_url=server.base_url,
            resilience=resilience(attempts=1),
            rpm_limit=120,
            # Admission is measured here, arrival at the server: under a loaded CI machine the
            # delay between them varies by more than the default 3% of the window.
            rate_limit_margin=0.25,
        )
        errors: list[BaseException] = []

        def call() -> None:
            try:
                client.call("Hi")
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [threading.Thread(target=call) for _ in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    assert errors == []
    assert server.rejected == []
    times = sorted(request.at for request in server.requests)
    assert len(times) == 6
    assert times[-1] - times[0] >= 1.9  # 6 calls at 2 per second: at least 2 s


def test_tokens_are_estimated_before_and_corrected_after() -> None:
    with llm_server("anthropic", api_key=KEY) as server:
        client = LLMClient(
            "anthropic",
            model="m",
            api_key=KEY,
            base_url=server.base_url,
            resilience=resilience(),
            tpm_limit=10_000,
        )
        server.reply("long answer", input_tokens=30, output_tokens=470)
        client.call("x" * 80)  # estimated at 24 tokens before sending
    tpm = client.limiter("tpm")
    assert tpm is not None
    assert tpm.name == f"llm:anthropic:{client.origin}:m:tpm"
    assert tpm.usage() == pytest.approx(500)  # what the provider counted


def test_the_tpm_limit_waits_for_tokens_to_leave_the_window() -> None:
    with llm_server("anthropic", api_key=KEY) as server:
        client = LLMClient(
            "anthropic",
            model="m",
            api_key=KEY,
            base_url=server.base_url,
            resilience=resilience(attempts=1),
            tpm_limit=100,
            rate_limit_max_wait=0.5,
        )
        server.reply("big", input_tokens=20, output_tokens=80)
        client.call("Hi")
        with pytest.raises(RateLimited) as raised:
            client.call("Hi")  # the window is full for a minute: refused after 0.5 s
    assert ":m:tpm" in str(raised.value)
    assert raised.value.retry_after is not None
    assert raised.value.retry_after > 10
    assert len(server.requests) == 1


def test_two_models_on_one_endpoint_have_separate_rpm_limits(openai_api: OpenAIServer) -> None:
    # 60 rpm: one request per second per model, and no waiting for capacity.
    client = openai_client(openai_api, attempts=1, rpm_limit=60, rate_limit_max_wait=0)
    assert client.call("Hi", model="gpt-a") == "ok"
    assert client.call("Hi", model="gpt-b") == "ok"  # another model: its own quota
    with pytest.raises(MaxAttemptsExceeded) as raised:
        client.call("Hi", model="gpt-a")  # the same model within the second: refused
    assert isinstance(raised.value.last_error, RateLimited)
    assert f"llm:openai:{client.origin}:gpt-a:rpm" in str(raised.value.last_error)
    assert [request.body["model"] for request in openai_api.requests] == ["gpt-a", "gpt-b"]
    for model in ("gpt-a", "gpt-b"):
        limiter = client.limiter("rpm", model)
        assert limiter is not None
        assert limiter.usage() == 1


# -- configuration and secrets -------------------------------------------------------------------


def test_missing_key_fails_at_setup_naming_the_field(
    monkeypatch: pytest.MonkeyPatch, anthropic_api: AnthropicServer
) -> None:
    import dagster as dg

    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    resource = LLMResource(provider="anthropic", model="m", base_url=anthropic_api.base_url)
    with pytest.raises(ConfigurationError, match="api_key: no API key") as raised:
        resource.setup_for_execution(dg.build_init_resource_context())
    assert raised.value.field == "api_key"
    assert anthropic_api.requests == []


def test_the_key_defaults_to_the_providers_environment_variable(
    monkeypatch: pytest.MonkeyPatch, openai_api: OpenAIServer
) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", OPENAI_KEY)
    openai_api.reply("from env")
    resource = LLMResource(
        provider="openai", model="m", base_url=openai_api.base_url, resilience=resilience()
    )
    assert resource.call("Hi") == "from env"
    assert openai_api.requests[0].headers["Authorization"] == f"Bearer {OPENAI_KEY}"


def test_openai_compatible_needs_a_base_url() -> None:
    with pytest.raises(ConfigurationError, match="base_url: is required for openai_compatible"):
        LLMClient("openai_compatible", model="llama3.2")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"timeout": -1}, "timeout"),
        ({"rate_limit_margin": -1}, "rate_limit_margin"),
        ({"service": " "}, "service"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_bad_settings_name_the_field(options: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        LLMClient("anthropic", model="m", api_key=KEY, **options)
    assert raised.value.field == field


def test_the_key_never_shows(
    anthropic_api: AnthropicServer, events: list[telemetry.TelemetryEvent]
) -> None:
    resource = LLMResource(
        provider="anthropic",
        model="m",
        api_key=KEY,
        base_url=anthropic_api.base_url,
        resilience=resilience(),
    )
    anthropic_api.reply("fine")
    resource.call("my secret prompt text")
    assert KEY not in repr(resource)
    assert KEY not in repr(resource.client())
    for event in events:
        shown = telemetry.format_event(event) + json.dumps(dict(event.measures), default=str)
        assert KEY not in shown
        assert "my secret prompt text" not in shown


# -- telemetry -----------------------------------------------------------------------------------


def test_each_call_emits_one_event(
    anthropic_api: AnthropicServer, events: list[telemetry.TelemetryEvent]
) -> None:
    anthropic_api.fail(529, "overloaded_error", "Overloaded")
    anthropic_api.reply("done", input_tokens=11, output_tokens=4, stop_reason="end_turn")
    anthropic_client(anthropic_api).call("Twelve chars")
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert (event.outcome, event.attempts) == ("ok", 2)
    assert event.duration_s > 0
    assert dict(event.measures) == {
        "provider": "anthropic",
        "service": f"llm:anthropic:http://127.0.0.1:{anthropic_api.server.port}",
        "model": "claude-3-sonnet-20240229",
        "prompt_chars": 12,
        "stream": False,
        "input_tokens": 11,
        "output_tokens": 4,
        "stop_reason": "end_turn",
    }


def test_a_failed_call_emits_an_error_event(
    anthropic_api: AnthropicServer, events: list[telemetry.TelemetryEvent]
) -> None:
    anthropic_api.fail(400, "invalid_request_error", "bad")
    with pytest.raises(HTTPError):
        anthropic_client(anthropic_api).call("Hi")
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert (event.outcome, event.error_type, event.attempts) == ("error", "HTTPError", 1)


# -- scope and the default policy ----------------------------------------------------------------


def test_default_names_follow_what_fails_together_and_what_shares_a_quota() -> None:
    gpt = LLMClient("openai", model="gpt-4o-mini", api_key=OPENAI_KEY)
    assert gpt.service == "llm:openai:https://api.openai.com"
    assert gpt.limit_name("rpm") == "llm:openai:https://api.openai.com:gpt-4o-mini:rpm"
    assert gpt.limit_name("tpm", "o3") == "llm:openai:https://api.openai.com:o3:tpm"
    claude = LLMClient("anthropic", model="m", api_key=KEY, service="claude-prod")
    assert claude.service == "claude-prod"  # the breaker's name, chosen by the user
    assert claude.limit_name("rpm") == "llm:anthropic:https://api.anthropic.com:m:rpm"


def test_without_a_resilience_resource_the_llm_default_policy_applies() -> None:
    client = LLMClient("anthropic", model="m", api_key=KEY)
    policy = client.resilience.policy_for(client.service)
    assert policy.retry.max_attempts == 4
    assert policy.circuit_breaker is not None
    # A breaker and limits protect something only when every step process shares them: the
    # default shared store (here the session's, from $FLOWSTONE_RESILIENCE_STORE).
    assert client.resilience.resolved_store_url().startswith("sqlite://")


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"rpm_limit": 0}, "rpm_limit"),
        ({"rpm_window": 0}, "rpm_window"),
        ({"tpm_limit": 0.5}, "tpm_limit"),
        ({"timeout": -1}, "timeout"),
        ({"rate_limit_max_wait": -1}, "rate_limit_max_wait"),
        ({"rate_limit_margin": -1}, "rate_limit_margin"),
        ({"max_tokens": 0}, "max_tokens"),
    ],
)
def test_resource_constraints_fail_when_built_naming_the_field(
    options: dict[str, Any], field: str
) -> None:
    with pytest.raises(pydantic.ValidationError) as raised:
        LLMResource(provider="anthropic", model="m", api_key=KEY, **options)
    assert [error["loc"] for error in raised.value.errors()] == [(field,)]


def test_every_resource_field_reaches_the_client() -> None:
    resource = LLMResource(
        provider="openai_compatible",
        model="llama3.2",
        base_url="http://127.0.0.1:9/v1",
        max_tokens=7,
        temperature=0.5,
        timeout=3.0,
        rpm_limit=30,
        rpm_window=2.0,
        tpm_limit=900,
        rate_limit_max_wait=4.0,
        rate_limit_margin=0.5,
        service="llm:local",
    )
    client = resource.client()
    try:
        assert (client.model, client.max_tokens, client.temperature) == ("llama3.2", 7, 0.5)
        assert (client.timeout, client.service) == (3.0, "llm:local")
        assert client.rpm is not None
        assert client.tpm is not None
        assert (client.rpm.period, client.rpm.max_wait) == (3.0, 4.0)  # 2 s window * 1.5
        assert client.tpm.limit == 900
    finally:
        resource.teardown_after_execution(dg.build_init_resource_context())
