"""One Python worker process: start it, send it calls with a deadline, kill it cleanly.

::

    spec = WorkerSpec(python="/opt/ml/bin/python", paths=("/srv/models",))
    worker = WorkerProcess(spec)                   # returns at once; the worker boots meanwhile
    frame = worker.request(parts, what="scoring.predict", timeout=30)
    worker.stop()

:class:`WorkerProcess` knows nothing of pickling: the pool encodes calls into frames
(:mod:`._main`) and decodes the answers. What it guarantees:

- the worker runs in its own session and process group (``start_new_session``), so killing the
  group kills the user's child processes too;
- a call past its timeout kills the group and raises ``CallTimeout``; a worker that dies during
  a call (exit, signal, OOM killer) raises ``WorkerCrashed`` with the exit code or signal and
  the last lines of its stderr; in both cases the process is reaped and every pipe closed;
- waiting uses ``poll`` on the response pipe and a pidfd of the worker, so a death is noticed at
  once even when a grandchild still holds the pipe open.
"""

from __future__ import annotations

import json
import os
import re
import select
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from flowstone_dagster import telemetry
from flowstone_dagster.errors import CallTimeout, ConfigurationError, WorkerCrashed, truncate
from flowstone_dagster.python_worker import _main as wire
from flowstone_dagster.python_worker.output import OutputPump

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Windows, which the pool does not support
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "DEFAULT_MEMORY_LIMIT_MB",
    "WORKER_SCRIPT",
    "WorkerProcess",
    "WorkerSpec",
    "describe_exit",
]

#: The worker program, run by the configured interpreter.
WORKER_SCRIPT = os.path.abspath(wire.__file__)

#: Pipe buffer asked for (Linux; the unprivileged maximum): fewer wake-ups for large arrays.
PIPE_SIZE = 1 << 20

# How long a graceful stop waits for the worker to exit before killing its group.
_STOP_GRACE = 5.0
# Without pidfds (non-Linux), how often a wait checks whether the worker is still alive.
_LIVENESS_SLICE = 0.2

_SIGNAL_HINTS = {
    signal.SIGKILL: "SIGKILL usually means the kernel's OOM killer (check the call's memory "
    "use; memory_limit_mb turns a blow-up into WorkerMemoryExceeded) or another process killed it",
    signal.SIGSEGV: "a crash in native code (a C extension, a library built for another "
    "numpy, ...); its Python traceback, if any, is in the stderr lines",
    signal.SIGABRT: "a native library called abort()",
}


#: Default address-space limit of a worker, in MiB (RLIMIT_AS): a blow-up costs one call
#: (``WorkerMemoryExceeded``) instead of waking the kernel's OOM killer.
DEFAULT_MEMORY_LIMIT_MB = 4096


