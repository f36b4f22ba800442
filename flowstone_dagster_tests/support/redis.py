"""A throwaway Redis server on loopback, for the tests and the bench scripts.

Debian's ``redis-server`` (``bin/setup`` installs it) on a free port, no persistence, in a
temporary directory::

    with RedisServer.start() as server:
        open_store(server.url)
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from flowstone_dagster_tests.support.net import free_port


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "redis-server not found: run bin/setup (it installs Debian's redis-server)"
        )
    return found


def _ping(port: int, timeout: float = 0.2) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One ``redis-server`` process; :meth:`stop` and :meth:`restart` keep the port."""

    def __init__(self, port: int, directory: Path) -> None:
        self.port = port
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def restart(self, timeout: float = 20.0) -> None:
        """Start the server (again, after :meth:`stop`) and wait until it answers PING."""
        command = [
            redis_server_binary(),
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self.directory / "redis.log"),
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        give_up = time.monotonic() + timeout
        while not _ping(self.port):
            if self.process.poll() is not None or time.monotonic() > give_up:
                log = self.directory / "redis.log"
                text = log.read_text() if log.exists() else ""
                self.stop()
                raise RuntimeError(f"redis-server did not start on port {self.port}:\n{text}")
            time.sleep(0.02)

    def stop(self) -> None:
        """Kill the server at once (every connection breaks, all data is gone)."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            process.kill()
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)

    @classmethod
    @contextmanager
    def start(cls) -> Iterator[RedisServer]:
        """Start, and finally stop and delete, a server."""
        directory = Path(tempfile.mkdtemp(prefix="flowstone-redis-"))
        server = cls(free_port(), directory)
        try:
            server.restart()
            yield server
        finally:
            server.stop()
            shutil.rmtree(directory, ignore_errors=True)
