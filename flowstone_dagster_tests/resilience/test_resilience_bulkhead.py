"""Bulkheads: slots as expiring leases in every store, and the policy's max_concurrent."""

from __future__ import annotations

import pickle
import threading
import uuid

import dagster as dg
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import MaxAttemptsExceeded, RateLimited, TransportError
from flowstone_dagster.resilience import (
    Bulkhead,
    BulkheadFull,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    classify,
    state,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_slots_are_leases_that_expire(store_url: str) -> None:
    clock = FakeClock()
    name = f"bh-{uuid.uuid4().hex[:6]}"
    bulkhead = Bulkhead(name, 2, lease_seconds=10.0, store=store_url, clock=clock)
    first, second = bulkhead.try_acquire(), bulkhead.try_acquire()
    assert first.granted
    assert second.granted
    assert first.lease_id != second.lease_id
    refused = bulkhead.try_acquire()
    assert not refused.granted
    assert refused.wait == pytest.approx(10.0, abs=0.01)  # when the oldest lease expires
    assert bulkhead.active() == 2
    assert first.lease_id is not None
    bulkhead.release(first.lease_id)
    bulkhead.release(first.lease_id)  # twice: nothing happens
    assert bulkhead.active() == 1
    assert bulkhead.try_acquire().granted
    clock.now += 10.0  # both leases expire (a holder that died frees its slot)
    assert bulkhead.active() == 0
    assert bulkhead.try_acquire().granted


def test_a_full_bulkhead_waits_then_raises(
    store_url: str, events: list[telemetry.TelemetryEvent]
) -> None:
    name = f"bh-{uuid.uuid4().hex[:6]}"
    bulkhead = Bulkhead(name, 1, lease_seconds=60.0, store=store_url)
    held = bulkhead.acquire()
    releaser = threading.Timer(0.2, bulkhead.release, args=(held,))
    releaser.start()
    assert bulkhead.acquire(max_wait=5.0)  # goes as soon as the slot is given back
    (waited,) = [e for e in events if e.name == "flowstone.bulkhead.wait"]
    assert waited.measures["bulkhead"] == name
    assert 0.15 < waited.measures["wait_s"] < 3.0
    with pytest.raises(BulkheadFull) as caught:
        bulkhead.acquire(max_wait=0.1)
    assert isinstance(caught.value, RateLimited)
    assert caught.value.retry_after == 1.0
    assert classify(caught.value) == "ignore"  # a breaker never counts it
    copy = pickle.loads(pickle.dumps(caught.value))  # noqa: S301 - our own bytes
    assert (copy.bulkhead, copy.max_concurrent) == (name, 1)


def policy(**fields: object) -> ServicePolicy:
    return ServicePolicy(
        retry=RetryConfig(max_attempts=2, base_delay=0.01, deadline=0.5, jitter=0),
        **fields,  # type: ignore[arg-type]
    )


def test_policy_max_concurrent_holds_a_slot_per_attempt(
    store_url: str, events: list[telemetry.TelemetryEvent]
) -> None:
    service = f"svc-{uuid.uuid4().hex[:6]}"
    resource = ResilienceResource(
        store_url=store_url, policies={service: policy(max_concurrent=1, lease_seconds=30)}
    )
    bulkhead = resource.bulkhead(service)
    assert bulkhead is not None
    seen: list[int] = []
    assert resource.call(service, lambda: seen.append(bulkhead.active()) or "ok") == "ok"
    assert seen == [1]  # held while the call ran ...
    assert bulkhead.active() == 0  # ... and given back after it

    def down() -> None:
        raise TransportError("connection refused", service=service)

    with pytest.raises(MaxAttemptsExceeded):
        resource.call(service, down, dagster_errors=False)
    assert bulkhead.active() == 0  # given back on errors too
    before = state(service, store=store_url)
    assert before.failures == 2

    held = bulkhead.acquire()  # another process holds the only slot
    calls: list[int] = []
    with pytest.raises(dg.Failure) as failure:
        resource.call(service, lambda: calls.append(1))
    assert calls == []
    assert "BulkheadFull" in str(failure.value.metadata["flowstone/error_type"].value)
    assert failure.value.allow_retries
    assert state(service, store=store_url) == before  # never a breaker failure
    assert [e for e in events if e.name == "flowstone.bulkhead.rejected"]
    bulkhead.release(held)


def test_lease_seconds_must_outlive_an_attempt() -> None:
    with pytest.raises(ValueError, match="lease_seconds"):
        ServicePolicy(max_concurrent=2, timeout=30, lease_seconds=10)
    with pytest.raises(ValueError, match="max_concurrent"):
        ServicePolicy(max_concurrent=0)
    assert ServicePolicy(max_concurrent=2, timeout=45).bulkhead_lease() == 90
    assert ServicePolicy(max_concurrent=2, timeout=5).bulkhead_lease() == 60
    assert ServicePolicy(max_concurrent=2).bulkhead_lease() == 300
