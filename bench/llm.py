"""LLMResource under a shared rate limit, and its cost per call against the bare SDK.

    .venv/bin/python bench/llm.py [--calls 1000] [--rpm 6000] [--overhead-calls 300]

(a) Rate: ``--calls`` calls from 2 processes x 8 threads, each process with its own
``LLMClient(rpm_limit=--rpm)`` through a ``ResilienceResource`` on one SQLite store, against
an OpenAI-shaped server in its own process that itself enforces ``--rpm`` (per 1-second
window, as providers do) and answers 429 beyond it. Reported: the sustained rate against the
limit (aim >= 95 %), the most requests the server saw in any 1-second and 60-second window
(never above the limit), and the 429s (aim 0).
(b) Overhead: the same call through ``LLMClient`` (the one resilience path: retries and a
breaker on the SQLite store; then also with an rpm limit that never binds) and through a bare
``openai.OpenAI(max_retries=0)`` client, in alternating rounds against one server; the figure
is each side's median round, per call.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# The repository root instead of bench/ first on sys.path: bench/http.py would shadow the
# standard library's http package, and the tests' support modules live at the root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import openai  # noqa: E402

from flowstone_dagster import telemetry  # noqa: E402
from flowstone_dagster.llm import LLMClient  # noqa: E402
from flowstone_dagster.llm.client import (  # noqa: E402
    DEFAULT_RATE_LIMIT_MARGIN,
    DEFAULT_RPM_WINDOW,
)
from flowstone_dagster.resilience import ResilienceResource  # noqa: E402
from flowstone_dagster_tests.support.llm_servers import llm_server_process  # noqa: E402

KEY = "sk-bench-000000000000"
MODEL = "gpt-4o-mini"
THREADS = 8
PROCESSES = 2

# Module level, so that the spawned server and client processes (which import this file as
# ``__mp_main__``) are quiet too: the test server would log every request (werkzeug), and the
# clients log each retried 429 as a telemetry WARNING; the tables below count both.
logging.getLogger("werkzeug").setLevel(logging.ERROR)
logging.getLogger("flowstone_dagster").setLevel(logging.ERROR)


def _resilience(store_url: str) -> ResilienceResource:
    """The default policy (3 attempts, breaker) on the shared store, the taxonomy's errors."""
    return ResilienceResource(store_url=store_url, dagster_errors=False)


def _client_process(
    base_url: str, store_url: str, limits: tuple[float, float], calls: int, start_at: float
) -> dict:
    """One client process: ``calls`` calls over ``THREADS`` threads; returns what it saw.
    ``limits``: the rpm limit and the rate-limit margin."""
    rpm, margin = limits
    client = LLMClient(
        "openai",
        model=MODEL,
        api_key=KEY,
        base_url=base_url,
        rpm_limit=rpm,
        rate_limit_max_wait=120,
        rate_limit_margin=margin,
        resilience=_resilience(store_url),
    )
    seen_429 = 0
    lock = threading.Lock()

    def count_429(event: telemetry.TelemetryEvent) -> None:
        nonlocal seen_429
        if event.name == "flowstone.retry" and event.error_type == "RateLimited":
            with lock:
                seen_429 += 1

    telemetry.add_listener(count_429)
    remaining = [calls]
    errors: list[str] = []

    def worker() -> None:
        while True:
            with lock:
                if remaining[0] == 0:
                    return
                remaining[0] -= 1
            try:
                client.chat("Say ok.", max_tokens=5)
            except Exception as exc:  # counted and reported, never hidden
                with lock:
                    errors.append(f"{type(exc).__name__}: {exc}")

    client.call("warm up")  # imports and the first connection, outside the measured run
    time.sleep(max(start_at - time.time(), 0))
    threads = [threading.Thread(target=worker) for _ in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"errors": errors, "retried_429": seen_429}