#: Stderr words of a native library that could not allocate (OpenBLAS: "Memory allocation
#: still failed after 10 retries, giving up") before exiting.
_MEMORY_WORDS = re.compile(r"(?i)\b(memory allocation|out of memory|cannot allocate|bad_alloc)")


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker.

    ``env`` is the complete environment (``None``: inherit this process's); ``paths`` go first
    on the worker's ``sys.path``; ``memory_limit_mb`` limits each worker's address space
    (``None``: no limit).
    """

    python: str
    paths: tuple[str, ...] = ()
    env: Mapping[str, str] | None = None
    cwd: str | None = None
    log_level: str = "INFO"
    memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB
    start_timeout: float = 60.0


def describe_exit(returncode: int) -> tuple[str, int | None, int | None]:
    """``(text, exit_code, signal)`` for a ``Popen.returncode``."""
    if returncode < 0:
        number = -returncode
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        hint = _SIGNAL_HINTS.get(number)  # type: ignore[call-overload]
        text = f"was killed by {name} ({number})" + (f": {hint}" if hint else "")
        return text, None, number
    return f"exited with code {returncode}", returncode, None


#: Exit reasons that are failures (the others: shutdown, recycled).
_FAILED_EXITS = frozenset({"timeout", "crashed", "failed_to_start", "start_timeout"})


class _Expired(Exception):
    """Internal: the deadline passed while waiting on the worker."""


class _Exited(Exception):
    """Internal: the worker process ended while we waited on it."""


def _pipe(size: int | None = None) -> tuple[int, int]:
    read_fd, write_fd = os.pipe()
    if size and fcntl is not None and hasattr(fcntl, "F_SETPIPE_SZ"):
        with suppress(OSError):  # a lower /proc/sys/fs/pipe-max-size: keep the default
            fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, size)
    return read_fd, write_fd


class WorkerProcess:
    """A running worker. Not thread-safe: the pool lends it to one caller at a time."""

    def __init__(
        self, spec: WorkerSpec, sink: Any | None = None, *, service: str = "python_worker"
    ) -> None:
        self.spec = spec
        self.service = service
        self.calls = 0
        self.ready = False
        self.info: dict[str, Any] = {}
        self.returncode: int | None = None
        request_r, self._request_w = _pipe(PIPE_SIZE)
        self._response_r, response_w = _pipe(PIPE_SIZE)
        log_r, log_w = _pipe()
        stdout_r, stdout_w = _pipe()
        stderr_r, stderr_w = _pipe()
        lifeline_r, self._lifeline_w = _pipe()
        child_ends = (request_r, response_w, log_w, stdout_w, stderr_w, lifeline_r)
        config = {
            "request_fd": request_r,
            "response_fd": response_w,
            "log_fd": log_w,
            "lifeline_fd": lifeline_r,
            "paths": list(spec.paths),
            "log_level": spec.log_level,
            "memory_limit_mb": spec.memory_limit_mb,
        }
        self._started = time.perf_counter()
        try:
            self.process = subprocess.Popen(
                [spec.python, WORKER_SCRIPT, json.dumps(config)],
                stdin=subprocess.DEVNULL,
                stdout=stdout_w,
                stderr=stderr_w,
                pass_fds=(request_r, response_w, log_w, lifeline_r),
                env=dict(spec.env) if spec.env is not None else None,
                cwd=spec.cwd,
                start_new_session=True,
            )
        except OSError as exc:
            for fd in (*child_ends, self._request_w, self._response_r, log_r, stdout_r, stderr_r):
                os.close(fd)
            os.close(self._lifeline_w)
            raise ConfigurationError(
                f"cannot start a worker with {spec.python!r}: {exc.strerror or exc}; set it to "
                "the path of a Python 3.8+ interpreter",
                field="python",
            ) from exc
        for fd in child_ends:
            os.close(fd)
        self.pid = self.process.pid
        os.set_blocking(self._request_w, False)
        os.set_blocking(self._response_r, False)
        self.output = OutputPump(self.pid, stdout_r, stderr_r, log_r, sink)
        self._pidfd: int | None = None
        with suppress(AttributeError, OSError):  # Linux 5.3+; elsewhere liveness is polled
            self._pidfd = os.pidfd_open(self.pid)
        self._poller = select.poll()
        self._poller.register(self._response_r, select.POLLIN)
        if self._pidfd is not None:
            self._poller.register(self._pidfd, select.POLLIN)
        self._out_poller = select.poll()
        self._out_poller.register(self._request_w, select.POLLOUT)
        if self._pidfd is not None:
            self._out_poller.register(self._pidfd, select.POLLIN)
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else ("ready" if self.ready else "starting")
        return f"<WorkerProcess pid={self.pid} {state} calls={self.calls}>"

    @property
    def alive(self) -> bool:
        """False once the worker was stopped, killed or found dead."""
        return not self._closed

    # -- waiting ------------------------------------------------------------------------------

    def _wait(self, poller: select.poll, deadline: float, fd: int) -> None:
        """Until ``fd`` is ready; raise ``_Expired`` at ``deadline``, ``_Exited`` on death."""
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise _Expired
            slice_s = remaining if self._pidfd is not None else min(remaining, _LIVENESS_SLICE)
            events = poller.poll(max(int(slice_s * 1000), 1))
            if any(ready == fd for ready, _ in events):
                return
            if events or (self._pidfd is None and self.process.poll() is not None):
                raise _Exited  # only the pidfd (or the liveness check) fired: the worker died

    def _receive(self, deadline: float) -> wire.Frame | None:
        def wait() -> None:
            self._wait(self._poller, deadline, self._response_r)

        wait()
        return wire.receive_frame(self._response_r, wait)

    def _send(self, parts: Sequence[Any], deadline: float) -> int:
        def wait() -> None:
            self._wait(self._out_poller, deadline, self._request_w)

        return wire.send_frame(self._request_w, parts, wait)

    # -- life cycle ---------------------------------------------------------------------------

    def await_ready(self) -> None:
        """Wait for the worker's READY frame (at most ``spec.start_timeout``)."""
        if self.ready:
            return
        timeout = self.spec.start_timeout
        try:
            frame = self._receive(time.monotonic() + timeout)
            if frame is None or frame.kind != wire.READY:
                raise _Exited
        except _Expired:
            self.kill("start_timeout")
            raise CallTimeout(
                f"the worker (pid {self.pid}) did not start within {timeout:g} s; check "
                f"`python` ({self.spec.python}) and what the worker's stderr said in the log",
                timeout=timeout,
                service=self.service,
            ) from None
        except (_Exited, EOFError, wire.ProtocolError):
            raise self._crashed("while starting", reason="failed_to_start") from None
        self.info = json.loads(bytes(frame.payload))
        self.ready = True
        telemetry.emit(
            "flowstone.worker.start",
            duration_s=time.perf_counter() - self._started,
            pid=self.pid,
            python=str(self.info.get("python", "?")),
        )

    def request(self, parts: Sequence[Any], *, what: str, timeout: float) -> wire.Frame:
        """Send one CALL frame and return the worker's RESULT or ERROR frame.

        ``what`` names the call in errors (``"scoring.predict"``). Raises ``CallTimeout`` after
        ``timeout`` seconds (the worker's group is killed) and ``WorkerCrashed`` when the worker
        dies; after either, this worker is closed and the caller replaces it.
        """
        self.await_ready()
        deadline = time.monotonic() + timeout
        self.calls += 1
        try:
            self._send(parts, deadline)
            frame = self._receive(deadline)
            if frame is None:
                raise _Exited
        except _Expired:
            self.kill("timeout")
            raise CallTimeout(
                f"{what} did not finish within {timeout:g} s; its worker (pid {self.pid}) and "
                "the worker's child processes were killed, and the pool starts a fresh one. "
                "Raise the call's timeout if it needs longer",
                timeout=timeout,
                service=self.service,
            ) from None
        except (_Exited, EOFError, BrokenPipeError, wire.ProtocolError):
            raise self._crashed(f"while running {what}", reason="crashed") from None
        return frame

    def _crashed(self, when: str, *, reason: str) -> WorkerCrashed:
        """Reap the dead worker and describe its death."""
        self.kill(reason, already_dead=True)
        assert self.returncode is not None
        text, exit_code, signal_number = describe_exit(self.returncode)
        message = f"the worker (pid {self.pid}) {text} {when}"
        if reason == "failed_to_start":
            message += "; check `python`, `paths` and `env`"
        else:
            message += "; the pool starts a fresh worker (WorkerCrashed is retryable)"
        limit = self.spec.memory_limit_mb
        if limit and any(_MEMORY_WORDS.search(line) for line in self.output.tail):
            message += (
                f"; its stderr speaks of memory: the worker probably exceeded its memory limit "
                f"of {limit} MB (memory_limit_mb), and a native library gave up"
            )
        if self.output.tail:
            message += "\nlast stderr lines:\n" + truncate("\n".join(self.output.tail), 2000)
        return WorkerCrashed(
            message, exit_code=exit_code, signal=signal_number, service=self.service
        )

    def kill(self, reason: str = "killed", *, already_dead: bool = False) -> None:
        """SIGKILL the worker's process group, reap the worker, close everything.

        ``already_dead``: the worker was found dead; the group is still killed (for the
        children it left behind).
        """
        if self._closed:
            return
        # Killing the group before reaping the leader: its pid (= the group id) cannot have been
        # reused yet, so no unrelated process is hit.
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        self.returncode = self.process.wait()
        self._close(reason)

    def stop(self, reason: str = "shutdown", grace: float = _STOP_GRACE) -> None:
        """Ask the worker to exit (close its request pipe), then kill what is left of its group."""
        if self._closed:
            return
        with suppress(OSError):
            os.close(self._request_w)
        self._request_w = -1
        exited = False
        if self._pidfd is not None:
            waiter = select.poll()
            waiter.register(self._pidfd, select.POLLIN)
            exited = bool(waiter.poll(int(grace * 1000)))
        else:
            with suppress(subprocess.TimeoutExpired):
                self.process.wait(grace)
                exited = True
        with suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)  # stragglers the worker's SIGTERM left
        self.returncode = self.process.wait()
        self._close(reason if exited else f"{reason}_killed")

    def _close(self, reason: str) -> None:
        self._closed = True
        self.output.close()
        for fd in (self._request_w, self._response_r, self._lifeline_w, self._pidfd):
            if fd is not None and fd >= 0:
                with suppress(OSError):
                    os.close(fd)
        _text, exit_code, signal_number = describe_exit(self.returncode or 0)
        measures: dict[str, Any] = {"pid": self.pid, "reason": reason, "calls": self.calls}
        if exit_code is not None:
            measures["exit_code"] = exit_code
        if signal_number is not None:
            measures["signal"] = signal_number
        telemetry.emit(
            "flowstone.worker.exit",
            outcome="error" if reason in _FAILED_EXITS else "ok",
            duration_s=time.perf_counter() - self._started,
            **measures,
        )
