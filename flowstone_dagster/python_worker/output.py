"""Forward a worker's stdout, stderr and ``logging`` records to a log, tagged with its pid.

One :class:`OutputPump` per worker process reads its three output pipes in a background thread
and writes what arrives to ``sink`` (the Dagster step's log, or a Python logger)::

    [worker 4242 stdout] fitting 3 folds
    [worker 4242 stderr] UserWarning: ...
    [worker 4242] sklearn.model_selection: best score 0.93       (a logging record, its level)

stdout lines go out at INFO, stderr at WARNING, logging records at their own level. The lines a
read returns form one message, so a chatty library costs one log entry per chunk, not per line.
:meth:`OutputPump.drain` forwards what is waiting right now: the pool calls it when a call
returns, so that the call's output is in the log before the call's result is used.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import select
import threading
from contextlib import suppress

from flowstone_dagster.python_worker._main import LOG_LENGTH

__all__ = ["OutputPump"]

fallback_logger = logging.getLogger("flowstone_dagster.python_worker")

_CHUNK = 1 << 16
_STDOUT, _STDERR, _LOGGING = "stdout", "stderr", "logging"


class OutputPump:
    """Reads one worker's stdout, stderr and log pipes (it owns and closes the three fds).

    ``tail`` keeps the last stderr lines, which a crash report quotes (a segfault's traceback
    from ``faulthandler`` arrives there).
    """

    def __init__(
        self,
        pid: int,
        stdout_fd: int,
        stderr_fd: int,
        log_fd: int,
        sink: logging.Logger | None = None,
        *,
        tail_lines: int = 20,
    ) -> None:
        self.pid = pid
        self.sink = sink or fallback_logger
        self.tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._streams = {stdout_fd: _STDOUT, stderr_fd: _STDERR, log_fd: _LOGGING}
        self._partial: dict[int, bytes] = dict.fromkeys(self._streams, b"")
        self._open = set(self._streams)
        for fd in self._streams:
            os.set_blocking(fd, False)
        self._lock = threading.Lock()
        self._wake_read, self._wake_write = os.pipe()
        self._poller = select.poll()
        self._check = select.poll()  # the streams only, for has_output()
        for fd in (*self._streams, self._wake_read):
            self._poller.register(fd, select.POLLIN)
        for fd in self._streams:
            self._check.register(fd, select.POLLIN)
        self._thread = threading.Thread(
            target=self._run, name=f"flowstone-worker-{pid}-output", daemon=True
        )
        self._thread.start()

    # -- reading ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            events = self._poller.poll()
            if any(fd == self._wake_read for fd, _ in events):
                return
            with self._lock:
                for fd, _event in events:
                    if fd in self._open:
                        self._read(fd)

    def _read(self, fd: int) -> bool:
        """Read what ``fd`` has now and forward it; False when nothing was there."""
        try:
            data = os.read(fd, _CHUNK)
        except BlockingIOError:
            return False
        if not data:  # EOF: the worker (and everything holding the pipe) is gone
            self._finish(fd)
            return False
        self._feed(fd, self._partial[fd] + data)
        return True

    def _finish(self, fd: int) -> None:
        self._open.discard(fd)
        with suppress(KeyError):
            self._poller.unregister(fd)
        with suppress(KeyError):
            self._check.unregister(fd)
        rest, self._partial[fd] = self._partial[fd], b""
        if rest and self._streams[fd] != _LOGGING:
            self._forward_text(self._streams[fd], rest.decode("utf-8", "replace"))

    def _feed(self, fd: int, data: bytes) -> None:
        stream = self._streams[fd]
        if stream == _LOGGING:
            self._partial[fd] = self._forward_records(data)
            return
        complete, newline, rest = data.rpartition(b"\n")
        self._partial[fd] = rest
        if newline:
            self._forward_text(stream, complete.decode("utf-8", "replace"))

    def _forward_records(self, data: bytes) -> bytes:
        """Forward every complete length-prefixed record in ``data``; return the remainder."""
        offset = 0
        while len(data) - offset >= LOG_LENGTH.size:
            (length,) = LOG_LENGTH.unpack_from(data, offset)
            end = offset + LOG_LENGTH.size + length
            if end > len(data):
                break
            try:
                level, name, message = json.loads(data[offset + LOG_LENGTH.size : end])
            except ValueError:
                level, name, message = logging.WARNING, "?", "<unreadable log record>"
            self._emit(int(level), f"[worker {self.pid}] {name}: {message}")
            offset = end
        return data[offset:]

    def _forward_text(self, stream: str, text: str) -> None:
        if not text:
            return
        if stream == _STDERR:
            self.tail.extend(text.splitlines())
        level = logging.WARNING if stream == _STDERR else logging.INFO
        self._emit(level, f"[worker {self.pid} {stream}] {text}")

    def _emit(self, level: int, message: str) -> None:
        try:
            self.sink.log(level, message)
        except Exception:  # a log that is gone (step over) must not break the pool
            fallback_logger.log(level, message)

    # -- control ------------------------------------------------------------------------------

    def drain(self, *, partial_lines: bool = True) -> None:
        """Forward everything the pipes hold now (and, by default, unfinished lines)."""
        with self._lock:
            for fd in list(self._open):
                while fd in self._open and self._read(fd):
                    pass
            if partial_lines:
                for fd in self._open:
                    if self._streams[fd] != _LOGGING and self._partial[fd]:
                        text, self._partial[fd] = self._partial[fd], b""
                        self._forward_text(self._streams[fd], text.decode("utf-8", "replace"))

    def has_output(self) -> bool:
        """Whether any pipe has data waiting, or a line is unfinished (one ``poll`` call)."""
        return bool(self._check.poll(0)) or any(self._partial.values())

    def close(self) -> None:
        """Forward what is left, stop the thread, close the pipes. Idempotent."""
        if self._wake_write < 0:
            return
        self.drain()
        os.write(self._wake_write, b"x")
        self._thread.join()
        with self._lock:
            for fd in (*self._streams, self._wake_read, self._wake_write):
                with suppress(OSError):
                    os.close(fd)
            self._open.clear()
            self._wake_write = -1
