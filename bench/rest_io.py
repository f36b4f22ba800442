"""The REST I/O manager's load path against bare ``requests`` + ``json``, same server, same run.

    .venv/bin/python bench/rest_io.py [--small 1000] [--rounds 5]

(a) ``--small`` loads of a small JSON body and (b) one load of a ~20 MB JSON body, each through
``RestIOManager.load_input`` (with a Dagster input context built once) and through a bare
``requests.Session().get(...)`` + ``json.loads``. Rounds alternate; the figure is each side's
median round. Aim: the I/O manager within 1.2x of bare on both.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
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

from flowstone_dagster import RestIOManager  # noqa: E402
from flowstone_dagster_tests.support.loopback import serve_bodies  # noqa: E402

SMALL = json.dumps({"day": "2025-01-15", "rows": [{"id": i, "v": i * 1.5} for i in range(10)]})
BIG = json.dumps(
    [
        {"id": i, "name": f"customer-{i}", "score": i * 0.25, "tags": ["a", "b"]}
        for i in range(280_000)
    ]
)


def _timed(fn: Callable[[], object], repeat: int) -> float:
    started = time.perf_counter()
    for _ in range(repeat):
        fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--small", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    # The load path logs each call to the step log at DEBUG; a bench context would print it.
    logging.getLogger("dagster").setLevel(logging.INFO)
    bodies = {"/api/small": SMALL.encode(), "/api/big": BIG.encode()}
    with serve_bodies(bodies) as base_url:
        manager = RestIOManager(base_url=f"{base_url}/api")

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

    median = {name: statistics.median(times) for name, times in results.items()}
    print(f"rounds: {args.rounds}; big body: {len(BIG) / 1e6:.1f} MB")
    print(
        f"(a) {args.small} small JSON loads: bare {median['bare small'] * 1000:7.1f} ms, "
        f"RestIOManager {median['ours small'] * 1000:7.1f} ms, "
        f"ratio {median['ours small'] / median['bare small']:.3f} (aim <= 1.2)"
    )
    print(
        f"(b) one {len(BIG) / 1e6:.0f} MB JSON load: bare {median['bare big'] * 1000:7.1f} ms, "
        f"RestIOManager {median['ours big'] * 1000:7.1f} ms, "
        f"ratio {median['ours big'] / median['bare big']:.3f} (aim <= 1.2)"
    )


if __name__ == "__main__":
    main()