def bench_rate(calls: int, rpm: float, margin: float) -> None:
    per_second = rpm / 60.0
    with (
        tempfile.TemporaryDirectory() as tmp,
        llm_server_process("openai", api_key=KEY, rpm_limit=rpm, rpm_window=1.0) as (
            base_url,
            report,
        ),
    ):
        store_url = f"sqlite://{Path(tmp) / 'limits.sqlite3'}"
        context = multiprocessing.get_context("spawn")
        start_at = time.time() + 4.0
        with context.Pool(PROCESSES) as pool:
            results = pool.starmap(
                _client_process,
                [(base_url, store_url, (rpm, margin), calls // PROCESSES, start_at)] * PROCESSES,
            )
        served = report()
    times = sorted(served["times"])[PROCESSES:]  # drop the two warm-up calls
    span = times[-1] - times[0]
    # The client's sliding window admits one window's budget at once (rpm_window's share of
    # the limit, 10 requests at 6,000 rpm), then one budget per window: the rate is measured
    # after that first burst.
    burst = max(int(rpm * DEFAULT_RPM_WINDOW / 60.0), 1)
    sustained = (len(times) - burst) / span * 60.0
    max_1s = max(sum(1 for t in times[i:] if t - times[i] < 1.0) for i in range(len(times)))
    max_60s = max(
        sum(1 for t in times[i:] if t - times[i] < 60.0) for i in range(0, len(times), 50)
    )
    errors = [error for result in results for error in result["errors"]]
    print(
        f"(a) rate: {len(times)} calls, {PROCESSES} processes x {THREADS} threads, "
        f"rpm_limit={rpm:g}, rate_limit_margin={margin:g} (server enforces {per_second:g} per "
        "1 s window)"
    )
    print(
        f"    first to last request: {span:.2f} s; sustained rate {sustained:.0f} rpm = "
        f"{sustained / rpm:.1%} of the limit"
    )
    print(
        f"    most requests in any 1 s window: {max_1s} (limit {per_second:g}); "
        f"in any 60 s window: {max_60s} (limit {rpm:g})"
    )
    print(
        f"    429s answered by the server: {served['rejected']}; retried by clients: "
        f"{sum(r['retried_429'] for r in results)}; failed calls: {len(errors)}"
    )
    if served["rejected_times"]:
        offsets = [round(t - times[0], 3) for t in sorted(served["rejected_times"])]
        print(f"    429s at (s from the first request): {offsets[:20]}")
    for error in errors[:3]:
        print(f"    error: {error}")


def _median_round(
    fns: dict[str, Callable[[], object]], calls: int, rounds: int
) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            started = time.perf_counter()
            for _ in range(calls):
                fn()
            samples[name].append((time.perf_counter() - started) / calls)
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_overhead(calls: int, rounds: int) -> None:
    with (
        tempfile.TemporaryDirectory() as tmp,
        llm_server_process("openai", api_key=KEY) as (base_url, _),
    ):
        store_url = f"sqlite://{Path(tmp) / 'limits.sqlite3'}"
        bare = openai.OpenAI(api_key=KEY, base_url=base_url, max_retries=0)
        guard = _resilience(store_url)
        ours = LLMClient("openai", model=MODEL, api_key=KEY, base_url=base_url, resilience=guard)
        limited = LLMClient(
            "openai",
            model=MODEL,
            api_key=KEY,
            base_url=base_url,
            resilience=guard,
            rpm_limit=1e9,
            service="llm:bench-limited",
        )
        messages = [{"role": "user", "content": "Say ok."}]

        def bare_call() -> object:
            return (
                bare.chat.completions.create(
                    model=MODEL,
                    messages=messages,
                    max_completion_tokens=5,  # type: ignore[arg-type]
                )
                .choices[0]
                .message.content
            )

        fns: dict[str, Callable[[], object]] = {
            "bare SDK": bare_call,
            "LLMClient (breaker)": lambda: ours.call("Say ok.", max_tokens=5),
            "LLMClient (breaker + rpm limit)": lambda: limited.call("Say ok.", max_tokens=5),
        }
        for fn in fns.values():  # warm up every path
            for _ in range(20):
                fn()
        medians = _median_round(fns, calls, rounds)
    base = medians["bare SDK"]
    print(f"(b) overhead: {calls} sequential calls per round, {rounds} rounds, median round")
    for name, value in medians.items():
        extra = (value - base) * 1e6
        print(
            f"    {name:34s} {value * 1e3:7.3f} ms/call  {value / base:5.2f}x  (+{extra:6.0f} us)"
            if name != "bare SDK"
            else f"    {name:34s} {value * 1e3:7.3f} ms/call  1.00x"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=1000)
    parser.add_argument("--rpm", type=float, default=6000)
    parser.add_argument(
        "--margin", type=float, default=DEFAULT_RATE_LIMIT_MARGIN, help="rate_limit_margin"
    )
    parser.add_argument("--overhead-calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bench_rate(args.calls, args.rpm, args.margin)
    bench_overhead(args.overhead_calls, args.rounds)


if __name__ == "__main__":
    main()
