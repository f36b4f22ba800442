"""A request that reaches the wire late after its rpm admission is admitted again there, so the
provider, counting arrivals in its own one-second windows, never sees more than the limit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest

from flowstone_dagster import telemetry
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY
from flowstone_dagster_tests.llm.test_llm_deadlines import client_for
from flowstone_dagster_tests.support.llm_servers import LLMServer, llm_server

RPM = 600  # 10 per second: the server refuses the 11th request in any 1-second window
STALL = 0.8


@pytest.fixture(params=["anthropic", "openai"])
def api(request: pytest.FixtureRequest) -> Iterator[LLMServer]:
    key = KEY if request.param == "anthropic" else OPENAI_KEY
    with llm_server(request.param, api_key=key, rpm_limit=RPM, rpm_window=1.0) as server:
        yield server


def test_a_request_stalled_after_its_admission_is_admitted_again_at_the_wire(
    api: LLMServer,
) -> None:
    client = client_for(api, rpm_limit=RPM, rpm_window=1.0)
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


# -- the provider's rate-limit headers correct the shared state ------------------------------


def test_a_lower_limit_stated_by_the_provider_wins(
    api: LLMServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Configured for 6,000 rpm, the account has 600 (10 per second at the server): after the
    # first answer states it, this process keeps to 600, and no request is refused.
    client = client_for(api, rpm_limit=6000, rpm_window=1.0)
    with caplog.at_level("WARNING", logger="flowstone_dagster"):
        for _ in range(25):
            client.call("Hi")
    client.close()
    assert api.rejected == []
    arrivals = sorted(request.at for request in api.requests)
    for first, eleventh in zip(arrivals, arrivals[10:], strict=False):
        assert eleventh - first >= 1.0
    limiter = client.limiter("rpm")
    assert limiter is not None
    assert limiter.limit == 10  # 600 per minute, in 1 s windows
    warnings = [r.getMessage() for r in caplog.records if "lower than rpm_limit" in r.getMessage()]
    assert len(warnings) == 1  # once, not per call
    assert "600 requests per minute" in warnings[0]
    assert "rpm_limit=6000" in warnings[0]


def test_a_spent_minute_stated_by_the_provider_holds_every_process_until_its_reset(
    api: LLMServer,
) -> None:
    # Other users of the key spent the minute: the answer says nothing remains for 2.5 s.
    # The next request waits for the reset instead of earning a 429 (the limit's shared
    # window is full until then, for every process on the store).
    anthropic = api.path == "/v1/messages"
    if anthropic:
        reset = datetime.fromtimestamp(time.time() + 2.5, UTC).isoformat()
        spent = {
            "anthropic-ratelimit-requests-remaining": "0",
            "anthropic-ratelimit-requests-reset": reset.replace("+00:00", "Z"),
        }
    else:
        spent = {"x-ratelimit-remaining-requests": "0", "x-ratelimit-reset-requests": "2.5s"}
    api.reply("spent", headers=spent)
    client = client_for(api, rpm_limit=RPM, rpm_window=1.0)
    assert client.call("Hi") == "spent"
    started = time.monotonic()
    assert client.call("Again") == "ok"
    assert time.monotonic() - started >= 2.0
    client.close()
    assert api.rejected == []
