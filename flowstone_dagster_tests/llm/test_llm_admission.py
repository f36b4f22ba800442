"""A request that reaches the wire late after its rpm admission is admitted again there, so the
provider, counting arrivals in its own one-second windows, never sees more than the limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.llm import LLMClient
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY, resilience
from flowstone_dagster_tests.support.llm_servers import LLMServer, llm_server

RPM = 600  # 10 per second: the server refuses the 11th request in any 1-second window
STALL = 0.8


@pytest.fixture(params=["anthropic", "openai"])
def api(request: pytest.FixtureRequest) -> Iterator[LLMServer]:
    key = KEY if request.param == "anthropic" else OPENAI_KEY
    with llm_server(request.param, api_key=key, rpm_limit=RPM, rpm_window=1.0) as server:
        yield server


def client_for(server: LLMServer) -> LLMClient:
    anthropic = server.path == "/v1/messages"
    return LLMClient(
        "anthropic" if anthropic else "openai",
        model="claude-sonnet-5-5" if anthropic else "gpt-4o-mini",
        api_key=KEY if anthropic else OPENAI_KEY,
        base_url=server.base_url,
        rpm_limit=RPM,
        rpm_window=1.0,
        resilience=resilience(attempts=1, threshold=None),  # a 429 would fail the call
    )


def test_a_request_stalled_after_its_admission_is_admitted_again_at_the_wire(
    api: LLMServer,
) -> None:
    client = client_for(api)
    rpm = client.limit_name("rpm")
    stalled = threading.Event()
    readmitted: list[telemetry.TelemetryEvent] = []

    def on_event(event: telemetry.TelemetryEvent) -> None:
        # The first request admitted after waiting for the window stalls, between its
        # admission and its send, as long as a slow listener (or a garbage collection, or a
        # TLS handshake) may hold it.
        if event.name == "flowstone.ratelimit.wait" and event.measures.get("limiter") == rpm:
            if not stalled.is_set():
                stalled.set()
                time.sleep(STALL)
        elif event.name == "flowstone.ratelimit.readmitted":
            readmitted.append(event)

    remove = telemetry.add_listener(on_event)
    errors: list[BaseException] = []

    def call() -> None:
        try:
            client.call("Hi")
        except Exception as exc:  # reported below, with the server's view
            errors.append(exc)

    try:
        for _ in range(10):  # the first window's 10 requests
            call()
        # 20 more at once: 10 are admitted when the first window passes, one of which stalls
        # and reaches the server 0.8 s later, in the window of the 10 admitted after it.
        threads = [threading.Thread(target=call) for _ in range(20)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    finally:
        remove()
        client.close()
    assert stalled.is_set()
    assert errors == []
    assert api.rejected == []  # without the second admission: a 429 here
    arrivals = sorted(request.at for request in api.requests)
    assert len(arrivals) == 30
    for first, eleventh in zip(arrivals, arrivals[10:], strict=False):
        assert eleventh - first >= 1.0  # never 11 in a second, as the server counted
    # the stalled request was admitted again (on a loaded machine another request may also
    # have been a few milliseconds too late)
    assert {event.measures["limiter"] for event in readmitted} == {rpm}
    assert max(event.measures["late_s"] for event in readmitted) >= STALL
