"""A small read-only JSON API on loopback that serves the bundled sample data.

The demo has no network and no accounts, so it serves its own source system: ``GET
/readings/<day>`` answers with that day's readings, 404 for unknown days. Set
``FLOWSTONE_DEMO_API_URL`` to point the demo at a real API of the same shape instead.
"""

from __future__ import annotations

import json
import threading
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

DATA_FILE = Path(__file__).parent / "data" / "readings.json"


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body in one write, sent at once: without this, Nagle's algorithm and the
    # client's delayed ACK hold each keep-alive response back by ~40 ms.
    wbufsize = -1
    disable_nagle_algorithm = True
    readings: ClassVar[dict[str, list[dict[str, object]]]] = {}

    def do_GET(self) -> None:
        prefix = "/readings/"
        day = self.path[len(prefix) :] if self.path.startswith(prefix) else None
        if day in self.readings:
            self._send(200, {"day": day, "readings": self.readings[day]})
        else:
            self._send(404, {"error": f"no readings for {self.path}"})

    def _send(self, status: int, payload: object) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # keep the run log clean
        pass


@cache
def start_source_api() -> str:
    """Start the API once per process on a free loopback port; returns its base URL."""
    _Handler.readings = json.loads(DATA_FILE.read_text())
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="demo-source-api", daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}"
