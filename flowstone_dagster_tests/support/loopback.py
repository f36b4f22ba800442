"""A keep-alive HTTP/1.1 server in its own process, serving fixed bodies: for bench scripts.

It runs in a separate process so that it does not share the measured client's GIL::

    with serve_bodies({"/small": b'{"ok": true}'}) as base_url:
        requests.get(base_url + "/small")

``repeated`` bodies are generated as they are sent (``line`` times ``count``), so a server of a
1 GB body holds one line, not the body::

    with serve_bodies({}, repeated={"/big.ndjson": (b'{"id": 1}\n', 100_000_000)}) as base_url:
        ...
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


def _serve(
    bodies: Mapping[str, bytes],
    repeated: Mapping[str, tuple[bytes, int]],
    port_queue: multiprocessing.Queue,
) -> None:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body in one write: without this, Nagle's algorithm and the client's
        # delayed ACK hold each keep-alive response back by ~40 ms.
        wbufsize = -1
        disable_nagle_algorithm = True

        def do_GET(self) -> None:
            path = self.path.split("?", 1)[0]
            if path in repeated:
                line, count = repeated[path]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Content-Length", str(len(line) * count))
                self.end_headers()
                block = line * max(1, (256 * 1024) // len(line))
                per_block = len(block) // len(line)
                whole, rest = divmod(count, per_block)
                for _ in range(whole):
                    self.wfile.write(block)
                self.wfile.write(line * rest)
                return
            body = bodies.get(path)
            self.send_response(200 if body is not None else 404)
            body = body if body is not None else b"not found"
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    port_queue.put(server.server_address[1])
    server.serve_forever()


@contextmanager
def serve_bodies(
    bodies: Mapping[str, bytes], *, repeated: Mapping[str, tuple[bytes, int]] | None = None
) -> Iterator[str]:
    """Serve ``bodies`` (path -> body) and ``repeated`` (path -> (line, count), generated while
    sent) on loopback; yields the base URL."""
    context = multiprocessing.get_context("fork")
    ports: multiprocessing.Queue = context.Queue()
    process = context.Process(
        target=_serve, args=(dict(bodies), dict(repeated or {}), ports), daemon=True
    )
    process.start()
    try:
        yield f"http://127.0.0.1:{ports.get(timeout=30)}"
    finally:
        process.terminate()
        process.join(10)
