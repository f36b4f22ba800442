"""GET requests per second through flowstone's session factory against a bare requests.Session.

    .venv/bin/python bench/http.py [--requests 2000] [--rounds 5]

Both clients hit the same loopback server (a keep-alive HTTP/1.1 server in its own process, so
that it does not share the client's GIL), in alternating rounds within one run; the figure per
client is its median round. Aim: flowstone / bare >= 0.95.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Run as a script, this file's folder is first on sys.path and its name shadows the standard
# library's ``http`` package (which requests needs): put the repository root there instead.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import requests  # noqa: E402

from flowstone_dagster.http import create_session  # noqa: E402
from flowstone_dagster_tests.support.loopback import serve_bodies  # noqa: E402

BODY = b'{"ok": true, "rows": [1, 2, 3]}'


def _rate(get: Callable[[str], object], url: str, count: int) -> float:
    started = time.perf_counter()
    for _ in range(count):
        get(url)
    return count / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    with serve_bodies({"/data": BODY}) as base_url:
        url = f"{base_url}/data"
        bare = requests.Session()
        ours = create_session()

        def bare_get(u: str) -> object:
            return bare.get(u, timeout=(10, 60)).content

        def ours_get(u: str) -> object:
            return ours.get(u).content

        for get in (bare_get, ours_get):  # warm both pools
            _rate(get, url, 100)
        bare_rates, our_rates = [], []
        for _ in range(args.rounds):
            bare_rates.append(_rate(bare_get, url, args.requests))
            our_rates.append(_rate(ours_get, url, args.requests))
    bare_rate = statistics.median(bare_rates)
    our_rate = statistics.median(our_rates)
    print(f"requests per round: {args.requests}, rounds: {args.rounds}")
    print(f"bare requests.Session : {bare_rate:8.0f} GET/s")
    print(f"flowstone create_session: {our_rate:8.0f} GET/s")
    print(f"ratio flowstone / bare : {our_rate / bare_rate:8.3f}  (aim >= 0.95)")


if __name__ == "__main__":
    main()
