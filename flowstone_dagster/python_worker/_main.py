"""The Python worker: runs functions for :class:`~flowstone_dagster.PythonWorkerResource`.

This file is both the worker program and the definition of the wire protocol (the parent imports
it for :func:`send_frame`, :func:`receive_frame` and the constants). It uses the **standard
library only** and Python 3.8 syntax, so that any interpreter or virtualenv can run it::

    /opt/ml-venv/bin/python _main.py '{"request_fd": 5, "response_fd": 8, ...}'

The parent starts it with four dedicated pipes (never stdin/stdout, so that user code printing
cannot corrupt the protocol):

- ``request_fd`` (parent -> worker) and ``response_fd`` (worker -> parent) carry *frames*: one
  ``CALL`` request, then exactly one ``RESULT`` or ``ERROR`` response; the worker opens with one
  ``READY`` frame;
- ``log_fd`` carries the worker's ``logging`` records (length-prefixed JSON);
- ``lifeline_fd`` is never written: when the parent process goes away, however it dies, reading
  it returns end-of-file and the worker kills its process group (itself and the children user
  code started). A closed ``request_fd`` (the parent shutting the pool down) ends it gracefully.

A frame is::

    header   <B kind> <H meta length> <I buffer count n> <Q payload length>   (15 bytes)
    sizes    n x <Q>                                                           (buffer lengths)
    meta     UTF-8 text: "module:function" in a CALL, the result's type in a RESULT
    payload  CALL: pickle of (module, function, args, kwargs); RESULT: pickle of the value;
             READY / ERROR: JSON
    buffers  the pickle's out-of-band buffers (protocol 5: numpy arrays, pandas blocks), raw

so a numpy array crosses as its memory, with no Python loop per element and no copy into the
pickle stream.

**Memory limit.** With ``memory_limit_mb`` the worker limits its address space (``RLIMIT_AS``).
Going past it shows in three ways: an allocation raises ``MemoryError``, a shared library
cannot be loaded (``ImportError: ... failed to map segment from shared object``), or a native
library
cannot start a thread (each thread reserves its stack, and glibc a malloc arena, in the address
space) and OpenBLAS, for one, then *raises SIGINT on itself* (its ``blas_thread_init`` does so
when ``pthread_create`` fails), which Python turns into ``KeyboardInterrupt``: that is why
``import numpy`` under a tight limit used to fail as ``KeyboardInterrupt:``. The worker runs in
its own session, so no terminal Ctrl-C reaches it: it records a SIGINT it receives and, when
the call then fails with ``KeyboardInterrupt`` and a new thread cannot be started (or the
address space is within 64 MiB of the limit), reports a memory error. An ERROR frame for a
memory error carries ``memory_limit_mb`` (and ``memory_reason``, ``address_space_mb``); the
parent raises ``WorkerMemoryExceeded`` from it.
"""

from __future__ import annotations

import faulthandler
import importlib
import json
import logging
import os
import pickle
import signal
import struct
import sys
import threading
import traceback
from contextlib import suppress
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: at run time this file must work on Python 3.8
    from collections.abc import Callable, Sequence

    Bufferish = bytes | bytearray | memoryview
    Wait = Callable[[], None] | None

HEADER = struct.Struct("<BHIQ")
SIZE = struct.Struct("<Q")
LOG_LENGTH = struct.Struct("<I")
PICKLE_PROTOCOL = 5

READY = 1
CALL = 2
RESULT = 3
ERROR = 4
KINDS = {READY: "READY", CALL: "CALL", RESULT: "RESULT", ERROR: "ERROR"}

#: Error stages in an ERROR frame: where in the worker the call failed.
STAGE_ARGUMENTS = "arguments"  # the request's pickle could not be loaded in the worker
STAGE_IMPORT = "import"  # the module or the function could not be found
STAGE_CALL = "call"  # user code raised
STAGE_RESULT = "result"  # the return value could not be pickled

# writev takes at most IOV_MAX (1024 on Linux) buffers per call.
_MAX_IOV = 1024
_FIRST_READ = 1 << 16


