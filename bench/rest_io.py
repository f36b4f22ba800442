"""The REST I/O manager's load path against bare ``requests`` + ``json``, same server, same run.

    .venv/bin/python bench/rest_io.py [--small 1000] [--rounds 5] [--big-mb 100] [--stream-mb 1024]

(a) ``--small`` loads of a small JSON body and (b) one load of a ``--big-mb`` JSON body, each
through ``RestIOManager.load_input`` (with a Dagster input context built once) and through a
bare ``requests.Session().get(...)`` + ``json.loads``. Rounds alternate; the figure is each
side's median round. Aim: the I/O manager within 1.1x of bare for small loads.

(c) Peak memory of one load, each in a fresh process (the peak resident set, reset just before
the load through ``/proc/self/clear_refs``, minus the resident set before it), against the body
size: the ``--big-mb`` JSON body loaded bare and by ``RestClient`` (the decoded value and the
transient cost of reading it), the same body as ``bytes`` and streamed element by element with
``RestClient.iter_items``, and a ``--stream-mb`` ndjson body streamed with ``iter_items``
(records consumed and dropped). ``retained`` is what the
loaded value still holds after the load; ``overhead`` is peak minus retained.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

# The repository root instead of bench/ first on sys.path: bench/http.py would shadow the
# standard library's http package, and the tests' support modules live at the root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import dagster as dg  # noqa: E402
import requests  # noqa: E402

from flowstone_dagster import RestClient, RestIOManager  # noqa: E402
from flowstone_dagster_tests.support.loopback import serve_bodies  # noqa: E402

SMALL = json.dumps({"day": "2025-01-15", "rows": [{"id": i, "v": i * 1.5} for i in range(10)]})
RECORD = {"id": 123456, "name": "customer-123456", "score": 30864.0, "tags": ["a", "b"]}
NDJSON_LINE = (json.dumps(RECORD) + "\n").encode()


def big_json(megabytes: float) -> bytes:
    count = int(megabytes * 1e6 / 78)
    return json.dumps(
        [
            {"id": i, "name": f"customer-{i}", "score": i * 0.25, "tags": ["a", "b"]}
            for i in range(count)
        ]
    ).encode()


def _timed(fn: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - started


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def measure(mode: str, url: str) -> None:
    """One load in this (fresh) process; prints peak and retained bytes as JSON."""
    loaders: dict[str, Callable[[], object]] = {
        "bare-json": lambda: json.loads(requests.get(url, timeout=(10, 600)).content),
        "json": lambda: RestClient(lambda _: url, max_body_bytes=2**34).load(),
        "bytes": lambda: RestClient(lambda _: url, format="bytes", max_body_bytes=2**34).load(),
        "json-stream": lambda: sum(
            1 for _ in RestClient(lambda _: url, max_body_bytes=2**34).iter_items()
        ),
        "ndjson-stream": lambda: sum(
            1 for _ in RestClient(lambda _: url, format="ndjson", max_body_bytes=2**34).iter_items()
        ),
    }
    load = loaders[mode]
    before = _status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) to the current RSS
    value = load()
    peak = _status_kib("VmHWM")
    retained = _status_kib("VmRSS")
    del value
    print(json.dumps({"peak": (peak - before) * 1024, "retained": (retained - before) * 1024}))


def _child(mode: str, url: str) -> dict[str, int]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--measure", mode, url],
        check=True,
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
    )
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--big-mb", type=float, default=100)
    parser.add_argument("--stream-mb", type=float, default=1024)
    parser.add_argument("--measure", nargs=2, metavar=("MODE", "URL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(*args.measure)
        return

    # The load path logs each call to the step log at DEBUG; a bench context would print it.
    logging.getLogger("dagster").setLevel(logging.INFO)
    big = big_json(args.big_mb)
    stream_count = int(args.stream_mb * 1e6 / len(NDJSON_LINE))
    bodies = {"/api/small": SMALL.encode(), "/api/big": big}
    repeated = {"/api/stream": (NDJSON_LINE, stream_count)}
    with serve_bodies(bodies, repeated=repeated) as base_url:
        manager = RestIOManager(base_url=f"{base_url}/api", max_body_bytes=2**31)

        def input_context(name: str) -> dg.InputContext:
            return dg.build_input_context(
                asset_key=dg.AssetKey(name),
                upstream_output=dg.build_output_context(asset_key=dg.AssetKey(name)),
            )

        small_context, big_context = input_context("small"), input_context("big")
        bare = requests.Session()

        def bare_load(path: str) -> object:
            response = bare.get(f"{base_url}/api/{path}", timeout=(10, 60))
            response.raise_for_status()
            return json.loads(response.content)

        assert manager.load_input(small_context) == bare_load("small")
        assert manager.load_input(big_context) == bare_load("big")

        results: dict[str, list[float]] = {
            "bare small": [],
            "ours small": [],
            "bare big": [],
            "ours big": [],
        }
        for _ in range(args.rounds):
            results["bare small"].append(_timed(lambda: bare_load("small"), args.small))
            results["ours small"].append(
                _timed(lambda: manager.load_input(small_context), args.small)
            )
            results["bare big"].append(_timed(lambda: bare_load("big"), 1))
            results["ours big"].append(_timed(lambda: manager.load_input(big_context), 1))

        memory = {
            "bare requests + json.loads, json": _child("bare-json", f"{base_url}/api/big"),
            "RestClient.load, json": _child("json", f"{base_url}/api/big"),
            "RestClient.load, bytes": _child("bytes", f"{base_url}/api/big"),
            "RestClient.iter_items, json": _child("json-stream", f"{base_url}/api/big"),
            "RestClient.iter_items, ndjson": _child("ndjson-stream", f"{base_url}/api/stream"),
        }

    median = {name: statistics.median(times) for name, times in results.items()}
    big_mb = len(big) / 1e6
    stream_mb = stream_count * len(NDJSON_LINE) / 1e6
    print(f"rounds: {args.rounds}; big body: {big_mb:.1f} MB; streamed body: {stream_mb:.0f} MB")
    print(
        f"(a) {args.small} small JSON loads: bare {median['bare small'] * 1000:7.1f} ms, "
        f"RestIOManager {median['ours small'] * 1000:7.1f} ms, "
        f"ratio {median['ours small'] / median['bare small']:.3f} (aim <= 1.1)"
    )
    print(
        f"(b) one {big_mb:.0f} MB JSON load: bare {median['bare big'] * 1000:7.1f} ms, "
        f"RestIOManager {median['ours big'] * 1000:7.1f} ms, "
        f"ratio {median['ours big'] / median['bare big']:.3f}"
    )
    print("(c) peak memory of one load, in MB and as a multiple of the body:")
    for name, figures in memory.items():
        size = stream_mb if "ndjson" in name else big_mb
        peak, retained = figures["peak"] / 1e6, figures["retained"] / 1e6
        print(
            f"    {name:34s} body {size:7.0f}  peak {peak:7.0f} ({peak / size:5.2f}x)  "
            f"retained {retained:7.0f}  overhead {peak - retained:7.0f} "
            f"({(peak - retained) / size:5.2f}x)"
        )


if __name__ == "__main__":
    main()
