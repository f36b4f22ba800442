"""Starting dbt, and stopping it with everything it started.

dbt runs in a **new process group**, so that a timeout can stop dbt *and* any process it
started (a wrapper such as ``uv run dbt`` that forks dbt, a Python model's helper), not only
the first one. Plain calls start dbt with :func:`start_dbt`; ``@dbt_assets`` streaming goes
through dagster-dbt's public ``DbtCliResource.cli``, whose ``dbt_executable`` is a small
launcher (:func:`dbt_launcher`) that puts dbt in its own session and answers
``dbt --version`` from the installed dbt-core (dagster-dbt otherwise runs ``dbt --version``,
about 3 s, on every new resource)::

    process = start_dbt(["dbt", "run", "--select", "orders"], env=env, project_dir=project,
                        target_path=target)
    with Watchdog(process, timeout=600) as watchdog:
        for event in read_events(process):
            ...
    if watchdog.fired:
        ...  # dbt and its children have been stopped

:func:`stop_process` first sends ``SIGINT`` (dbt cancels its running warehouse queries on it),
then ``SIGKILL`` after ``grace`` seconds. A process that was not started in its own group is
stopped with every descendant found in ``/proc``.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.metadata
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import orjson

__all__ = [
    "DEFAULT_KILL_GRACE",
    "PARTIAL_PARSE_FILE_NAME",
    "Watchdog",
    "dbt_launcher",
    "leads_group",
    "project_target_dir",
    "read_events",
    "seed_partial_parse",
    "start_dbt",
    "stop_process",
]

#: Seconds between SIGINT (dbt cancels its queries and exits) and SIGKILL.
DEFAULT_KILL_GRACE = 10.0

#: dbt's partial-parse cache, in a target directory.
PARTIAL_PARSE_FILE_NAME = "partial_parse.msgpack"


def project_target_dir(project_dir: Path) -> Path:
    """The project's own target directory (``DBT_TARGET_PATH`` or ``target``), as dbt sees it."""
    target = Path(os.environ.get("DBT_TARGET_PATH") or "target")
    return target if target.is_absolute() else project_dir / target


def copy_partial_parse(project_dir: Path, target_path: Path) -> None:
    """Copy the project's ``partial_parse.msgpack`` into ``target_path`` (as dagster-dbt does),
    so that dbt does not re-parse an unchanged project."""
    source = project_target_dir(project_dir) / PARTIAL_PARSE_FILE_NAME
    destination = target_path / PARTIAL_PARSE_FILE_NAME
    if source.exists() and not destination.exists():
        destination.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):  # a concurrent writer: dbt parses fully instead
            shutil.copyfile(source, destination)


def start_dbt(
    args: Sequence[str], *, env: Mapping[str, str], project_dir: Path, target_path: Path
) -> subprocess.Popen[bytes]:
    """Start ``args`` (the executable first) in ``project_dir``, in a new process group."""
    copy_partial_parse(project_dir, target_path)
    return subprocess.Popen(
        list(args),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=dict(env),
        cwd=project_dir,
        start_new_session=True,
    )


def read_events(process: subprocess.Popen[bytes]) -> Iterator[dict[str, Any]]:
    """dbt's JSON log events from ``process``'s output; a line that is not JSON (a Python
    traceback printed before dbt's logger started) comes as ``{"info": {"msg": line}}``."""
    assert process.stdout is not None
    with process.stdout:
        for raw in process.stdout:
            line = raw.decode(errors="replace").strip()
            if not line:
                continue
            try:
                event = orjson.loads(line)
            except orjson.JSONDecodeError:
                event = None
            if isinstance(event, dict) and isinstance(event.get("info"), dict):
                yield event
            else:
                yield {"info": {"msg": line, "level": "info", "name": ""}, "data": {}}


def installed_dbt_core_version() -> str | None:
    """The installed dbt-core's version, or ``None`` (dbt Fusion, or dbt in another venv)."""
    try:
        return importlib.metadata.version("dbt-core")
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.cache
def dbt_launcher(executable: str) -> str:
    """A launcher for ``DbtCliResource(dbt_executable=...)``: it runs ``executable`` in a new
    session (``setsid``, so the timeout stops the whole tree), and answers ``--version`` with
    the installed dbt-core's version instead of starting dbt (which also asks PyPI).

    ``executable`` itself when neither applies (no ``setsid``, and dbt-core not installed here).
    """
    setsid = shutil.which("setsid")
    # Only the dbt of this environment is the installed dbt-core; another one answers itself.
    same_environment = Path(executable).parent == Path(sys.executable).parent
    installed = installed_dbt_core_version() if same_environment else None
    if setsid is None and installed is None:
        return executable
    run = (
        f"exec {shlex.quote(setsid)} {shlex.quote(executable)}"
        if setsid
        else (f"exec {shlex.quote(executable)}")
    )
    version = (
        f'if [ "$#" -eq 1 ] && [ "$1" = "--version" ]; then\n'
        f"  echo 'Core:'; echo '  - installed: {installed}'; exit 0\nfi\n"
        if installed
        else ""
    )
    script = f'#!/bin/sh\n# flowstone-dagster: dbt in its own session.\n{version}{run} "$@"\n'
    digest = hashlib.sha256(script.encode()).hexdigest()[:16]
    directory = Path(tempfile.gettempdir()) / f"flowstone-dbt-{os.getuid()}"
    path = directory / f"dbt-{digest}"
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
        if not path.exists():
            temporary = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            temporary.write_text(script)
            temporary.chmod(0o700)
            os.replace(temporary, path)
    except OSError:
        return executable  # no writable temporary directory: dbt as dagster-dbt starts it
    return str(path)


