"""with_retry and its backoff schedule: the behaviour, and the schedule's properties."""

from __future__ import annotations

import random
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    MaxAttemptsExceeded,
    NotFound,
    RateLimited,
)
from flowstone_dagster.resilience import backoff_delays, with_retry


class FakeTime:
    """An injected clock and sleep: waits are recorded, not slept."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def kwargs(self) -> dict[str, object]:
        return {"clock": self.clock, "sleep": self.sleep}


class Counter:
    """A callable that fails with the given errors in turn, then returns ``"success"``."""

    def __init__(self, *errors: BaseException, time_source: FakeTime | None = None) -> None:
        self.errors = list(errors)
        self.calls = 0
        self.times: list[float] = []
        self.time_source = time_source

    def __call__(self) -> str:
        self.calls += 1
        self.times.append(self.time_source.now if self.time_source else time.monotonic())
        if self.errors:
            raise self.errors.pop(0)
        return "success"


# -- the behaviour --------------------------------------------------------------------------------


def test_succeeds_on_first_attempt() -> None:
    fn = Counter()
    assert with_retry(fn) == "success"
    assert fn.calls == 1


def test_retries_on_rate_limit() -> None:
    fn = Counter(RateLimited("slow down"), RateLimited("slow down"))
    assert with_retry(fn, max_attempts=5, base_delay=0.01) == "success"
    assert fn.calls == 3


def test_retries_on_timeout() -> None:
    fn = Counter(CallTimeout("no answer in 5 s", timeout=5))
    assert with_retry(fn, max_attempts=3, base_delay=0.01) == "success"
    assert fn.calls == 2


def test_fails_after_max_attempts() -> None:
    errors = [RateLimited(f"slow down {i}") for i in range(3)]
    fn = Counter(*errors)
    with pytest.raises(MaxAttemptsExceeded) as caught:
        with_retry(fn, max_attempts=3, base_delay=0.01)
    assert fn.calls == 3
    assert caught.value.attempts == 3
    assert caught.value.last_error is errors[-1]
    assert caught.value.__cause__ is errors[-1]


def test_uses_exponential_backoff() -> None:
    fake = FakeTime()
    fn = Counter(*(RateLimited("slow down") for _ in range(3)), time_source=fake)
    with pytest.raises(MaxAttemptsExceeded):
        with_retry(fn, max_attempts=3, base_delay=0.1, **fake.kwargs())  # type: ignore[arg-type]
    # Waits at least 100 ms, then 200 ms (the jitter only adds, up to 100%).
    assert len(fake.slept) == 2
    assert 0.1 <= fake.slept[0] <= 0.2
    assert 0.2 <= fake.slept[1] <= 0.4


def test_the_real_clock_waits_the_schedule() -> None:
    # The one real-time test of the schedule: wide margins, no upper bound that a loaded
    # machine could break.
    fn = Counter(*(RateLimited("slow down") for _ in range(3)))
    started = time.monotonic()
    with pytest.raises(MaxAttemptsExceeded):
        with_retry(fn, max_attempts=3, base_delay=0.1)
    elapsed = time.monotonic() - started
    # Should wait: 100 ms + 200 ms = 300 ms minimum (the jitter only adds).
    assert elapsed >= 0.3
    gaps = [later - earlier for earlier, later in zip(fn.times, fn.times[1:], strict=False)]
    assert gaps[0] >= 0.1
    assert gaps[1] >= 0.2


# -- what is retried -----------------------------------------------------------------------------


def test_a_non_retryable_error_propagates_at_once_unchanged() -> None:
    error = NotFound("HTTP 404 from GET /orders/7", status=404)
    fake = FakeTime()
    fn = Counter(error)
    with pytest.raises(NotFound) as caught:
        with_retry(fn, max_attempts=5, base_delay=1.0, **fake.kwargs())  # type: ignore[arg-type]
    assert caught.value is error
    assert fn.calls == 1
    assert fake.slept == []


def test_programming_errors_are_not_retried() -> None:
    error = KeyError("id")
    fn = Counter(error)
    with pytest.raises(KeyError) as caught:
        with_retry(fn, max_attempts=5, base_delay=1.0)
    assert caught.value is error
    assert fn.calls == 1


def test_retry_on_exception_types() -> None:
    fn = Counter(KeyError("a"), KeyError("b"))
    assert with_retry(fn, retry_on=KeyError, base_delay=0.001) == "success"
    assert fn.calls == 3
    fn = Counter(RateLimited("normally retried"))
    with pytest.raises(RateLimited):
        with_retry(fn, retry_on=(KeyError, ValueError), base_delay=0.001)


def test_retry_on_a_predicate() -> None:
    fn = Counter(ValueError("transient"), ValueError("permanent"))
    with pytest.raises(ValueError, match="permanent"):
        with_retry(fn, retry_on=lambda exc: "transient" in str(exc), base_delay=0.001)
    assert fn.calls == 2


def test_retry_after_is_honoured() -> None:
    fake = FakeTime()
    fn = Counter(RateLimited("429", retry_after=0.3), time_source=fake)
    assert with_retry(fn, base_delay=0.01, jitter=0, **fake.kwargs()) == "success"  # type: ignore[arg-type]
    assert fake.slept == [0.3]
    assert fn.times[1] - fn.times[0] == pytest.approx(0.3)


def test_a_retry_after_beyond_max_delay_stops_retrying() -> None:
    error = RateLimited("429", retry_after=120)
    fake = FakeTime()
    fn = Counter(error)
    with pytest.raises(MaxAttemptsExceeded) as caught:
        with_retry(fn, max_attempts=5, base_delay=0.01, max_delay=2, **fake.kwargs())  # type: ignore[arg-type]
    assert fake.slept == []
    assert caught.value.attempts == 1
    assert caught.value.last_error is error


def test_a_deadline_stops_retrying_when_the_next_wait_would_pass_it() -> None:
    fake = FakeTime()
    fn = Counter(*(CallTimeout("slow") for _ in range(10)), time_source=fake)
    with pytest.raises(MaxAttemptsExceeded) as caught:
        with_retry(fn, max_attempts=10, base_delay=0.1, jitter=0, deadline=0.5, **fake.kwargs())  # type: ignore[arg-type]
    # waits 0.1 + 0.2 = 0.3 s; the next (0.4 s) would end after 0.5 s: 3 attempts.
    assert caught.value.attempts == 3
    assert fn.calls == 3
    assert fake.slept == pytest.approx([0.1, 0.2])
    assert isinstance(caught.value.__cause__, CallTimeout)


def test_a_deadline_never_cuts_a_running_attempt_short() -> None:
    fake = FakeTime()

    def slow_then_ok() -> str:
        fake.now += 5.0  # an attempt longer than the whole deadline
        if len(fake.slept) == 0 and fake.now < 1006:
            raise CallTimeout("first attempt timed out")
        return "done"

    # The first attempt ran past the deadline: no new attempt may start.
    with pytest.raises(MaxAttemptsExceeded) as caught:
        with_retry(slow_then_ok, deadline=1.0, base_delay=0.1, jitter=0, **fake.kwargs())  # type: ignore[arg-type]
    assert caught.value.attempts == 1
    # A single long attempt that succeeds is never interrupted.
    fake.now = 0.0
    assert with_retry(lambda: (fake.sleep(30), "long")[1], deadline=1.0, **fake.kwargs()) == "long"  # type: ignore[arg-type]


def test_keyboard_interrupt_is_never_caught() -> None:
    fn = Counter(KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        with_retry(fn)
    assert fn.calls == 1


def test_bad_settings_are_configuration_errors() -> None:
    with pytest.raises(ConfigurationError, match="max_attempts"):
        with_retry(Counter(), max_attempts=0)
    with pytest.raises(ConfigurationError, match="max_delay"):
        with_retry(Counter(), base_delay=2, max_delay=1)
    with pytest.raises(ConfigurationError, match="deadline"):
        with_retry(Counter(), deadline=0)
    with pytest.raises(ConfigurationError, match="retry_on"):
        with_retry(Counter(), retry_on=42)  # type: ignore[arg-type]


def test_retry_telemetry(events: list[telemetry.TelemetryEvent]) -> None:
    fn = Counter(RateLimited("a"), CallTimeout("b"), CallTimeout("c"))
    with pytest.raises(MaxAttemptsExceeded):
        with_retry(fn, max_attempts=3, base_delay=0.01, jitter=0, name="orders-api")
    retries = [event for event in events if event.name == "flowstone.retry"]
    assert [(e.attempts, e.error_type, e.measures["call"]) for e in retries] == [
        (1, "RateLimited", "orders-api"),
        (2, "CallTimeout", "orders-api"),
    ]
    assert [e.measures["wait_s"] for e in retries] == [0.01, 0.02]
    (exhausted,) = [event for event in events if event.name == "flowstone.retry.exhausted"]
    assert exhausted.attempts == 3
    assert exhausted.error_type == "CallTimeout"
    assert exhausted.measures["reason"] == "max_attempts"


# -- the schedule --------------------------------------------------------------------------------


def test_backoff_delays_example() -> None:
    assert backoff_delays(5, base_delay=0.1, max_delay=0.5) == [0.1, 0.2, 0.4, 0.5]
    assert backoff_delays(1) == []


schedules = st.tuples(
    st.integers(min_value=1, max_value=30),
    st.floats(min_value=0.0, max_value=10.0, allow_nan=False),
    st.floats(min_value=0.0, max_value=100.0, allow_nan=False),
).filter(lambda t: t[2] >= t[1])


@given(schedules)
@settings(max_examples=300)
def test_schedule_without_jitter_is_exponential_non_decreasing_and_capped(
    schedule: tuple[int, float, float],
) -> None:
    attempts, base, cap = schedule
    delays = backoff_delays(attempts, base_delay=base, max_delay=cap, jitter=0)
    assert len(delays) == attempts - 1
    assert delays == sorted(delays)
    for n, delay in enumerate(delays):
        assert delay <= cap
        assert delay == pytest.approx(min(base * 2**n, cap))


@given(schedules, st.floats(min_value=0.0, max_value=3.0), st.integers())
@settings(max_examples=300)
def test_jitter_only_adds_and_stays_under_the_cap(
    schedule: tuple[int, float, float], jitter: float, seed: int
) -> None:
    attempts, base, cap = schedule
    delays = backoff_delays(
        attempts, base_delay=base, max_delay=cap, jitter=jitter, rng=random.Random(seed)
    )
    for n, delay in enumerate(delays):
        exponential = min(base * 2**n, cap)
        assert exponential * (1 - 1e-12) <= delay <= cap * (1 + 1e-12)
        assert delay <= exponential * (1 + jitter) * (1 + 1e-12)
