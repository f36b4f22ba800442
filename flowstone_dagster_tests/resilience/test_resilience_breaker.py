"""Circuit breakers: the basic behaviour on every store, the rules, and a model-based test."""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CircuitOpen,
    ConfigurationError,
    HTTPError,
    NotFound,
    RateLimited,
    StoreUnavailable,
    Unauthorized,
)
from flowstone_dagster.resilience import (
    CircuitBreaker,
    RateLimitExceeded,
    StateStore,
    classify,
    open_store,
    reset,
    state,
    with_circuit_breaker,
)
from flowstone_dagster_tests.support.postgres import PostgresCluster


@pytest.fixture
def name() -> str:
    return f"service-{uuid.uuid4().hex[:8]}"


def service_down() -> None:
    raise ConnectionError("service_down")


def success() -> str:
    return "success"


def fail(name: str, times: int, store_url: str, **options: Any) -> None:
    for _ in range(times):
        with pytest.raises(ConnectionError):
            with_circuit_breaker(name, service_down, store=store_url, **options)


# -- the basic behaviour, on every store ---------------------------------------------------------


def test_allows_calls_when_circuit_is_closed(store_url: str, name: str) -> None:
    assert with_circuit_breaker(name, success, store=store_url) == "success"


def test_opens_circuit_after_threshold_failures(store_url: str, name: str) -> None:
    fail(name, 5, store_url, threshold=5)
    calls: list[int] = []
    with pytest.raises(CircuitOpen) as caught:
        with_circuit_breaker(name, lambda: calls.append(1), threshold=5, store=store_url)
    assert calls == []  # refused without calling the service
    assert caught.value.name == name
    assert 0 < caught.value.retry_in <= 30


def test_closes_circuit_after_timeout(store_url: str, name: str) -> None:
    fail(name, 5, store_url, threshold=5)
    time.sleep(0.1)  # a real (short) timeout passes: the one real-clock breaker test
    assert with_circuit_breaker(name, success, threshold=5, timeout=0.05, store=store_url) == (
        "success"
    )
    assert state(name, store=store_url).state == "closed"


def test_resets_failure_count_on_success(store_url: str, name: str) -> None:
    fail(name, 3, store_url, threshold=5)
    assert state(name, store=store_url).failures == 3
    with_circuit_breaker(name, success, threshold=5, store=store_url)
    assert state(name, store=store_url).failures == 0
    fail(name, 4, store_url, threshold=5)
    assert with_circuit_breaker(name, success, threshold=5, store=store_url) == "success"


# -- the rules -----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_one_probe_at_a_time_and_a_failed_probe_reopens(store_url: str, name: str) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(name, threshold=2, timeout=10, store=store_url, clock=clock)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(service_down)
    clock.now += 10
    probe = breaker.enter()  # the probe is running ...
    assert breaker.status().state == "half_open"
    with pytest.raises(CircuitOpen) as caught:  # ... so everyone else is refused
        breaker.call(success)
    # The true wait: until the probe's lease ends (a dead prober holds it that long).
    assert caught.value.retry_in == pytest.approx(60)
    breaker.exit(probe, ConnectionError("still down"))
    status = breaker.status()
    assert (status.state, status.retry_in) == ("open", pytest.approx(10))
    clock.now += 10
    assert breaker.call(success) == "success"
    assert breaker.status().state == "closed"


def test_a_crashed_probers_lease_expires(store_url: str, name: str) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        name, threshold=1, timeout=5, probe_lease=30, store=store_url, clock=clock
    )
    with pytest.raises(ConnectionError):
        breaker.call(service_down)
    clock.now += 5
    breaker.enter()  # a probe that never reports back (its process died)
    clock.now += 29
    with pytest.raises(CircuitOpen):
        breaker.call(success)
    clock.now += 1
    assert breaker.call(success) == "success"  # a new probe after the lease
    assert breaker.status().state == "closed"


def test_an_ignored_error_gives_the_probe_back(store_url: str, name: str) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(name, threshold=1, timeout=5, store=store_url, clock=clock)
    with pytest.raises(ConnectionError):
        breaker.call(service_down)
    clock.now += 5

    def misconfigured() -> None:
        raise ConfigurationError("bad", field="url")

    with pytest.raises(ConfigurationError):
        breaker.call(misconfigured)
    assert breaker.status().state == "open"
    assert breaker.call(success) == "success"  # the next caller probes at once