class Frame:
    """One decoded frame: ``kind``, ``meta`` (text), ``payload`` and out-of-band ``buffers``."""

    __slots__ = ("buffers", "kind", "meta", "payload", "size")

    def __init__(
        self, kind: int, meta: str, payload: memoryview, buffers: list[bytearray], size: int
    ) -> None:
        self.kind = kind
        self.meta = meta
        self.payload = payload
        self.buffers = buffers
        self.size = size


class ProtocolError(Exception):
    """The other side sent something that is not a frame (never expected: pipes are private)."""


# -- frames ---------------------------------------------------------------------------------------


def frame_parts(
    kind: int, meta: str, payload: Bufferish, buffers: Sequence[Bufferish] = ()
) -> list[Bufferish]:
    """The byte strings of a frame, ready for :func:`send_frame` (buffers are not copied)."""
    meta_bytes = meta.encode("utf-8")[:65535]
    head = HEADER.pack(kind, len(meta_bytes), len(buffers), len(payload))
    sizes = struct.pack(f"<{len(buffers)}Q", *(len(b) for b in buffers)) if buffers else b""
    if len(payload) < _FIRST_READ:  # one small string: one iovec
        return [b"".join((head, sizes, meta_bytes, payload)), *buffers]
    return [head + sizes + meta_bytes, payload, *buffers]


def send_frame(fd: int, parts: Sequence[Bufferish], wait: Wait = None) -> int:
    """Write all of ``parts`` to ``fd``; returns the bytes written.

    ``wait`` is called when a non-blocking ``fd`` is full (it waits for it to drain, or raises).
    """
    if len(parts) == 1:  # a small frame: one write, almost always complete
        try:
            written = os.write(fd, parts[0])
        except BlockingIOError:
            if wait is None:
                raise
            written = 0
        if written == len(parts[0]):
            return written
        parts = [memoryview(parts[0])[written:]]
    views = [memoryview(part).cast("B") for part in parts if len(part)]
    total = sum(len(view) for view in views)
    while views:
        try:
            written = os.writev(fd, views[:_MAX_IOV])
        except BlockingIOError:
            if wait is None:
                raise
            wait()
            continue
        while written and views:
            if written >= len(views[0]):
                written -= len(views[0])
                views.pop(0)
            else:
                views[0] = views[0][written:]
                written = 0
    return total


class _Incoming:
    """The bytes of one frame: what the first read fetched, then reads straight into place."""

    __slots__ = ("fd", "pending", "wait")

    def __init__(self, fd: int, first: bytes, wait: Wait) -> None:
        self.fd = fd
        self.pending = memoryview(first)
        self.wait = wait

    def fill(self, view: memoryview) -> None:
        taken = min(len(self.pending), len(view))
        if taken:
            view[:taken] = self.pending[:taken]
            self.pending = self.pending[taken:]
        while taken < len(view):
            try:
                got = os.readv(self.fd, [view[taken:]])
            except BlockingIOError:
                if self.wait is None:
                    raise
                self.wait()
                continue
            if got == 0:
                raise EOFError("the pipe closed in the middle of a frame")
            taken += got