def seed_partial_parse(project_dir: Path, target_path: Path) -> None:
    """Give the project a ``partial_parse.msgpack`` from ``target_path`` if it has none yet.

    Later invocations then start from it (see :func:`copy_partial_parse`) instead of
    parsing the whole project; dbt checks the file itself and re-parses when it is stale. The
    copy is atomic (temporary file, then rename), so concurrent invocations are safe.
    """
    source = target_path / PARTIAL_PARSE_FILE_NAME
    destination = project_target_dir(project_dir) / PARTIAL_PARSE_FILE_NAME
    if destination.exists() or not source.exists():
        return
    with contextlib.suppress(OSError):  # best effort: a read-only project just parses fully
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}")
        shutil.copyfile(source, temporary)
        os.replace(temporary, destination)


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may contain spaces; ppid follows it.
    return int(stat.rsplit(")", 1)[1].split()[1])


def _descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (Linux ``/proc``; empty elsewhere)."""
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return []
    children: dict[int, list[int]] = {}
    for candidate in pids:
        parent = _parent_of(candidate)
        if parent is not None:
            children.setdefault(parent, []).append(candidate)
    found: list[int] = []
    pending = [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


def _signal_all(pids: Sequence[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def leads_group(process: subprocess.Popen[bytes]) -> bool:
    """Whether ``process`` (still running) leads its own process group."""
    try:
        return os.getpgid(process.pid) == process.pid
    except ProcessLookupError:
        return False


def stop_process(
    process: subprocess.Popen[bytes], *, grouped: bool, grace: float = DEFAULT_KILL_GRACE
) -> None:
    """Stop ``process`` and everything it started: SIGINT, then SIGKILL after ``grace`` s.

    With ``grouped`` (the process leads its own group, as :func:`start_dbt` and
    :func:`dbt_launcher` start it), the signals go to the group, which also reaches descendants
    whose parent already exited. Otherwise they go to the process and the descendants found in
    ``/proc`` before and after the grace period. Returns once the process has exited and been
    reaped.
    """
    tree = [] if grouped else _descendants(process.pid)
    if process.poll() is None or grouped or tree:
        if grouped:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGINT)
        else:
            _signal_all([process.pid, *tree], signal.SIGINT)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace)
    if grouped:
        # The group outlives its leader while any member lives: kill what ignored SIGINT.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGKILL)
    else:
        _signal_all([process.pid, *tree, *_descendants(process.pid)], signal.SIGKILL)
    process.wait()


class Watchdog:
    """Stop a process (see :func:`stop_process`) if it is still running after ``timeout`` s.

    Used as a context manager around reading the process's output; ``fired`` says whether it
    stopped the process, ``on_fire`` is called just before it does. ``timeout=None`` never
    fires. Leaving the block early (an exception,
    an interrupt) also stops the process, so that nothing keeps running behind the caller.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        timeout: float | None,
        *,
        grace: float = DEFAULT_KILL_GRACE,
        on_fire: Callable[[], None] | None = None,
    ) -> None:
        self.process = process
        self.on_fire = on_fire
        # Decided now, while the process surely exists: it may have exited when the timer fires.
        self.grouped = leads_group(process)
        self.timeout = timeout
        self.grace = grace
        self.fired = False
        self._timer: threading.Timer | None = None
        self._lock = threading.Lock()

    def _fire(self) -> None:
        with self._lock:
            if self.process.poll() is not None:
                return
            self.fired = True
        if self.on_fire is not None:
            self.on_fire()  # before the SIGINT: what dbt said until now is what matters
        stop_process(self.process, grouped=self.grouped, grace=self.grace)

    def __enter__(self) -> Watchdog:
        # Idempotent: a stream may start the watchdog, then hand it on to a `with` block.
        if self.timeout is not None and self._timer is None:
            self._timer = threading.Timer(max(self.timeout, 0.0), self._fire)
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._timer is not None:
            self._timer.cancel()
            if self.fired:
                self._timer.join()  # the stop in progress finishes before the caller goes on
        if exc_type is not None and self.process.poll() is None:
            stop_process(self.process, grouped=self.grouped, grace=self.grace)
