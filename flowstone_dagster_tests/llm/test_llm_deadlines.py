"""``timeout`` bounds a whole request, and a 429 that cannot be waited out is ``RateLimited``."""

import time
from collections.abc import Iterator

import pytest

from flowstone_dagster.errors import CallTimeout, MaxAttemptsExceeded, RateLimited
from flowstone_dagster.llm import LLMClient, StreamInterrupted
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY, resilience
from flowstone_dagster_tests.support.llm_servers import LLMServer, llm_server

#: A reply of 800 characters sent 4 bytes every 0.2 s: every read is answered well within the
#: timeout, the whole answer takes well over 40 s.
LONG_TEXT = "word " * 160


@pytest.fixture(params=["anthropic", "openai"])
def api(request: pytest.FixtureRequest) -> Iterator[LLMServer]:
    key = KEY if request.param == "anthropic" else OPENAI_KEY
    with llm_server(request.param, api_key=key) as server:
        yield server


def client_for(server: LLMServer, **options: object) -> LLMClient:
    anthropic = server.path == "/v1/messages"
    return LLMClient(
        "anthropic" if anthropic else "openai",
        model="claude-sonnet-5-5" if anthropic else "gpt-4o-mini",
        api_key=KEY if anthropic else OPENAI_KEY,
        base_url=server.base_url,
        resilience=resilience(attempts=1, threshold=None),
        **options,  # type: ignore[arg-type]
    )


def test_a_trickling_reply_is_cut_at_the_timeout(api: LLMServer) -> None:
    api.reply(LONG_TEXT, chunk_size=4, trickle=0.2)
    client = client_for(api)
    started = time.monotonic()
    with pytest.raises(CallTimeout) as raised:
        client.call("Hi", timeout=1.0)
    elapsed = time.monotonic() - started
    assert elapsed < 8.0  # about 1 s; the whole body would take over 40 s
    assert raised.value.timeout == pytest.approx(1.0)
    assert "whole request" in str(raised.value)
    # The connection the watchdog cut is not reused: the next call is answered normally.
    api.reply("fine")
    assert client.call("Again", timeout=10.0) == "fine"


def test_a_trickling_stream_is_cut_at_the_timeout(api: LLMServer) -> None:
    # About 0.2 s per event: the first text arrives after about 1 s, the whole would take 30 s.
    api.reply(LONG_TEXT, chunk_size=32, trickle=0.05)
    client = client_for(api)
    started = time.monotonic()
    received: list[str] = []
    with pytest.raises(StreamInterrupted) as raised, client.stream("Hi", timeout=3.0) as stream:
        received.extend(stream)
    assert time.monotonic() - started < 8.0
    assert isinstance(raised.value.error, CallTimeout)
    assert raised.value.partial_text == "".join(received)
    assert 0 < len(received) < 160


def test_the_idle_timeout_of_a_stream_is_separate_from_its_total(api: LLMServer) -> None:
    # Chunks 0.05 s apart, the whole stream about 3-4 s: an idle timeout of 1 s is never
    # reached, and a total of 60 s is enough.
    api.reply("word " * 10, chunk_size=32, trickle=0.05)
    client = client_for(api, stream_idle_timeout=1.0)
    with client.stream("Hi", timeout=60.0) as stream:
        text = "".join(stream)
    assert text == "word " * 10


def test_a_fast_reply_is_unaffected_by_the_deadline(api: LLMServer) -> None:
    client = client_for(api)
    for number in range(20):
        api.reply(f"answer {number}")
        assert client.call("Hi", timeout=5.0) == f"answer {number}"


def test_a_429_that_cannot_be_waited_out_is_rate_limited(api: LLMServer) -> None:
    api.fail(429, "rate_limit_error", "slow down", headers={"retry-after": "120"})
    client = LLMClient(
        "anthropic" if api.path == "/v1/messages" else "openai",
        model="m",
        api_key=KEY if api.path == "/v1/messages" else OPENAI_KEY,
        base_url=api.base_url,
        resilience=resilience(attempts=4, max_delay=10),
    )
    with pytest.raises(RateLimited) as raised:
        client.call("Hi")
    assert not isinstance(raised.value, MaxAttemptsExceeded)
    assert raised.value.retry_after == 120
    assert raised.value.status == 429
    assert len(api.requests) == 1


def test_a_providers_429_fills_the_shared_window(api: LLMServer) -> None:
    # The provider counted more than our limiter admitted (requests reach it late): the rest
    # of our window is taken in the shared store, so that no process sends into the full window.
    api.fail(429, "rate_limit_error", "slow down", headers={"retry-after": "1"})
    client = client_for(api, rpm_limit=600, rpm_window=1.0)  # 10 per (1 s + margin)
    with pytest.raises(MaxAttemptsExceeded):  # one attempt allowed
        client.call("Hi")
    limiter = client.limiter("rpm")
    assert limiter is not None
    assert limiter.usage() == pytest.approx(11.0)  # the request itself, then the window's 10