def receive_frame(fd: int, wait: Wait = None) -> Frame | None:
    """Read one frame from ``fd``; ``None`` at end-of-file before a frame starts.

    Only one frame is ever in flight on a protocol pipe (a request waits for its response), so
    the first read may safely ask for more than the header: small frames take one ``read``.
    ``wait`` is called when a non-blocking ``fd`` has nothing yet.
    """
    while True:
        try:
            first = os.read(fd, _FIRST_READ)
            break
        except BlockingIOError:
            if wait is None:
                raise
            wait()
    if not first:
        return None
    if len(first) >= HEADER.size:  # the common case: a small frame, whole in the first read
        kind, meta_length, count, payload_length = HEADER.unpack_from(first)
        if count == 0 and len(first) == HEADER.size + meta_length + payload_length:
            if kind not in KINDS:
                raise ProtocolError(f"unknown frame kind {kind}")
            start = HEADER.size + meta_length
            meta = first[HEADER.size : start].decode("utf-8", "replace")
            return Frame(kind, meta, memoryview(first)[start:], [], len(first))
    incoming = _Incoming(fd, first, wait)
    head = bytearray(HEADER.size)
    incoming.fill(memoryview(head))
    kind, meta_length, count, payload_length = HEADER.unpack(head)
    if kind not in KINDS:
        raise ProtocolError(f"unknown frame kind {kind}")
    inline = bytearray(SIZE.size * count + meta_length + payload_length)
    view = memoryview(inline)
    incoming.fill(view)
    sizes = struct.unpack_from(f"<{count}Q", inline) if count else ()
    start = SIZE.size * count
    meta = bytes(view[start : start + meta_length]).decode("utf-8", "replace")
    payload = view[start + meta_length :]
    buffers = []
    for size in sizes:
        buffer = bytearray(size)
        incoming.fill(memoryview(buffer))
        buffers.append(buffer)
    total = HEADER.size + len(inline) + sum(sizes)
    return Frame(kind, meta, payload, buffers, total)


# -- values -------------------------------------------------------------------------------------


def dumps(value: Any) -> tuple[bytes, list[memoryview]]:
    """Pickle ``value`` (protocol 5); large contiguous buffers are returned out of band."""
    buffers: list[pickle.PickleBuffer] = []
    payload = pickle.dumps(value, protocol=PICKLE_PROTOCOL, buffer_callback=buffers.append)
    return payload, [buffer.raw() for buffer in buffers]


def loads(payload: Bufferish, buffers: Sequence[bytearray]) -> Any:
    """The inverse of :func:`dumps`; arrays come back backed by (writable) ``buffers``."""
    # The peer is our own worker (or our own parent), running the user's code: trusted.
    return pickle.loads(payload, buffers=buffers)  # noqa: S301


def type_name(value: Any) -> str:
    """``module.QualName`` of ``value``'s type (just the name for builtins)."""
    kind = type(value)
    module = getattr(kind, "__module__", "") or ""
    name = getattr(kind, "__qualname__", kind.__name__)
    return name if module == "builtins" else f"{module}.{name}"


def find_unpicklable(value: Any, path: str = "value", depth: int = 0) -> tuple[str, str, str]:
    """Where in ``value`` pickling fails: ``(path, type name, error)``.

    Walks dicts, lists, tuples, sets and object attributes to the innermost value that cannot
    be pickled, so that an error can say ``args[0]['model']: cannot send a 'generator'``.
    """
    try:
        pickle.dumps(value, protocol=PICKLE_PROTOCOL, buffer_callback=lambda _buffer: None)
    except Exception as exc:  # the error pickle raises varies: PicklingError, TypeError, ...
        error = f"{type(exc).__name__}: {exc}"
    else:
        return ("", "", "")
    if depth < 20:
        children: list[tuple[str, Any]] = []
        if isinstance(value, dict):
            for key, item in value.items():
                children.append((f"{path} (a key)", key))
                children.append((f"{path}[{key!r}]", item))
        elif isinstance(value, (list, tuple)):
            children = [(f"{path}[{i}]", item) for i, item in enumerate(value)]
        elif isinstance(value, (set, frozenset)):
            children = [(f"{path} (an element)", item) for item in value]
        elif isinstance(getattr(value, "__dict__", None), dict):
            children = [(f"{path}.{k}", v) for k, v in vars(value).items()]
        for child_path, child in children:
            found = find_unpicklable(child, child_path, depth + 1)
            if found[0]:
                return found
    return (path, type_name(value), error)


# -- the worker -----------------------------------------------------------------------------------


def is_dotted_name(name: object) -> bool:
    """Whether ``name`` is a dotted Python identifier (``pkg.module``, ``Model.predict``)."""
    import keyword

    return (
        isinstance(name, str)
        and bool(name)
        and all(part.isidentifier() and not keyword.iskeyword(part) for part in name.split("."))
    )


