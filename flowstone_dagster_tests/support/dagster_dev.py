"""``dagster dev`` on loopback for browser tests, started and stopped as a process group.

``dagster dev`` starts a webserver, a daemon and code servers; on SIGTERM it takes long enough
to stop that its children can outlive it. So it runs in its own session (process group), and
stopping it ends the whole group: SIGTERM, a grace period, then SIGKILL::

    with dagster_dev("example_project", home=tmp_path) as url:
        requests.get(f"{url}/server_info")
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path

import requests

from flowstone_dagster_tests.support.net import free_port

ROOT = Path(__file__).resolve().parents[2]


def _stop_group(process: subprocess.Popen[bytes], grace: float = 15.0) -> None:
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with suppress(subprocess.TimeoutExpired):
        process.wait(grace)
    # The group's other members (code servers, daemon) may outlive the leader.
    with suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    with suppress(subprocess.TimeoutExpired):
        process.wait(10)


@contextmanager
def dagster_dev(
    module: str,
    *,
    home: Path,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = 180.0,
) -> Iterator[str]:
    """Run ``dagster dev -m <module>`` with ``DAGSTER_HOME=home``; yields the UI's base URL."""
    home.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = home / "dagster-dev.log"
    command = [
        str(Path(sys.executable).with_name("dagster")),
        "dev",
        "-m",
        module,
        "-h",
        "127.0.0.1",
        "-p",
        str(port),
    ]
    environment = {**os.environ, "DAGSTER_HOME": str(home), **(env or {})}
    url = f"http://127.0.0.1:{port}"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command,
            cwd=ROOT,
            env=environment,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(
                    f"dagster dev exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
                )
            with suppress(requests.RequestException):
                if requests.get(f"{url}/server_info", timeout=2).ok:
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"dagster dev did not answer within {startup_timeout} s:\n"
                    f"{log_path.read_text()[-4000:]}"
                )
            time.sleep(0.5)  # polling a server that gives no readiness signal
        yield url
    finally:
        _stop_group(process)
