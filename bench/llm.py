"""LLMResource under a shared rate limit, and its cost per call against the bare SDK.

    .venv/bin/python bench/llm.py [--calls 1000] [--rpm 6000] [--overhead-calls 300]

(a) Rate: ``--calls`` calls from 2 processes x 8 threads, each process with its own
``LLMClient(rpm_limit=--rpm)`` through a ``ResilienceResource`` on one SQLite store, against
an OpenAI-shaped server in its own process that itself enforces ``--rpm`` (per 1-second
window, counted when each request arrives, as providers do) and answers 429 beyond it. A full
garbage collection of a client process (about 180 ms with Dagster imported, measured: what a
long-running step's process does now and then by itself, triggered by the allocations of a
request being built) stalls the request between its admission and the wire. Three passes: the
clients as shipped; with a full collection in each client process every ``--pause-every``
seconds, run by a request just admitted; and the same with the admission not confirmed at
the wire (the baseline). Reported: the sustained rate against the limit (aim >=
95 %), the most requests the server admitted in any 1-second window, the 429s (aim 0), and
how many requests were admitted again at the wire.
(b) Overhead: the same call through ``LLMClient`` (the one resilience path: retries and a
breaker on the SQLite store; then also with an rpm limit that never binds; then both on the
in-process memory store) and through a bare ``openai.OpenAI(max_retries=0)`` client, in
alternating rounds against one server; the figure is each side's median round, per call.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
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
    base_url: str,
    store_url: str,
    limits: tuple[float, float],
    calls: int,
    options: tuple[bool, float, float],
) -> dict:
    """One client process: ``calls`` calls over ``THREADS`` threads; returns what it saw.
    ``limits``: the rpm limit and the rate-limit margin; ``options``: whether the admission
    is confirmed at the wire, the seconds between full garbage collections, and the time the
    calls start."""
    rpm, margin = limits
    check_at_wire, pause_every, start_at = options
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
    if not check_at_wire:
        client.late_after = math.inf  # the baseline: never admitted again
    seen_429 = readmitted = 0
    lock = threading.Lock()
    last_pause = [time.monotonic()]

    def count_429(event: telemetry.TelemetryEvent) -> None:
        nonlocal seen_429, readmitted
        if event.name == "flowstone.retry" and event.error_type == "RateLimited":
            with lock:
                seen_429 += 1
        elif event.name == "flowstone.ratelimit.readmitted":
            with lock:
                readmitted += 1
        elif event.name == "flowstone.ratelimit.wait" and str(event.measures["limiter"]).endswith(
            ":rpm"
        ):
            # Just admitted (after a wait), not yet sent: where a collection triggered by the
            # request's own allocations stalls it (measured: the natural ones land there).
            now = time.monotonic()
            if now - last_pause[0] >= pause_every:
                last_pause[0] = now
                gc.collect()  # holds the GIL: every thread of the process stops meanwhile

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
    last_pause[0] = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"errors": errors, "retried_429": seen_429, "readmitted": readmitted}


def bench_rate(calls: int, rpm: float, margin: float, pause_every: float) -> None:
    print(
        f"(a) rate: {calls} calls, {PROCESSES} processes x {THREADS} threads, "
        f"rpm_limit={rpm:g}, rate_limit_margin={margin:g} (server enforces {rpm / 60:g} per "
        "1 s window)"
    )
    # As shipped; then with a full collection in each client every pause_every seconds, with
    # and without the admission confirmed at the wire (the baseline).
    for options in ((True, math.inf), (True, pause_every), (False, pause_every)):
        _rate_pass(calls, rpm, margin, options)


def _rate_pass(calls: int, rpm: float, margin: float, options: tuple[bool, float]) -> None:
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
                [(base_url, store_url, (rpm, margin), calls // PROCESSES, (*options, start_at))]
                * PROCESSES,
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
    label = "as shipped"
    if options[1] != math.inf:
        label = f"a full collection every {options[1]:g} s, " + (
            "confirmed at the wire" if options[0] else "not confirmed (baseline)"
        )
    print(
        f"    {label}:\n        {sustained / rpm:.1%} of the limit ({sustained:.0f} rpm, "
        f"{span:.2f} s); most in any 1 s: {max_1s} (limit {per_second:g}), in any 60 s: "
        f"{max_60s}; 429s: {served['rejected']} (retried {sum(r['retried_429'] for r in results)}"
        f", failed calls {len(errors)}); admitted again at the wire: "
        f"{sum(r['readmitted'] for r in results)}"
    )
    if served["rejected_times"]:
        offsets = [round(t - times[0], 3) for t in sorted(served["rejected_times"])]
        print(f"        429s at (s from the first request): {offsets[:12]}")
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

        memory = ResilienceResource(store_url="memory://bench-llm", dagster_errors=False)
        in_memory = LLMClient(
            "openai",
            model=MODEL,
            api_key=KEY,
            base_url=base_url,
            resilience=memory,
            rpm_limit=1e9,
            service="llm:bench-memory",
        )
        fns: dict[str, Callable[[], object]] = {
            "bare SDK": bare_call,
            "LLMClient (breaker)": lambda: ours.call("Say ok.", max_tokens=5),
            "LLMClient (breaker + rpm limit)": lambda: limited.call("Say ok.", max_tokens=5),
            "  the same, memory store": lambda: in_memory.call("Say ok.", max_tokens=5),
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
    parser.add_argument(
        "--pause-every", type=float, default=2.0, help="seconds between full collections"
    )
    parser.add_argument("--overhead-calls", type=int, default=300)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    bench_rate(args.calls, args.rpm, args.margin, args.pause_every)
    bench_overhead(args.overhead_calls, args.rounds)


if __name__ == "__main__":
    main()
