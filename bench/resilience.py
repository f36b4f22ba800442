"""What the resilience wrappers cost per call, what a store outage costs, and the shared
limiter's achieved rate.

Run: ``.venv/bin/python bench/resilience.py`` (about a minute; starts a throwaway PostgreSQL
and a throwaway redis-server).

Aims (added per call, breaker and limiter together): memory <= 2 us (8 threads too), SQLite
<= 100 us, PostgreSQL <= 500 us, Redis <= 500 us. A store that is down: ``retry_step`` raises
and ``local`` fails over in about the time of one refused connection; a hung store costs at
most the call's deadline.

For each store (memory, SQLite, PostgreSQL and Redis on loopback) it times a call that does
nothing, bare and through the circuit breaker (closed, the common case), the rate limiter (a limit
never reached) and both composed, single-threaded and with 8 threads, and prints the
microseconds each wrapper adds per call against the bare call in the same run. Then eight
processes hammer one limiter on SQLite, PostgreSQL and Redis: the achieved rate against the
limit, and how many sliding windows (one starting at each admission) held more than the limit.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

# Import from the repository, not from bench/ (whose http.py would shadow the standard library's).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from flowstone_dagster.errors import StoreUnavailable  # noqa: E402
from flowstone_dagster.resilience import (  # noqa: E402
    CircuitBreaker,
    CircuitBreakerConfig,
    RateLimitConfig,
    RateLimiter,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    open_store,
)
from flowstone_dagster_tests.support.net import free_port  # noqa: E402
from flowstone_dagster_tests.support.postgres import PostgresCluster  # noqa: E402
from flowstone_dagster_tests.support.redis import RedisServer  # noqa: E402

THREADS = 8

# The store-down rows fail calls on purpose: each failure is also a telemetry WARNING (and the
# outage itself two more), which would print between the tables that report them. Module
# level, so the spawned rate-limit processes (which import this file) are quiet too.
logging.getLogger("flowstone_dagster").setLevel(logging.ERROR)


def nothing() -> None:
    return None


def per_call_seconds(call: Callable[[], object], calls: int, threads: int) -> float:
    """Wall time per call, with ``threads`` threads sharing ``calls`` calls."""
    per_thread = calls // threads
    barrier = threading.Barrier(threads + 1)

    def run() -> None:
        barrier.wait()
        for _ in range(per_thread):
            call()

    workers = [threading.Thread(target=run) for _ in range(threads)]
    for worker in workers:
        worker.start()
    barrier.wait()
    started = time.perf_counter()
    for worker in workers:
        worker.join()
    return (time.perf_counter() - started) / (per_thread * threads)


def best_of(repeat: int, call: Callable[[], object], calls: int, threads: int) -> float:
    return min(per_call_seconds(call, calls, threads) for _ in range(repeat))


def wrappers(url: str) -> dict[str, Callable[[], object]]:
    suffix = uuid.uuid4().hex[:8]
    breaker = CircuitBreaker(f"bench-{suffix}", store=url)
    # A limit far above what the bench reaches: the cost of the check, not of waiting.
    limiter = RateLimiter(f"bench-{suffix}", limit=10**9, period=1.0, store=url)

    def both() -> None:
        ticket = breaker.enter()
        try:
            limiter.acquire()
            nothing()
        except BaseException as exc:
            breaker.exit(ticket, exc)
            raise
        breaker.exit(ticket)

    resource = ResilienceResource(
        store_url=url,
        policies={
            f"bench-{suffix}": ServicePolicy(
                circuit_breaker=CircuitBreakerConfig(),
                rate_limit=RateLimitConfig(limit=10**9, period=1.0),
            )
        },
    )
    once = ResilienceResource(
        store_url=url,
        default_policy=ServicePolicy(retry=RetryConfig(max_attempts=1), circuit_breaker=None),
    )

    return {
        "bare": nothing,
        "breaker": lambda: breaker.call(nothing),
        "limiter": lambda: (limiter.acquire(), nothing()),
        "breaker+limiter": both,
        "resource.call": lambda: resource.call(f"bench-{suffix}", nothing),
        "call, no policy": lambda: once.call("plain", nothing),
    }


def bench_store(label: str, url: str, calls: int, aim_us: float) -> list[str]:
    open_store(url)
    rows = []
    for threads in (1, THREADS):
        timings = {name: best_of(3, call, calls, threads) for name, call in wrappers(url).items()}
        bare = timings["bare"]
        for name in ("breaker", "limiter", "breaker+limiter", "resource.call", "call, no policy"):
            added_us = (timings[name] - bare) * 1e6
            ratio = timings[name] / bare
            verdict = "ok" if added_us < aim_us else f"ABOVE AIM ({aim_us:g} us)"
            rows.append(
                f"{label:<11} {threads:>7} {name:<16} {bare * 1e6:>9.2f}"
                f" {timings[name] * 1e6:>10.2f} {added_us:>10.2f} {ratio:>9.1f}x  {verdict}"
            )
    return rows


def bench_store_down() -> list[str]:
    """A store that refuses connections: how long a call takes to raise or to fail over."""
    url = f"postgresql://bench:pw@127.0.0.1:{free_port()}/postgres"
    rows = []
    for mode in ("retry_step", "local"):
        resource = ResilienceResource(
            store_url=url,
            policies={
                "down": ServicePolicy(
                    circuit_breaker=CircuitBreakerConfig(),
                    rate_limit=RateLimitConfig(limit=10**9),
                    on_store_error=mode,  # type: ignore[arg-type]
                )
            },
            dagster_errors=False,
        )
        timings = []
        for _ in range(50):
            started = time.perf_counter()
            with contextlib.suppress(StoreUnavailable):
                resource.call("down", nothing)
            timings.append(time.perf_counter() - started)
        timings.sort()
        rows.append(
            f"store down ({mode:<10}): first call {timings[-1] * 1e3:7.2f} ms (worst of 50), "
            f"median {timings[len(timings) // 2] * 1e3:7.3f} ms"
        )
    return rows


PROCESSES = 8


def hammer(
    url: str, name: str, *, limit: int, period: float, seconds: float, start_at: float
) -> list[float]:
    """Admissions (their times) of one process taking every slot it can for ``seconds``."""
    limiter = RateLimiter(name, limit, period, mode="wait", max_wait=60, store=url)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    end = start_at + seconds
    admitted: list[float] = []
    while True:
        at = limiter.acquire()
        if at >= end:
            return admitted
        admitted.append(at)


def windows_over(times: list[float], limit: int, period: float) -> int:
    """How many sliding windows (one starting at each admission) hold more than ``limit``."""
    over, end = 0, 0
    for start, at in enumerate(times):
        while end < len(times) and times[end] < at + period:
            end += 1
        over += end - start > limit
    return over


def bench_rate(label: str, url: str, pool: ProcessPoolExecutor) -> str:
    limit, period, seconds = 200, 0.5, 5.0
    name = f"rate-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 0.5
    futures = [
        pool.submit(
            hammer, url, name, limit=limit, period=period, seconds=seconds, start_at=start_at
        )
        for _ in range(PROCESSES)
    ]
    times = sorted(at for future in futures for at in future.result())
    rate, aim = len(times) / seconds, limit / period
    return (
        f"{label:<11} {PROCESSES} processes: {len(times)} calls in {seconds:g} s = {rate:.1f}/s "
        f"against a limit of {aim:g}/s ({limit} per {period:g} s): {rate / aim:.1%} of the "
        f"limit, {windows_over(times, limit, period)} windows over"
    )


def main() -> None:
    started = time.perf_counter()
    with (
        tempfile.TemporaryDirectory() as tmp,
        PostgresCluster.start() as pg,
        RedisServer.start() as redis_server,
    ):
        stores = [
            ("memory", f"memory://bench-{uuid.uuid4().hex}", 100_000, 2.0),
            ("sqlite", f"sqlite://{Path(tmp) / 'bench.sqlite3'}", 5_000, 100.0),
            ("postgresql", pg.url, 1_000, 500.0),
            ("redis", redis_server.url, 2_000, 500.0),
        ]
        print(f"Python {sys.version.split()[0]}; per call, best of 3 runs")
        print(
            f"{'store':<11} {'threads':>7} {'wrapper':<16} {'bare us':>9} {'wrapped us':>10}"
            f" {'added us':>10} {'ratio':>10}"
        )
        for label, url, calls, aim in stores:
            for row in bench_store(label, url, calls, aim):
                print(row, flush=True)
        print()
        for row in bench_store_down():
            print(row, flush=True)
        print()
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=PROCESSES, mp_context=context) as pool:
            # start and import in every worker first
            list(pool.map(time.sleep, [0.3] * PROCESSES))
            for label, url, _, _ in stores[1:]:
                print(bench_rate(label, url, pool), flush=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
