"""What the resilience wrappers cost per call, and the shared limiter's achieved rate.

Run: ``.venv/bin/python bench/resilience.py`` (about a minute; starts a throwaway PostgreSQL).

For each store (memory, SQLite, PostgreSQL on loopback) it times a call that does nothing,
bare and through the circuit breaker (closed, the common case), the rate limiter (a limit
never reached) and both composed, single-threaded and with 8 threads, and prints the
microseconds each wrapper adds per call against the bare call in the same run. Then four
processes hammer one limiter on SQLite and on PostgreSQL, and the achieved rate is compared
with the limit.
"""

from __future__ import annotations

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

from flowstone_dagster.resilience import CircuitBreaker, RateLimiter, open_store  # noqa: E402
from flowstone_dagster_tests.support.postgres import PostgresCluster  # noqa: E402

THREADS = 8


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

    return {
        "bare": nothing,
        "breaker": lambda: breaker.call(nothing),
        "limiter": lambda: (limiter.acquire(), nothing()),
        "breaker+limiter": both,
    }


def bench_store(label: str, url: str, calls: int, aim_us: float) -> list[str]:
    open_store(url)
    rows = []
    for threads in (1, THREADS):
        timings = {name: best_of(3, call, calls, threads) for name, call in wrappers(url).items()}
        bare = timings["bare"]
        for name in ("breaker", "limiter", "breaker+limiter"):
            added_us = (timings[name] - bare) * 1e6
            ratio = timings[name] / bare
            verdict = "ok" if added_us < aim_us else f"ABOVE AIM ({aim_us:g} us)"
            rows.append(
                f"{label:<11} {threads:>7} {name:<16} {bare * 1e6:>9.2f}"
                f" {timings[name] * 1e6:>10.2f} {added_us:>10.2f} {ratio:>9.1f}x  {verdict}"
            )
    return rows


def hammer(
    url: str, name: str, *, limit: int, period: float, seconds: float, start_at: float
) -> int:
    limiter = RateLimiter(name, limit, period, mode="wait", max_wait=60, store=url)
    delay = start_at - time.time()
    if delay > 0:
        time.sleep(delay)
    end = start_at + seconds
    admitted = 0
    while True:
        at = limiter.acquire()
        if at >= end:
            return admitted
        admitted += 1


def bench_rate(label: str, url: str, pool: ProcessPoolExecutor) -> str:
    limit, period, seconds = 200, 0.5, 5.0
    name = f"rate-{uuid.uuid4().hex[:8]}"
    start_at = time.time() + 0.5
    futures = [
        pool.submit(
            hammer, url, name, limit=limit, period=period, seconds=seconds, start_at=start_at
        )
        for _ in range(4)
    ]
    admitted = sum(future.result() for future in futures)
    rate, aim = admitted / seconds, limit / period
    return (
        f"{label:<11} 4 processes: {admitted} calls in {seconds:g} s = {rate:.1f}/s "
        f"against a limit of {aim:g}/s ({limit} per {period:g} s): {rate / aim:.1%} of the limit"
    )


def main() -> None:
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, PostgresCluster.start() as pg:
        stores = [
            ("memory", f"memory://bench-{uuid.uuid4().hex}", 100_000, 5.0),
            ("sqlite", f"sqlite://{Path(tmp) / 'bench.sqlite3'}", 5_000, 200.0),
            ("postgresql", pg.url, 1_000, 1000.0),
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
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
            list(pool.map(time.sleep, [0.3] * 4))  # start and import in every worker first
            for label, url, _, _ in stores[1:]:
                print(bench_rate(label, url, pool), flush=True)
    print(f"\n(total {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
