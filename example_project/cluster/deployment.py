"""The example project deployed on Dagster's Celery executor, on one machine.

Every node is its own process with its own working directory and ``DAGSTER_HOME`` (nothing
local is shared, as on separate machines); what they share is what separate machines would:

- PostgreSQL: Dagster's run, event-log and schedule storage, the dbt warehouse (schema
  ``analytics``) and the external database the I/O manager stores into;
- Redis: the Celery broker (db 1) and result backend (db 2), and flowstone's resilience store
  (db 0), so that breakers and rate limits hold across every worker;
- the source API, one service for everybody.

The nodes: the source API, ``dagster-daemon`` (the queued run coordinator launches runs; each
run's executor sends its steps to Celery), and N Celery workers started with
``dagster-celery worker start``. A backfill of the example's days is submitted with ``dagster
job backfill``, as a user would.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import dagster as dg

HERE = Path(__file__).resolve().parent
REPOSITORY = HERE.parents[1]
JOB = "daily_pipeline"
LOCATION = "example_project"
#: Variables of the caller that would point a node elsewhere than the deployment.
_SCRUBBED = (
    "DAGSTER_HOME",
    "FLOWSTONE_DEMO_API_URL",
    "FLOWSTONE_DEMO_WAREHOUSE",
    "FLOWSTONE_LLM_BASE_URL",
    "ANTHROPIC_API_KEY",
    "OPENAI_API_KEY",
    "SLACK_WEBHOOK_URL",
    "SMTP_HOST",
)


def _redis_db(url: str, db: int) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, f"/{db}", parts.query, ""))


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Node:
    """One process of the deployment, in its own directory."""

    name: str
    directory: Path
    process: subprocess.Popen[bytes]

    @property
    def log(self) -> Path:
        return self.directory / "node.log"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class CeleryDeployment:
    """The deployment's configuration; :meth:`running` starts it and stops it on exit."""

    root: Path
    postgres_url: str
    redis_url: str
    workers: int = 2
    #: "celery" (steps on the Celery workers) or "multiprocess" (steps in subprocesses of
    #: each run's process, as on one machine; no Celery worker is started): the baseline.
    executor: str = "celery"
    #: Calls per second allowed to the source API (shared through the store), or None.
    source_rate: float | None = None
    #: The bundled source API's failures: "1" (each day's first request once), "0", "outage".
    inject_failures: str = "1"
    breaker_timeout: float = 30.0
    environment_overrides: Mapping[str, str] = field(default_factory=dict)
    nodes: list[Node] = field(default_factory=list)
    source_api_url: str = ""

    @property
    def requests_log(self) -> Path:
        return self.root / "source-api" / "requests.log"

    def environment(self, node_dir: Path) -> dict[str, str]:
        """What every node of this deployment runs with (its own directory as DAGSTER_HOME)."""
        environment = {k: v for k, v in os.environ.items() if k not in _SCRUBBED}
        bin_dir = str(Path(sys.executable).parent)
        environment.update(
            {
                "DAGSTER_HOME": str(node_dir),
                "FLOWSTONE_NODE_DIR": str(node_dir),
                "PYTHONPATH": os.pathsep.join(
                    [str(REPOSITORY), *filter(None, [os.environ.get("PYTHONPATH")])]
                ),
                "PATH": os.pathsep.join([bin_dir, os.environ.get("PATH", "")]),
                "FLOWSTONE_DAGSTER_PG_URL": self.postgres_url,
                "FLOWSTONE_DEMO_PG_URL": self.postgres_url,
                "FLOWSTONE_DEMO_WAREHOUSE_URL": self.postgres_url,
                "FLOWSTONE_RESILIENCE_STORE": _redis_db(self.redis_url, 0),
                "FLOWSTONE_CELERY_BROKER": _redis_db(self.redis_url, 1),
                "FLOWSTONE_CELERY_BACKEND": _redis_db(self.redis_url, 2),
                "FLOWSTONE_DEMO_EXECUTOR": self.executor,
                "FLOWSTONE_DEMO_INJECT_FAILURES": self.inject_failures,
                "FLOWSTONE_DEMO_BREAKER_TIMEOUT": str(self.breaker_timeout),
                "FLOWSTONE_DEMO_API_URL": self.source_api_url,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.source_rate is not None:
            environment["FLOWSTONE_DEMO_SOURCE_RATE"] = str(self.source_rate)
        environment.update(self.environment_overrides)
        return environment

    def _node_dir(self, name: str) -> Path:
        directory = self.root / name
        directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(HERE / "dagster.yaml", directory / "dagster.yaml")
        return directory

    def _start(self, name: str, command: Sequence[str]) -> Node:
        directory = self._node_dir(name)
        with (directory / "node.log").open("ab") as log:
            process = subprocess.Popen(
                list(command),
                cwd=directory,
                env=self.environment(directory),
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group, stopped as one
            )
        node = Node(name, directory, process)
        self.nodes.append(node)
        return node

    def _wait_for(self, node: Node, text: str, timeout: float) -> None:
        give_up = time.monotonic() + timeout
        while text not in node.log_text():
            if node.process.poll() is not None or time.monotonic() > give_up:
                raise RuntimeError(
                    f"{node.name} did not become ready ({text!r} not in its log):\n"
                    + node.log_text()[-4000:]
                )
            time.sleep(0.2)

    def start(self) -> None:
        """Start the source API, the Celery workers and the daemon; wait until they serve."""
        port = _free_port()
        self.source_api_url = f"http://127.0.0.1:{port}"
        api = self._start(
            "source-api",
            [
                sys.executable,
                "-m",
                "example_project.source_api",
                "--port",
                str(port),
                "--requests-log",
                str(self.requests_log),
            ],
        )
        self._wait_for(api, "source API on", timeout=30)
        for index in range(1, self.workers + 1 if self.executor == "celery" else 1):
            worker = self._start(
                f"worker-{index}",
                [
                    str(Path(sys.executable).with_name("dagster-celery")),
                    "worker",
                    "start",
                    "-A",
                    "dagster_celery.app",
                    "-y",
                    str(HERE / "celery.yaml"),
                    "-n",
                    f"worker-{index}",
                    "--",
                    "--concurrency=1",
                    "--without-gossip",
                    "--without-mingle",
                ],
            )
            self._wait_for(worker, "ready.", timeout=120)
        daemon = self._start(
            "daemon",
            [
                str(Path(sys.executable).with_name("dagster-daemon")),
                "run",
                "-w",
                str(HERE / "workspace.yaml"),
            ],
        )
        self._wait_for(daemon, "QueuedRunCoordinatorDaemon", timeout=120)

    def stop(self) -> None:
        """Stop every node (SIGTERM to its process group, then SIGKILL)."""
        for node in reversed(self.nodes):
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGTERM)
        give_up = time.monotonic() + 20
        for node in reversed(self.nodes):
            with suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=max(give_up - time.monotonic(), 0.1))
            with suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)
            with suppress(subprocess.TimeoutExpired):
                node.process.wait(timeout=5)

    @contextmanager
    def running(self) -> Iterator[CeleryDeployment]:
        try:
            self.start()
            yield self
        finally:
            self.stop()

    @contextmanager
    def instance(self) -> Iterator[dg.DagsterInstance]:
        """This deployment's Dagster instance, seen from a client node of its own."""
        directory = self._node_dir("client")
        saved = {k: os.environ.get(k) for k in ("FLOWSTONE_DAGSTER_PG_URL", "FLOWSTONE_NODE_DIR")}
        os.environ["FLOWSTONE_DAGSTER_PG_URL"] = self.postgres_url
        os.environ["FLOWSTONE_NODE_DIR"] = str(directory)
        try:
            with dg.DagsterInstance.from_config(str(directory)) as instance:
                yield instance
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value

    def _job_command(self, command: str, *arguments: str) -> None:
        """``dagster job <command>`` on the example's job, from the client node."""
        directory = self._node_dir("client")
        subprocess.run(
            [
                str(Path(sys.executable).with_name("dagster")),
                "job",
                command,
                "-w",
                str(HERE / "workspace.yaml"),
                "-l",
                LOCATION,
                "-j",
                JOB,
                *arguments,
            ],
            cwd=directory,
            env=self.environment(directory),
            check=True,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def backfill(self, partitions: Sequence[str]) -> str:
        """Submit a backfill of ``partitions`` with ``dagster job backfill``; returns its id."""
        tag = f"flowstone-{time.time_ns()}"
        self._job_command(
            "backfill",
            "--partitions",
            ",".join(partitions),
            "--tags",
            json.dumps({"flowstone/cluster-backfill": tag}),
            "--noprompt",
        )
        with self.instance() as instance:
            for backfill in instance.get_backfills():
                if backfill.tags.get("flowstone/cluster-backfill") == tag:
                    return str(backfill.backfill_id)
        raise RuntimeError("dagster job backfill returned but no backfill was recorded")

    def launch(self, partition: str) -> str:
        """Submit one run of the job for ``partition`` (``dagster job launch``, queued);
        returns its run id."""
        tag = f"flowstone-{time.time_ns()}"
        self._job_command(
            "launch",
            "--tags",
            json.dumps({"dagster/partition": partition, "flowstone/cluster-run": tag}),
        )
        with self.instance() as instance:
            (run,) = instance.get_runs(filters=dg.RunsFilter(tags={"flowstone/cluster-run": tag}))
        return run.run_id

    def worker(self, hostname: str) -> Node:
        """The worker node of a Celery hostname (``worker-1@host``)."""
        name = hostname.split("@", 1)[0]
        return next(node for node in self.nodes if node.name == name)

    def pool_processes(self, node: Node) -> list[int]:
        """The pids of a worker node's Celery pool processes (where steps execute): the
        children of its ``celery`` main process."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with suppress(OSError):
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                children.setdefault(int(fields[1]), []).append(int(entry.name))
        mains = children.get(node.process.pid, [])  # `dagster-celery` runs `celery` as a child
        return [pid for main in mains for pid in children.get(main, [])]

    def wait(self, backfill_id: str, runs: int, timeout: float = 900) -> list[dg.DagsterRun]:
        """Wait until the backfill's ``runs`` runs have all finished; returns them."""
        give_up = time.monotonic() + timeout
        finished = {
            dg.DagsterRunStatus.SUCCESS,
            dg.DagsterRunStatus.FAILURE,
            dg.DagsterRunStatus.CANCELED,
        }
        with self.instance() as instance:
            while True:
                found = list(
                    instance.get_runs(filters=dg.RunsFilter(tags={"dagster/backfill": backfill_id}))
                )
                if len(found) >= runs and all(run.status in finished for run in found):
                    return found
                for node in self.nodes:
                    if node.process.poll() is not None:
                        raise RuntimeError(f"{node.name} exited:\n{node.log_text()[-4000:]}")
                if time.monotonic() > give_up:
                    states = {run.run_id[:8]: run.status.value for run in found}
                    raise TimeoutError(f"backfill {backfill_id} not finished: {states}")
                time.sleep(1.0)
