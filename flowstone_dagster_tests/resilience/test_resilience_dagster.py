"""ResilienceResource, its composition order, and the mapping onto Dagster's step retries."""

from __future__ import annotations

import threading
import time
import uuid
from pathlib import Path

import dagster as dg
import pydantic
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    CircuitOpen,
    ConfigurationError,
    MaxAttemptsExceeded,
    NotFound,
    RateLimited,
    TransportError,
)
from flowstone_dagster.resilience import (
    RECOMMENDED_RETRY_POLICY,
    CircuitBreakerConfig,
    RateLimitConfig,
    RateLimitExceeded,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    current_deadline,
    dagster_retries,
    state,
    to_dagster_error,
)
from flowstone_dagster_tests import resilience_jobs

FAST_RETRY = RetryConfig(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0)


@pytest.fixture
def store_url() -> str:
    return f"memory://{uuid.uuid4().hex}"


class Service:
    """A fake external service: fails with the given errors in turn, then answers."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self, value: str = "ok") -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return value


# -- to_dagster_error ----------------------------------------------------------------------------


def test_an_open_circuit_becomes_a_step_retry_after_the_breaker_timeout() -> None:
    mapped = to_dagster_error(CircuitOpen("orders-api", 12.3), max_retries=2)
    assert isinstance(mapped, dg.RetryRequested)
    assert (mapped.seconds_to_wait, mapped.max_retries) == (13, 2)
    assert isinstance(to_dagster_error(CircuitOpen("x", 0.0)), dg.RetryRequested)


def test_a_far_rate_limit_becomes_a_step_retry_a_near_one_a_retryable_failure() -> None:
    far = RateLimited("429", retry_after=120)
    mapped = to_dagster_error(MaxAttemptsExceeded(1, far), retry_requested_after=5)
    assert isinstance(mapped, dg.RetryRequested)
    assert mapped.seconds_to_wait == 120
    near = to_dagster_error(MaxAttemptsExceeded(3, RateLimited("429", retry_after=1)))
    assert isinstance(near, dg.Failure)
    assert near.allow_retries


def test_non_retryable_errors_fail_the_step_for_good() -> None:
    mapped = to_dagster_error(
        NotFound("HTTP 404 from GET /orders/7", status=404, service="orders-api")
    )
    assert isinstance(mapped, dg.Failure)
    assert not mapped.allow_retries
    assert mapped.description == "[orders-api] HTTP 404 from GET /orders/7"
    metadata = {key: value.value for key, value in mapped.metadata.items()}
    assert metadata == {
        "flowstone/error_type": "NotFound",
        "flowstone/retryable": False,
        "flowstone/service": "orders-api",
        "flowstone/status": 404,
    }
    assert not to_dagster_error(KeyError("id")).allow_retries  # type: ignore[union-attr]


def test_exhausted_transient_errors_leave_it_to_the_retry_policy() -> None:
    mapped = to_dagster_error(MaxAttemptsExceeded(3, CallTimeout("slow")))
    assert isinstance(mapped, dg.Failure)
    assert mapped.allow_retries
    assert mapped.metadata["flowstone/attempts"].value == 3


def test_dagster_control_flow_passes_through() -> None:
    retry = dg.RetryRequested()
    assert to_dagster_error(retry) is retry
    interrupt = KeyboardInterrupt()
    assert to_dagster_error(interrupt) is interrupt


def test_dagster_retries_context_manager() -> None:
    error = CircuitOpen("orders-api", 3)
    with pytest.raises(dg.RetryRequested) as caught, dagster_retries():
        raise error
    assert caught.value.__cause__ is error


def test_recommended_retry_policy() -> None:
    assert RECOMMENDED_RETRY_POLICY.max_retries == 2
    assert RECOMMENDED_RETRY_POLICY.delay == 30
    assert RECOMMENDED_RETRY_POLICY.backoff == dg.Backoff.EXPONENTIAL
    assert RECOMMENDED_RETRY_POLICY.jitter == dg.Jitter.PLUS_MINUS


# -- the resource --------------------------------------------------------------------------------


def test_call_retries_transient_failures(store_url: str, events: list) -> None:
    resource = ResilienceResource(
        store_url=store_url, policies={"api": ServicePolicy(retry=FAST_RETRY)}
    )
    service = Service(TransportError("reset"), CallTimeout("slow"))
    assert resource.call("api", service, "rows") == "rows"
    assert service.calls == 3
    (event,) = [e for e in events if e.name == "flowstone.resilience.call"]
    assert (event.outcome, event.attempts, event.measures["service"]) == ("ok", 3, "api")


def test_each_attempt_passes_the_breaker(store_url: str) -> None:
    policy = ServicePolicy(
        retry=RetryConfig(max_attempts=5, base_delay=0.01, jitter=0),
        circuit_breaker=CircuitBreakerConfig(threshold=2, timeout=60),
    )
    resource = ResilienceResource(store_url=store_url, policies={"api": policy})
    service = Service(*(TransportError("refused") for _ in range(5)))
    with pytest.raises(CircuitOpen):
        resource.call("api", service, dagster_errors=False)
    assert service.calls == 2  # the third attempt met the open circuit, which is not retried
    assert state("api", store=store_url).state == "open"
    with pytest.raises(dg.RetryRequested) as caught:
        resource.call("api", service)
    assert 59 <= caught.value.seconds_to_wait <= 60
    assert caught.value.max_retries == 2
    assert service.calls == 2


def test_non_retryable_errors_are_a_final_failure(store_url: str) -> None:
    resource = ResilienceResource(store_url=store_url)
    service = Service(NotFound("HTTP 404", status=404))
    with pytest.raises(dg.Failure) as caught:
        resource.call("api", service)
    assert not caught.value.allow_retries
    assert isinstance(caught.value.__cause__, NotFound)
    assert service.calls == 1
    service = Service(NotFound("HTTP 404", status=404))
    with pytest.raises(NotFound):
        resource.call("api", service, dagster_errors=False)


def test_the_rate_limit_applies_per_call_with_cost(store_url: str) -> None:
    policy = ServicePolicy(
        retry=RetryConfig(max_attempts=1),
        rate_limit=RateLimitConfig(limit=3, period=60, mode="reject"),
    )
    resource = ResilienceResource(store_url=store_url, policies={"llm": policy})
    assert resource.call("llm", Service(), cost=2) == "ok"
    assert resource.call("llm", Service()) == "ok"
    with pytest.raises(MaxAttemptsExceeded) as caught:
        resource.call("llm", Service(), dagster_errors=False)
    assert isinstance(caught.value.last_error, RateLimitExceeded)
    with pytest.raises(dg.RetryRequested) as retry:
        resource.call("llm", Service())
    assert retry.value.seconds_to_wait >= 59
    # A local refusal is not the service failing.
    assert state("llm", store=store_url).failures == 0


def test_timeouts(store_url: str) -> None:
    release = threading.Event()
    policy = ServicePolicy(
        retry=RetryConfig(max_attempts=2, base_delay=0.01, jitter=0),
        timeout=0.1,
        enforce_timeout=True,
    )
    resource = ResilienceResource(store_url=store_url, policies={"legacy": policy})
    started = time.monotonic()
    with pytest.raises(MaxAttemptsExceeded) as caught:
        resource.call("legacy", release.wait, 10, dagster_errors=False)
    assert isinstance(caught.value.last_error, CallTimeout)
    assert time.monotonic() - started < 2
    release.set()
    # Without enforcement the deadline is published to the function, which applies it.
    cooperative = ResilienceResource(
        store_url=store_url, policies={"api": ServicePolicy(timeout=7.0)}
    )
    remaining = cooperative.call("api", lambda: current_deadline().remaining())  # type: ignore[union-attr]
    assert 6 < remaining <= 7


def test_unknown_services(store_url: str) -> None:
    assert ResilienceResource(store_url=store_url).call("anything", Service()) == "ok"
    strict = ResilienceResource(
        store_url=store_url, policies={"api": ServicePolicy()}, default_policy=None
    )
    with pytest.raises(ConfigurationError, match="no policy for service 'other'"):
        strict.call("other", Service())


def test_bad_policies_fail_at_resource_setup(store_url: str) -> None:
    @dg.asset
    def uses(resilience: ResilienceResource) -> None:
        pass

    # Constraints are declared on the config classes: a bad value fails where it is written,
    # naming the field, in Python ...
    with pytest.raises(pydantic.ValidationError, match="max_attempts"):
        ServicePolicy(retry=RetryConfig(max_attempts=0))
    with pytest.raises(pydantic.ValidationError, match="must be at least base_delay"):
        RetryConfig(base_delay=2, max_delay=1)
    with pytest.raises(pydantic.ValidationError, match="needs `limit`"):
        RateLimitConfig()
    # ... and in run config, before the step runs.
    with pytest.raises(dg.DagsterResourceFunctionError) as caught:
        dg.materialize(
            [uses],
            resources={"resilience": ResilienceResource.configure_at_launch()},
            run_config={
                "resources": {
                    "resilience": {
                        "config": {
                            "store_url": store_url,
                            "policies": {"api": {"retry": {"max_attempts": 0}}},
                        }
                    }
                }
            },
        )
    assert isinstance(caught.value.__cause__, pydantic.ValidationError)
    assert "max_attempts" in str(caught.value.__cause__)


def test_every_config_field_is_described() -> None:
    for config in (
        ResilienceResource,
        ServicePolicy,
        RetryConfig,
        CircuitBreakerConfig,
        RateLimitConfig,
    ):
        for field_name, field in config.model_fields.items():
            assert field.description, f"{config.__name__}.{field_name}"


@pytest.mark.dagster
def test_in_a_materialization_with_run_config(store_url: str) -> None:
    service = Service(TransportError("refused"))

    @dg.asset
    def orders(resilience: ResilienceResource) -> str:
        return resilience.call("orders-api", service, "rows")

    result = dg.materialize(
        [orders],
        resources={"resilience": ResilienceResource.configure_at_launch()},
        run_config={
            "resources": {
                "resilience": {
                    "config": {
                        "store_url": store_url,
                        "policies": {
                            "orders-api": {
                                "retry": {"max_attempts": 2, "base_delay": 0.01},
                                "rate_limit": {"limit": 5, "period": 1.0},
                            }
                        },
                    }
                }
            }
        },
    )
    assert result.success
    assert result.output_for_node("orders") == "rows"
    assert service.calls == 2


@pytest.mark.dagster
@pytest.mark.multiprocess
def test_the_breaker_opens_across_step_processes(
    dagster_home_instance: dg.DagsterInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two steps, one after the other, each in its own process, call a service that is down.

    The first step's three attempts open the breaker (threshold 3, timeout 4 s) in the shared
    SQLite store. The second step finds it open without calling the service and is retried
    later by Dagster (``RetryRequested``); each of its attempts makes at most one probe call,
    whose failure re-opens the breaker, until its retries are exhausted. The service sees
    3 + at most 1 per later step attempt, not 3 per attempt.
    """
    calls = tmp_path / "calls.txt"
    calls.touch()
    monkeypatch.setenv(resilience_jobs.CALLS_FILE_ENV, str(calls))
    monkeypatch.setenv("FLOWSTONE_RESILIENCE_STORE", f"sqlite://{tmp_path / 'state.sqlite3'}")
    result = dg.execute_job(
        dg.reconstructable(resilience_jobs.get_resilience_job), instance=dagster_home_instance
    )
    assert not result.success
    events = result.all_events
    retried = {e.step_key for e in events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY}
    failed = {e.step_key for e in events if e.event_type == dg.DagsterEventType.STEP_FAILURE}
    assert failed == {"orders", "customers"}
    assert len(retried) == 1  # the step that found the circuit open
    (second,) = retried
    retry_event = next(e for e in events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert "CircuitOpen" in str(retry_event.event_specific_data.error)
    final = next(
        e
        for e in events
        if e.event_type == dg.DagsterEventType.STEP_FAILURE and e.step_key == second
    )
    assert "Exceeded max_retries of 1" in final.event_specific_data.error.message
    pids = calls.read_text().split()
    per_process = sorted((pids.count(pid) for pid in set(pids)), reverse=True)
    assert per_process[0] == 3  # the first step: all its attempts, until the breaker opened
    assert all(count == 1 for count in per_process[1:])  # later attempts: one probe at most
    assert len(pids) <= 3 + 2
    status = state(resilience_jobs.FAILING_SERVICE, store=f"sqlite://{tmp_path / 'state.sqlite3'}")
    assert status.state == "open"


def test_a_rate_limit_wait_past_retry_requested_after_is_not_slept(store_url: str) -> None:
    policy = ServicePolicy(
        retry=RetryConfig(max_attempts=3, base_delay=0.01, max_delay=30),
        rate_limit=RateLimitConfig(limit=1, period=3, mode="reject"),
    )
    resource = ResilienceResource(
        store_url=store_url, policies={"geo": policy}, retry_requested_after=1.0
    )
    assert resource.call("geo", Service()) == "ok"
    started = time.monotonic()
    with pytest.raises(dg.RetryRequested) as retry:
        resource.call("geo", Service())
    assert time.monotonic() - started < 1.0  # the ~3 s wait became a step retry
    assert retry.value.seconds_to_wait >= 2


def test_a_wait_mode_limiter_never_waits_past_retry_requested_after(store_url: str) -> None:
    policy = ServicePolicy(
        retry=RetryConfig(max_attempts=1),
        rate_limit=RateLimitConfig(limit=1, period=3, mode="wait", max_wait=30),
    )
    resource = ResilienceResource(
        store_url=store_url, policies={"geo": policy}, retry_requested_after=1.0
    )
    resource.call("geo", Service())
    started = time.monotonic()
    with pytest.raises(dg.RetryRequested):
        resource.call("geo", Service())
    assert time.monotonic() - started < 1.0


class FailingExitStore:
    """Wraps a store so that recording a call's outcome fails (a locked or lost database)."""

    def __init__(self, inner: object) -> None:
        self.inner = inner
        self.fail_updates = False

    def update_breaker(self, *args: object, **kwargs: object) -> object:
        if self.fail_updates:
            raise OSError("database is locked")
        return self.inner.update_breaker(*args, **kwargs)  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


def test_a_store_failure_neither_hides_the_error_nor_loses_the_result(
    store_url: str, events: list[telemetry.TelemetryEvent]
) -> None:
    from flowstone_dagster.resilience import CircuitBreaker, open_store

    store = FailingExitStore(open_store(store_url))
    breaker = CircuitBreaker("flaky-store", threshold=5, store=store)  # type: ignore[arg-type]
    resource = ResilienceResource(
        store_url=store_url,
        policies={"svc": ServicePolicy(retry=RetryConfig(max_attempts=1))},
    )
    # The StateStore protocol is the seam: the resource's breaker gets a store whose writes
    # fail, as a locked SQLite file or a failed-over PostgreSQL would.
    object.__setattr__(resource, "breaker", lambda service, store=None: breaker)
    with pytest.raises(dg.Failure):  # one failure recorded: a success now needs a write
        resource.call("svc", Service(TransportError("refused")))
    assert breaker.status().failures == 1

    store.fail_updates = True
    with pytest.raises(dg.Failure) as failed:
        resource.call("svc", Service(NotFound("HTTP 404", status=404)))
    assert isinstance(failed.value.__cause__, NotFound)  # the call's own error, not the store's
    assert resource.call("svc", Service(), "done") == "done"  # the result is kept
    assert [e.error_type for e in events if e.name == "flowstone.circuit.store_error"] == [
        "OSError",
        "OSError",
    ]


def test_the_resource_maps_errors_with_its_own_settings(store_url: str) -> None:
    resource = ResilienceResource(
        store_url=store_url, retry_requested_after=2.0, step_max_retries=4
    )
    retry = resource.dagster_error(RateLimited("slow down", retry_after=3.0))
    assert isinstance(retry, dg.RetryRequested)
    assert retry.max_retries == 4
    with pytest.raises(dg.Failure), resource.dagster_retries(service="svc"):
        raise NotFound("HTTP 404", status=404)
    off = ResilienceResource(store_url=store_url, dagster_errors=False)
    with pytest.raises(NotFound), off.dagster_retries(service="svc"):
        raise NotFound("HTTP 404", status=404)