def test_classification() -> None:
    assert classify(ConnectionError()) == "failure"
    assert classify(Exception("service_down")) == "failure"
    assert classify(HTTPError("503", status=503)) == "failure"
    # A 429 means the service is up and asks to slow down: the limiter and Retry-After handle
    # it; it neither opens nor closes the circuit.
    assert classify(RateLimited("429", status=429)) == "ignore"
    assert classify(StoreUnavailable("sqlite:///x", "reserve", "database is locked")) == "ignore"
    assert classify(NotFound("404", status=404)) == "success"
    assert classify(Unauthorized("401", status=401)) == "success"
    assert classify(HTTPError("422", status=422)) == "success"
    assert classify(ConfigurationError("bad")) == "ignore"
    assert classify(CircuitOpen("other", 3)) == "ignore"
    assert classify(RateLimitExceeded("local", 1.0, limit=1, period=1)) == "ignore"
    assert classify(KeyboardInterrupt()) == "ignore"


def test_client_errors_mean_the_service_answered(store_url: str, name: str) -> None:
    breaker = CircuitBreaker(name, threshold=2, store=store_url)
    with pytest.raises(ConnectionError):
        breaker.call(service_down)

    def missing() -> None:
        raise NotFound("HTTP 404 from GET /orders/7", status=404)

    for _ in range(3):
        with pytest.raises(NotFound):
            breaker.call(missing)
    status = breaker.status()
    assert (status.state, status.failures) == ("closed", 0)


def test_errors_propagate_unchanged(store_url: str, name: str) -> None:
    error = ConnectionError("down")

    def boom() -> None:
        raise error

    with pytest.raises(ConnectionError) as caught:
        CircuitBreaker(name, store=store_url).call(boom)
    assert caught.value is error


def test_state_and_reset(store_url: str, name: str) -> None:
    assert state(name, store=store_url).state == "closed"
    fail(name, 2, store_url, threshold=2)
    assert state(name, store=store_url).state == "open"
    reset(name, store=store_url)
    status = state(name, store=store_url)
    assert (status.state, status.failures, status.retry_in) == ("closed", 0, 0.0)


def test_decorator(store_url: str, name: str) -> None:
    breaker = CircuitBreaker(name, threshold=1, store=store_url)

    @breaker
    def double(x: int) -> int:
        return 2 * x

    assert double(21) == 42
    assert double.__name__ == "double"


def test_bad_settings_name_the_field() -> None:
    with pytest.raises(ConfigurationError, match="threshold"):
        CircuitBreaker("x", threshold=0, store="memory://")
    with pytest.raises(ConfigurationError, match="timeout"):
        CircuitBreaker("x", timeout=-1, store="memory://")


def test_transition_telemetry(name: str, events: list[telemetry.TelemetryEvent]) -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(name, threshold=2, timeout=5, store="memory://t", clock=clock)
    for _ in range(2):
        with pytest.raises(ConnectionError):
            breaker.call(service_down)
    with pytest.raises(CircuitOpen):
        breaker.call(success)
    clock.now += 5
    breaker.call(success)
    transitions = [
        (e.measures["from"], e.measures["to"])
        for e in events
        if e.name == "flowstone.circuit.transition" and e.measures["breaker"] == name
    ]
    assert transitions == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    (rejected,) = [e for e in events if e.name == "flowstone.circuit.rejected"]
    assert rejected.error_type == "CircuitOpen"
    assert rejected.measures["retry_in_s"] == 5


# -- the model -----------------------------------------------------------------------------------


class BreakerModel:
    """The breaker's rules, written out independently of the implementation."""

    def __init__(self) -> None:
        self.state = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self.probe: int | None = None
        self.probe_until = 0.0

    def enter(self, now: float, timeout: float, lease: float, token: int) -> tuple[bool, Any]:
        if self.state == "closed":
            return True, ("clean" if self.failures == 0 else "dirty", None)
        if self.state == "open" and now >= self.opened_at + timeout:
            self.state, self.probe, self.probe_until = "half_open", token, now + lease
            return True, ("probe", token)
        if self.state == "half_open" and now >= self.probe_until:
            self.probe, self.probe_until = token, now + lease
            return True, ("probe", token)
        return False, None

    def exit(self, ticket: Any, outcome: str, now: float, threshold: int) -> None:
        kind, token = ticket
        mine = kind == "probe" and self.state == "half_open" and self.probe == token
        if outcome == "success":
            if mine:
                self.state, self.failures, self.probe = "closed", 0, None
            elif self.state == "closed":
                self.failures = 0  # a success resets the count, whenever it was admitted
        elif outcome == "failure":
            if self.state == "closed":
                self.failures += 1
                if self.failures >= threshold:
                    self.state, self.opened_at = "open", now
            elif mine:
                self.failures += 1
                self.state, self.opened_at, self.probe = "open", now, None
        elif mine:
            self.state, self.probe = "open", None