class _PipeLogHandler(logging.Handler):
    """Sends each ``logging`` record to the parent as ``[levelno, logger name, message]``."""

    def __init__(self, fd: int) -> None:
        super().__init__()
        self.fd = fd
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            data = json.dumps([record.levelno, record.name, self.format(record)]).encode()
            with self.lock:  # type: ignore[union-attr]  # Handler.lock exists once created
                send_frame(self.fd, [LOG_LENGTH.pack(len(data)), data])
        except Exception:
            self.handleError(record)


def _watch_lifeline(fd: int) -> None:
    """Block until the parent is gone (EOF: nobody holds the write end), then end everything."""
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    if os.getpgrp() == os.getpid():  # our own process group: the user's children die with us
        os.killpg(os.getpgrp(), signal.SIGKILL)
    os._exit(70)


class _Memory:
    """The worker's memory limit in MiB (0: none, set by _setup) and whether a SIGINT arrived
    since the current call started (see the module docs)."""

    limit_mb = 0
    sigint_seen = False


#: What the dynamic loader says when a shared library does not fit in the address space.
_MAP_FAILURES = ("failed to map segment from shared object", "Cannot allocate memory")

#: An address space this close to the limit (MiB) explains a thread that could not start.
_THREAD_HEADROOM_MB = 64


def _on_sigint(signum: int, frame: Any) -> None:
    _Memory.sigint_seen = True
    raise KeyboardInterrupt


def _address_space_mb() -> int | None:
    """This process's address space (VmSize) in MiB, where /proc tells it."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _thread_can_start() -> bool:
    try:
        thread = threading.Thread(target=lambda: None, name="memory-probe")
        thread.start()
    except RuntimeError:  # "can't start new thread": no room for its stack
        return False
    thread.join()
    return True


def _memory_error(exc: BaseException) -> dict[str, str]:
    """The ERROR frame's memory fields when ``exc`` means the memory limit was hit, else {}."""
    limit = _Memory.limit_mb
    if not limit:
        return {}
    reason = ""
    seen = set()
    link: BaseException | None = exc
    while link is not None and id(link) not in seen:  # a MemoryError anywhere in the chain
        seen.add(id(link))
        if isinstance(link, MemoryError):
            reason = "allocation"
            break
        if isinstance(link, (ImportError, OSError)) and any(
            sign in str(link) for sign in _MAP_FAILURES
        ):  # the dynamic loader found no room for a shared library
            reason = "map"
            break
        link = link.__cause__ or link.__context__
    size = _address_space_mb()
    if not reason and isinstance(exc, KeyboardInterrupt) and _Memory.sigint_seen:
        near = size is not None and size + _THREAD_HEADROOM_MB >= limit
        if near or not _thread_can_start():
            reason = "thread"
    if not reason:
        return {}
    fields = {"memory_limit_mb": str(limit), "memory_reason": reason}
    if size is not None:
        fields["address_space_mb"] = str(size)
    return fields


def _error_payload(stage: str, exc: BaseException, **extra: str) -> bytes:
    try:
        message = str(exc)
    except Exception:  # an exception whose __str__ raises still gets reported
        message = f"<{type(exc).__name__}.__str__ failed>"
    body = {
        "stage": stage,
        "type": type_name(exc),
        "message": message,
        "traceback": "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)),
    }
    body.update(extra)
    return json.dumps(body).encode()


