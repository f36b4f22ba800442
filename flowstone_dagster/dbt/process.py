"""Starting dbt, and stopping it with everything it started.

:class:`GroupedDbtCliInvocation` is dagster-dbt's ``DbtCliInvocation`` (JSON log events parsed,
forwarded to stdout, artifacts in a per-invocation target directory) with one difference: dbt
runs in a **new process group**, so that a timeout can stop dbt *and* any process it started
(a wrapper such as ``uv run dbt`` that forks dbt, a Python model's helper), not only the first
one::

    invocation = GroupedDbtCliInvocation.start(
        ["dbt", "run", "--select", "orders"], env=env, project_dir=project, target_path=target
    )
    with Watchdog(invocation.process, timeout=600) as watchdog:
        events = list(invocation.stream_raw_events())
    if watchdog.fired:
        ...  # dbt and its children have been stopped

:func:`stop_process` first sends ``SIGINT`` (dbt cancels its running warehouse queries on it),
then ``SIGKILL`` after ``grace`` seconds. A process that was not started in its own group (as
``DbtCliResource.cli`` starts it) is stopped with every descendant found in ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from dagster_dbt import DagsterDbtTranslator
from dagster_dbt.core.dbt_cli_invocation import (
    PARTIAL_PARSE_FILE_NAME,
    DbtCliInvocation,
    _get_dbt_target_path,
)
from packaging import version

__all__ = [
    "DEFAULT_KILL_GRACE",
    "GroupedDbtCliInvocation",
    "Watchdog",
    "leads_group",
    "project_target_dir",
    "seed_partial_parse",
    "stop_process",
]

#: Seconds between SIGINT (dbt cancels its queries and exits) and SIGKILL.
DEFAULT_KILL_GRACE = 10.0


def project_target_dir(project_dir: Path) -> Path:
    """The project's own target directory (``DBT_TARGET_PATH`` or ``target``)."""
    target = _get_dbt_target_path()
    return target if target.is_absolute() else project_dir / target


class GroupedDbtCliInvocation(DbtCliInvocation):
    """A ``DbtCliInvocation`` whose dbt process leads its own process group."""

    @classmethod
    def start(
        cls,
        args: Sequence[str],
        *,
        env: Mapping[str, str],
        project_dir: Path,
        target_path: Path,
        cli_version: version.Version,
        manifest: Mapping[str, Any] | None = None,
    ) -> GroupedDbtCliInvocation:
        """Start ``args`` (the executable first) in ``project_dir``, in a new process group.

        Like dagster-dbt, a ``partial_parse.msgpack`` in the project's target directory is
        copied to ``target_path`` first, so that dbt does not re-parse an unchanged project.
        """
        source = project_target_dir(project_dir) / PARTIAL_PARSE_FILE_NAME
        destination = target_path / PARTIAL_PARSE_FILE_NAME
        if source.exists() and not destination.exists():
            destination.parent.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):  # a concurrent writer: dbt parses fully instead
                shutil.copyfile(source, destination)
        process = subprocess.Popen(
            list(args),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=project_dir,
            start_new_session=True,
        )
        return cls(
            process=process,
            manifest=manifest or {},
            dagster_dbt_translator=DagsterDbtTranslator(),
            project_dir=project_dir,
            target_path=target_path,
            raise_on_error=False,
            cli_version=cli_version,
        )


def seed_partial_parse(project_dir: Path, target_path: Path) -> None:
    """Give the project a ``partial_parse.msgpack`` from ``target_path`` if it has none yet.

    Later invocations then start from it (see :meth:`GroupedDbtCliInvocation.start`) instead of
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

    With ``grouped`` (the process leads its own group, as :class:`GroupedDbtCliInvocation`
    starts it), the signals go to the group, which also reaches descendants whose parent
    already exited. Otherwise they go to the process and the descendants found in ``/proc``
    before and after the grace period. Returns once the process has exited and been reaped.
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
    stopped the process. ``timeout=None`` never fires. Leaving the block early (an exception,
    an interrupt) also stops the process, so that nothing keeps running behind the caller.
    """

    def __init__(
        self,
        process: subprocess.Popen[bytes],
        timeout: float | None,
        *,
        grace: float = DEFAULT_KILL_GRACE,
    ) -> None:
        self.process = process
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