OUTCOMES = {
    "success": None,
    "failure": ConnectionError("down"),
    "ignore": ConfigurationError("bad"),
}


def run_breaker_model(store: StateStore, examples: int) -> None:
    class BreakerMachine(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            self.clock = FakeClock()
            self.model = BreakerModel()
            self.pending: list[tuple[Any, Any]] = []
            self.tokens = 0
            self.breaker: CircuitBreaker | None = None

        @initialize(
            threshold=st.integers(1, 3),
            timeout=st.sampled_from([0.0, 1.0, 5.0, 10.0]),
            lease=st.sampled_from([1.0, 3.0, 20.0]),
        )
        def setup(self, threshold: int, timeout: float, lease: float) -> None:
            self.breaker = CircuitBreaker(
                f"model-{uuid.uuid4().hex}",
                threshold=threshold,
                timeout=timeout,
                probe_lease=lease,
                store=store,
                clock=self.clock,
            )

        def _breaker(self) -> CircuitBreaker:
            assert self.breaker is not None
            return self.breaker

        @rule(seconds=st.sampled_from([0.0, 0.5, 1.0, 2.0, 5.0, 10.0]))
        def advance(self, seconds: float) -> None:
            self.clock.now += seconds

        @rule()
        def start(self) -> None:
            breaker = self._breaker()
            self.tokens += 1
            admitted, model_ticket = self.model.enter(
                self.clock.now, breaker.timeout, breaker.probe_lease, self.tokens
            )
            try:
                ticket = breaker.enter()
            except CircuitOpen:
                assert not admitted
                return
            assert admitted
            self.pending.append((ticket, model_ticket))

        @rule(outcome=st.sampled_from(["success", "failure", "failure", "ignore"]))
        def call(self, outcome: str) -> None:
            """A whole call: admitted (or refused), then ended with ``outcome``."""
            self.start()
            if self.pending:
                self.finish(len(self.pending) - 1, outcome)

        @precondition(lambda self: self.pending)
        @rule(
            index=st.integers(0, 10),
            outcome=st.sampled_from(["success", "failure", "failure", "failure", "ignore"]),
        )
        def finish(self, index: int, outcome: str) -> None:
            breaker = self._breaker()
            ticket, model_ticket = self.pending.pop(index % len(self.pending))
            self.model.exit(model_ticket, outcome, self.clock.now, breaker.threshold)
            breaker.exit(ticket, OUTCOMES[outcome])

        @rule(roll=st.integers(0, 4))
        def reset(self, roll: int) -> None:
            if roll:  # rarely: a reset undoes the states the other rules work to reach
                return
            self._breaker().reset()
            self.model = BreakerModel()
            self.pending.clear()

        @invariant()
        def agrees_with_the_model(self) -> None:
            if self.breaker is None:
                return
            status = self.breaker.status()
            assert (status.state, status.failures) == (self.model.state, self.model.failures)

    run_state_machine_as_test(
        BreakerMachine,
        settings=settings(max_examples=examples, stateful_step_count=40, deadline=None),
    )


def test_breaker_matches_the_model_in_memory() -> None:
    run_breaker_model(open_store(f"memory://{uuid.uuid4().hex}"), examples=200)


def test_breaker_matches_the_model_on_sqlite(tmp_path: Path) -> None:
    run_breaker_model(open_store(f"sqlite://{tmp_path / 'model.sqlite3'}"), examples=60)


@pytest.mark.postgres
def test_breaker_matches_the_model_on_postgresql(pg_database: PostgresCluster) -> None:
    run_breaker_model(open_store(pg_database.url), examples=40)


@pytest.mark.redis
def test_breaker_matches_the_model_on_redis(redis_url: str) -> None:
    run_breaker_model(open_store(redis_url), examples=60)