class Worker:
    """The request loop: one call at a time, modules imported once and kept."""

    def __init__(self, request_fd: int, response_fd: int) -> None:
        self.request_fd = request_fd
        self.response_fd = response_fd
        self.functions: dict[tuple[str, str], Callable[..., Any]] = {}

    def resolve(self, module: str, function: str) -> Callable[..., Any]:
        key = (module, function)
        cached = self.functions.get(key)
        if cached is not None:
            return cached
        if not (is_dotted_name(module) and is_dotted_name(function)):
            raise ValueError(f"not a dotted Python name: {module!r}, {function!r}")
        found: Any = importlib.import_module(module)  # imported once: sys.modules keeps it
        for part in function.split("."):
            found = getattr(found, part)
        if not callable(found):
            raise TypeError(f"{module}.{function} is a {type_name(found)}, not a function")
        self.functions[key] = found
        return found

    def reply_error(self, stage: str, exc: BaseException, **extra: str) -> None:
        send_frame(self.response_fd, frame_parts(ERROR, "", _error_payload(stage, exc, **extra)))

    def serve(self) -> None:
        while True:
            frame = receive_frame(self.request_fd)
            if frame is None:  # the parent closed the pool
                return
            if frame.kind != CALL:
                raise ProtocolError(f"expected a CALL frame, got {KINDS[frame.kind]}")
            self.handle(frame)
            del frame

    def handle(self, frame: Frame) -> None:
        try:
            module, function, args, kwargs = loads(frame.payload, frame.buffers)
        except BaseException as exc:  # a type this interpreter cannot import, for instance
            self.reply_error(STAGE_ARGUMENTS, exc)
            return
        _Memory.sigint_seen = False
        try:
            target = self.resolve(module, function)
        except BaseException as exc:
            self.reply_error(STAGE_IMPORT, exc, **_memory_error(exc))
            return
        try:
            result = target(*args, **kwargs)
        except BaseException as exc:  # SystemExit and KeyboardInterrupt too: the call failed
            _flush_output()
            self.reply_error(STAGE_CALL, exc, **_memory_error(exc))
            return
        finally:
            del args, kwargs
        _flush_output()  # before the response: the parent logs the call's output first
        try:
            payload, buffers = dumps(result)
        except BaseException as exc:
            where, bad_type, _error = find_unpicklable(result, "result")
            self.reply_error(STAGE_RESULT, exc, path=where, value_type=bad_type)
            return
        send_frame(self.response_fd, frame_parts(RESULT, type_name(result), payload, buffers))


def _flush_output() -> None:
    for stream in (sys.stdout, sys.stderr):
        with suppress(Exception):  # a closed or replaced stream must not fail the call
            stream.flush()


def _setup(config: dict[str, Any]) -> None:
    for key in ("request_fd", "response_fd", "log_fd", "lifeline_fd"):
        os.set_inheritable(config[key], False)  # programs user code starts must not hold them
    # Python put this file's directory first on sys.path; it holds flowstone's own modules
    # (dbt.py, llm.py, ...), which must not shadow the user's packages.
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if not p or os.path.abspath(p) != here]
    sys.path[:0] = list(config.get("paths") or [])
    faulthandler.enable()  # a segfault's Python traceback goes to stderr, hence to the step log
    with suppress(AttributeError):  # a replaced sys.stdout may not have it
        sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    limit = config.get("memory_limit_mb")
    if limit:
        import resource

        _Memory.limit_mb = int(limit)
        size = int(limit) * 1024 * 1024
        resource.setrlimit(resource.RLIMIT_AS, (size, size))
        signal.signal(signal.SIGINT, _on_sigint)
    root = logging.getLogger()
    root.handlers[:] = [_PipeLogHandler(config["log_fd"])]
    root.setLevel(config.get("log_level") or "INFO")
    logging.captureWarnings(True)
    threading.Thread(
        target=_watch_lifeline, args=(config["lifeline_fd"],), name="lifeline", daemon=True
    ).start()


def main(argv: Sequence[str]) -> int:
    """Serve calls until the parent closes the request pipe."""
    config = json.loads(argv[1])
    _setup(config)
    ready = {
        "pid": os.getpid(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "pickle_protocol": pickle.HIGHEST_PROTOCOL,
    }
    send_frame(config["response_fd"], frame_parts(READY, "", json.dumps(ready).encode()))
    Worker(config["request_fd"], config["response_fd"]).serve()
    _flush_output()
    if os.getpgrp() == os.getpid():
        # Children user code left behind get SIGTERM with us; the parent follows with SIGKILL.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        os.killpg(os.getpgrp(), signal.SIGTERM)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
