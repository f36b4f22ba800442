"""The demo's source system: a small JSON API on loopback serving the bundled orders.

The demo has no network and no accounts, so it serves its own source API: ``GET
/raw_orders/<day>`` answers with that day's orders (``data/orders.json``), 404 for an unknown
day. To show the resilience layer at work, the first request for each day fails once with
``503 Service Unavailable`` and ``Retry-After: 0.2``; the REST I/O manager's retry policy
recovers from it. ``FLOWSTONE_DEMO_INJECT_FAILURES=0`` turns that off, ``outage`` makes every
request fail.

Set ``FLOWSTONE_DEMO_API_URL`` to point the demo at a real API of the same shape instead.

A deployment whose steps run on several machines runs it as one service for all of them
(``python -m example_project.source_api --port 8765 --requests-log requests.log``); the log
has one line per request, ``<unix time> <status> <day>``, for checking rate limits at the
server.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

DATA_FILE = Path(__file__).parent / "data" / "orders.json"
DAYS: tuple[str, ...] = tuple(json.loads(DATA_FILE.read_text()))


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one write, sent at once: without this, Nagle's algorithm and the
    # client's delayed ACK hold each keep-alive response back by ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True
    orders: ClassVar[dict[str, list[dict[str, object]]]] = {}
    failure_mode: ClassVar[str] = "1"
    failed_once: ClassVar[set[str]] = set()
    lock: ClassVar[threading.Lock] = threading.Lock()
    requests_log: ClassVar[Path | None] = None

    def do_GET(self) -> None:
        prefix = "/raw_orders/"
        day = self.path[len(prefix) :] if self.path.startswith(prefix) else None
        if day not in self.orders:
            self._send(404, {"error": f"no orders for {self.path}"})
            return
        with self.lock:
            fail = self.failure_mode == "outage" or (
                self.failure_mode != "0" and day not in self.failed_once
            )
            self.failed_once.add(day)
        if fail:
            self._send(503, {"error": "injected transient failure"}, {"Retry-After": "0.2"})
        else:
            self._send(200, self.orders[day])

    def _send(self, status: int, payload: object, headers: dict[str, str] | None = None) -> None:
        if self.requests_log is not None:
            with self.lock, self.requests_log.open("a") as log:
                log.write(f"{time.time():.6f} {status} {self.path.rsplit('/', 1)[-1]}\n")
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the run log clean
        pass


@cache
def start_source_api() -> str:
    """Start the API once per process on a free loopback port; returns its base URL."""
    _Handler.orders = json.loads(DATA_FILE.read_text())
    _Handler.failure_mode = os.environ.get("FLOWSTONE_DEMO_INJECT_FAILURES", "1")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-source-api", daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"


def main() -> None:
    """Serve the API in the foreground, as a service of a multi-machine deployment."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--requests-log", type=Path, help="append one line per request here")
    arguments = parser.parse_args()
    _Handler.orders = json.loads(DATA_FILE.read_text())
    _Handler.failure_mode = os.environ.get("FLOWSTONE_DEMO_INJECT_FAILURES", "1")
    _Handler.requests_log = arguments.requests_log
    server = ThreadingHTTPServer((arguments.host, arguments.port), _Handler)
    server.daemon_threads = True
    print(f"source API on http://{arguments.host}:{server.server_address[1]}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
