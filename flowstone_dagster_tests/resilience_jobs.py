"""Module-level code the resilience tests run in other processes.

Spawned processes and Dagster's multiprocess executor import this module by name, so the job
and the worker functions live here rather than in a test module.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time

import dagster as dg

from flowstone_dagster.errors import CircuitOpen, TransportError
from flowstone_dagster.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    RateLimiter,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
)

# --------------------------------------------------------------------------------------------
# a Dagster job whose steps call a service that is down

FAILING_SERVICE = "flaky-service"
CALLS_FILE_ENV = "FLOWSTONE_TEST_CALLS_FILE"


def failing_service(calls_file: str) -> str:
    """A service that is down: each call is recorded (pid), then refused."""
    with open(calls_file, "a", encoding="utf-8") as calls:
        calls.write(f"{os.getpid()}\n")
    raise TransportError("connection refused (the test service is down)", service=FAILING_SERVICE)


def _call_service(resilience: ResilienceResource) -> str:
    return resilience.call(FAILING_SERVICE, failing_service, os.environ[CALLS_FILE_ENV])


@dg.asset
def orders(resilience: ResilienceResource) -> str:
    return _call_service(resilience)


@dg.asset
def customers(resilience: ResilienceResource) -> str:
    return _call_service(resilience)


resilience_job = dg.define_asset_job(
    "resilience_job",
    selection=[orders, customers],
    # One step at a time, each in its own process: the breaker opened by the first step must
    # be seen by the next one through the shared store.
    executor_def=dg.multiprocess_executor.configured({"max_concurrent": 1}),
)

defs = dg.Definitions(
    assets=[orders, customers],
    jobs=[resilience_job],
    resources={
        # store_url is left to $FLOWSTONE_RESILIENCE_STORE, which the test sets.
        "resilience": ResilienceResource(
            policies={
                FAILING_SERVICE: ServicePolicy(
                    retry=RetryConfig(max_attempts=3, base_delay=0.01, max_delay=0.05, jitter=0),
                    circuit_breaker=CircuitBreakerConfig(threshold=3, timeout=4.0),
                )
            },
            step_max_retries=1,
        )
    },
)


def get_resilience_job() -> dg.JobDefinition:
    return defs.resolve_job_def("resilience_job")


# --------------------------------------------------------------------------------------------
# process entry points for the cross-process tests


def _wait_until(start_at: float) -> None:
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)  # a common start time, so that the processes really overlap


def record_failures(store_url: str, name: str, count: int, threads: int, start_at: float) -> int:
    """Record ``count`` failures of breaker ``name`` from ``threads`` threads; returns count."""
    breaker = CircuitBreaker(name, threshold=10**9, store=store_url)
    errors: list[BaseException] = []

    def work(n: int) -> None:
        try:
            for _ in range(n):
                ticket = breaker.enter()
                breaker.exit(ticket, ConnectionError("down"))
        except BaseException as exc:
            errors.append(exc)

    _wait_until(start_at)
    per_thread = [count // threads + (1 if i < count % threads else 0) for i in range(threads)]
    workers = [threading.Thread(target=work, args=(n,)) for n in per_thread]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return count


def hammer_limiter(
    store_url: str,
    *,
    name: str,
    limit: int,
    period: float,
    duration: float,
    start_at: float,
    seed: int,
) -> list[tuple[float, int, float, float]]:
    """Acquire random costs until ``duration`` passes; returns (store ts, cost, before, after)."""
    import random

    rng = random.Random(seed)
    limiter = RateLimiter(name, limit, period, mode="wait", max_wait=30.0, store=store_url)
    admitted: list[tuple[float, int, float, float]] = []
    _wait_until(start_at)
    end = time.time() + duration
    while time.time() < end:
        cost = rng.choice((1, 1, 1, 2, 3))
        before = time.time()
        at = limiter.acquire(cost)
        admitted.append((at, cost, before, time.time()))
    return admitted


def open_breaker(store_url: str, name: str, threshold: int) -> str:
    """Open breaker ``name`` by failing ``threshold`` times; returns its state."""
    breaker = CircuitBreaker(name, threshold=threshold, timeout=300.0, store=store_url)
    for _ in range(threshold):
        with contextlib.suppress(ConnectionError):
            breaker.call(failing_call)
    return breaker.status().state


def failing_call() -> None:
    raise ConnectionError("the service is down")


def probe_state(store_url: str, name: str) -> str:
    """What another process sees when it calls through breaker ``name``."""
    breaker = CircuitBreaker(name, threshold=3, timeout=300.0, store=store_url)
    try:
        breaker.call(lambda: None)
    except CircuitOpen as exc:
        return f"refused:{exc.retry_in > 0}"
    return "called"


def bulkhead_calls(
    store_url: str, *, name: str, max_concurrent: int, calls: int, hold: float, start_at: float
) -> list[tuple[float, float]]:
    """``calls`` calls through a policy with ``max_concurrent``; returns each call's
    (start, end) wall-clock interval, recorded inside the call."""
    resource = ResilienceResource(
        store_url=store_url,
        policies={
            name: ServicePolicy(
                retry=RetryConfig(max_attempts=5, base_delay=0.01, deadline=60.0),
                circuit_breaker=None,
                max_concurrent=max_concurrent,
                lease_seconds=30.0,
            )
        },
        dagster_errors=False,
    )
    intervals: list[tuple[float, float]] = []

    def work() -> None:
        started = time.time()
        time.sleep(hold)
        intervals.append((started, time.time()))

    _wait_until(start_at)
    for _ in range(calls):
        resource.call(name, work)
    return intervals


def hold_a_slot_forever(store_url: str, name: str, lease_seconds: float, ready: str) -> None:
    """Take one slot of bulkhead ``name`` and never give it back (the test kills us)."""
    from flowstone_dagster.resilience import Bulkhead

    Bulkhead(name, 1, lease_seconds=lease_seconds, store=store_url).acquire()
    with open(ready, "w", encoding="utf-8") as marker:
        marker.write("held")
    time.sleep(3600)
