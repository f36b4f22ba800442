"""An attempt's rate admission, published to the attempt and taken again when it is sent late."""

from __future__ import annotations

import threading
import time
import uuid

import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import MaxAttemptsExceeded
from flowstone_dagster.resilience import (
    RateLimitConfig,
    RateLimitExceeded,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    current_admission,
)

ONE_ATTEMPT = RetryConfig(max_attempts=1)


@pytest.fixture
def service() -> str:
    return f"svc-{uuid.uuid4().hex[:8]}"


def _resource(store_url: str, service: str, **policy: object) -> ResilienceResource:
    return ResilienceResource(
        store_url=store_url,
        policies={service: ServicePolicy(retry=ONE_ATTEMPT, **policy)},  # type: ignore[arg-type]
        dagster_errors=False,
    )


def test_the_attempt_sees_the_limits_it_was_admitted_under(store_url: str, service: str) -> None:
    resource = _resource(store_url, service, rate_limit=RateLimitConfig(limit=5, period=1.0))
    extra = (f"{service}:rpm", RateLimitConfig(limit=5, period=1.0), 1.0)
    assert current_admission() is None  # outside any call
    names = resource.call(service, lambda: current_admission().limiters, limits=[extra])  # type: ignore[union-attr]
    assert names == [service, f"{service}:rpm"]
    # a call that takes no limit publishes none
    assert resource.call("unlimited", current_admission) is None
    assert current_admission() is None  # and nothing is left behind


def test_an_attempt_sent_on_time_is_not_admitted_again(store_url: str, service: str) -> None:
    resource = _resource(store_url, service, rate_limit=RateLimitConfig(limit=5, period=5.0))
    lateness = resource.call(service, lambda: current_admission().confirm(1.0))  # type: ignore[union-attr]
    assert 0 <= lateness < 1.0
    limiter = resource.limiter(service)
    assert limiter is not None
    assert limiter.usage() == 1


def test_a_late_attempt_is_admitted_again_and_waits_for_room(
    store_url: str, service: str, events: list[telemetry.TelemetryEvent]
) -> None:
    # 2 per 0.6 s. The attempt stalls 0.3 s between its admission and its send (a full
    # garbage collection, a slow TLS handshake); meanwhile another call takes the window's
    # other unit. Sending now would put 3 requests in 0.6 s at the service: the attempt
    # waits until its own first reservation leaves the window, then goes.
    resource = _resource(store_url, service, rate_limit=RateLimitConfig(limit=2, period=0.6))
    started = time.monotonic()

    def late_send() -> tuple[float, int, float]:
        admission = current_admission()
        assert admission is not None
        time.sleep(0.3)
        resource.call(service, lambda: None)  # the other call, admitted meanwhile
        lateness = admission.confirm(0.05)
        return lateness, admission.readmitted, time.monotonic() - started

    lateness, readmitted, sent_after = resource.call(service, late_send)
    assert lateness >= 0.3
    assert readmitted == 1
    assert sent_after >= 0.6 - 0.02  # waited for its first reservation to leave the window
    limiter = resource.limiter(service)
    assert limiter is not None
    assert limiter.usage() == 2  # the readmission and the other call; the first one left
    readmissions = [event for event in events if event.name == "flowstone.ratelimit.readmitted"]
    assert len(readmissions) == 1
    assert readmissions[0].measures["limiter"] == service
    assert readmissions[0].measures["late_s"] >= 0.3
    assert readmissions[0].measures["wait_s"] > 0.1


def test_confirm_only_takes_again_the_limits_it_is_asked_about(
    store_url: str, service: str
) -> None:
    resource = _resource(store_url, service)
    rpm = (f"{service}:rpm", RateLimitConfig(limit=5, period=5.0), 1.0)
    tpm = (f"{service}:tpm", RateLimitConfig(limit=500, period=5.0), 100.0)

    def late_send() -> int:
        admission = current_admission()
        assert admission is not None
        time.sleep(0.1)
        admission.confirm(0.01, [f"{service}:rpm"])
        return admission.readmitted

    assert resource.call(service, late_send, limits=[tpm, rpm]) == 1
    assert resource.limiter(rpm[0], config=rpm[1]).usage() == 2  # type: ignore[union-attr]
    assert resource.limiter(tpm[0], config=tpm[1]).usage() == 100  # type: ignore[union-attr]


def test_a_late_attempt_that_cannot_wait_long_enough_is_refused(
    store_url: str, service: str
) -> None:
    resource = _resource(
        store_url, service, rate_limit=RateLimitConfig(limit=1, period=30.0, max_wait=0.5)
    )

    def late_send() -> None:
        time.sleep(0.05)
        current_admission().confirm(0.01)  # type: ignore[union-attr]

    with pytest.raises(MaxAttemptsExceeded) as refused:
        resource.call(service, late_send)
    assert isinstance(refused.value.last_error, RateLimitExceeded)
    assert refused.value.last_error.retry_after > 29


def test_a_wait_for_a_bulkhead_slot_comes_before_the_rate_admission(
    store_url: str, service: str
) -> None:
    # One slot. The second call waits 0.3 s for it; its rate admission is taken after that
    # wait, not before: it is on time when it sends.
    resource = _resource(
        store_url,
        service,
        max_concurrent=1,
        rate_limit=RateLimitConfig(limit=10, period=5.0),
    )
    holding = threading.Event()

    def hold() -> None:
        holding.set()
        time.sleep(0.3)

    first = threading.Thread(target=lambda: resource.call(service, hold))
    first.start()
    assert holding.wait(5)
    lateness = resource.call(service, lambda: current_admission().confirm(0.1))  # type: ignore[union-attr]
    first.join()
    assert lateness < 0.1
