"""A pool of warm Python worker processes: call a function in one, many across all.

The plain class behind :class:`~flowstone_dagster.PythonWorkerResource`, usable
without Dagster::

    from flowstone_dagster.python_worker.pool import WorkerPool
    from flowstone_dagster.python_worker.process import WorkerSpec

    spec = WorkerSpec(python="/opt/ml/bin/python", paths=("/srv/models",))
    with WorkerPool(spec, size=2) as pool:
        pool.call("scoring", "predict", ([[5.1, 3.5, 1.4, 0.2]],))          # -> array([0])
        future = pool.submit("scoring", "predict", (rows,), timeout=30)
        scores = pool.map("scoring", "predict", batches)                  # in order

- **Lazy**: the first call starts all ``size`` workers (they boot in parallel) and waits only
  for the one it uses.
- **One call per worker at a time.** When all are busy, calls wait (up to ``queue_timeout``),
  and at most ``max_queued`` may wait: beyond that a call raises ``WorkerPoolBusy`` at once.
- **A failed worker costs one call.** A timeout kills the worker's process group, a crash is
  reaped; either way the pool starts a replacement before the failing call returns, so the pool
  always has ``size`` processes. ``max_calls_per_worker`` recycles workers (fresh memory).
- **One resilience path.** Every call goes through
  ``resolve(resilience).call(service, ...)``: the ``ResilienceResource``'s policy for ``service``
  (``WorkerCrashed`` and ``CallTimeout`` are retryable per ``is_retryable``,
  ``PythonWorkerError`` and ``WorkerDataError`` are not) or, without one, a single attempt with
  the same telemetry (``flowstone.resilience.call``). The pool raises the taxonomy's errors;
  mapping them to Dagster is the resource's job.
- **Memory.** A call past the worker's ``memory_limit_mb`` raises ``WorkerMemoryExceeded`` (a
  ``PythonWorkerError`` naming the limit).
- Every call emits one ``flowstone.worker.call`` telemetry event.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import Any

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    FlowstoneError,
    PythonWorkerError,
    truncate,
)
from flowstone_dagster.python_worker import _main as wire
from flowstone_dagster.python_worker.errors import (
    WorkerDataError,
    WorkerMemoryExceeded,
    WorkerPoolBusy,
)
from flowstone_dagster.python_worker.output import fallback_logger
from flowstone_dagster.python_worker.process import WorkerProcess, WorkerSpec
from flowstone_dagster.resilience import ResilienceResource, current_deadline, resolve

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "DEFAULT_QUEUE_TIMEOUT",
    "DEFAULT_TIMEOUT",
    "WorkerPool",
    "check_dotted_name",
    "default_pool_size",
]

logger = logging.getLogger("flowstone_dagster.python_worker")

#: Seconds a call may run before its worker is killed (``timeout=`` per call overrides it).
DEFAULT_TIMEOUT = 300.0
#: Calls that may wait for a busy pool before new ones are refused with ``WorkerPoolBusy``.
DEFAULT_MAX_QUEUED = 1000
#: Seconds a call may wait for a free worker before it fails with ``CallTimeout``.
DEFAULT_QUEUE_TIMEOUT = 600.0

_ARGUMENT_HELP = (
    "Send plain data (builtins, dates, numpy arrays, pandas objects) or types that the worker's "
    "interpreter can import too, with compatible versions (docs/python_worker.md, 'Data')"
)


def default_pool_size() -> int:
    """The CPUs this process may use."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # pragma: no cover - macOS
        return os.cpu_count() or 1


_valid_names: set[str] = set()


def check_dotted_name(value: object, field: str) -> str:
    """Return ``value`` if it is a dotted Python name, else raise ``ConfigurationError``."""
    if isinstance(value, str) and value in _valid_names:
        return value
    if not wire.is_dotted_name(value):
        raise ConfigurationError(
            f"must be a dotted Python name such as 'scoring.predict', got {value!r}", field=field
        )
    assert isinstance(value, str)
    _valid_names.add(value)
    return value


class _Encoded:
    """A call, pickled once (retries resend the same bytes)."""

    __slots__ = ("buffers", "bytes_in", "function", "module", "parts", "what")

    def __init__(self, module: str, function: str, args: Sequence[Any], kwargs: Mapping[str, Any]):
        self.module = module
        self.function = function
        self.what = f"{module}.{function}"
        try:
            payload, buffers = wire.dumps((module, function, tuple(args), dict(kwargs)))
        except Exception as exc:
            path, value_type, error = wire.find_unpicklable(tuple(args), "args")
            if not path:
                path, value_type, error = wire.find_unpicklable(dict(kwargs), "kwargs")
            raise WorkerDataError(
                f"cannot send {path or 'the arguments'} (a {value_type or '?'}) to {self.what}: "
                f"{error or exc}. {_ARGUMENT_HELP}",
                direction="argument",
                path=path or None,
                value_type=value_type or None,
            ) from exc
        self.parts = wire.frame_parts(wire.CALL, f"{module}:{function}", payload, buffers)
        self.buffers = len(buffers)
        self.bytes_in = len(payload) + sum(len(buffer) for buffer in buffers)


class WorkerPool:
    """``size`` worker processes started from ``spec``; thread-safe.

    Args:
        spec: how to start a worker (interpreter, paths, environment).
        size: number of worker processes (default: the CPUs this process may use).
        timeout: default seconds per call; past it the worker is killed (``CallTimeout``).
        max_calls_per_worker: replace a worker after this many calls (``None``: never).
        max_queued: calls that may wait for a worker; more raise ``WorkerPoolBusy``.
        queue_timeout: seconds a call may wait for a worker (``None``: as long as it takes).
        sink: where workers' output and logs go (a ``logging.Logger`` or Dagster's log).
        resilience: retries/breaker/rate limit for each call, with the policy ``service``.
        service: the name in errors, telemetry and the resilience policy.
    """

    def __init__(
        self,
        spec: WorkerSpec,
        *,
        size: int | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_calls_per_worker: int | None = None,
        max_queued: int = DEFAULT_MAX_QUEUED,
        queue_timeout: float | None = DEFAULT_QUEUE_TIMEOUT,
        sink: logging.Logger | None = None,
        resilience: ResilienceResource | None = None,
        service: str = "python_worker",
    ) -> None:
        size = default_pool_size() if size is None else size
        checks = [
            (size >= 1, "pool_size", "must be at least 1"),
            (timeout > 0, "timeout", "must be positive"),
            (
                max_calls_per_worker is None or max_calls_per_worker >= 1,
                "max_calls_per_worker",
                "must be at least 1 (or null: never recycle)",
            ),
            (max_queued >= 0, "max_queued", "must not be negative"),
            (queue_timeout is None or queue_timeout > 0, "queue_timeout", "must be positive"),
            (spec.start_timeout > 0, "start_timeout", "must be positive"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ConfigurationError(message, field=field, service=service)
        self.spec = spec
        self.size = size
        self.timeout = timeout
        self.max_calls_per_worker = max_calls_per_worker
        self.max_queued = max_queued
        self.queue_timeout = queue_timeout
        self.sink = sink
        self.resilience = resilience
        self.service = service
        self._path = resolve(resilience)  # the one resilience path (ONCE without a resource)
        self._cond = threading.Condition()
        self._workers: list[WorkerProcess | None] = [None] * size
        self._idle: deque[int] = deque()
        self._pending = 0  # calls admitted that do not hold a worker yet
        self._started = False
        self._closed = False
        self._executor: ThreadPoolExecutor | None = None

    def __repr__(self) -> str:
        return f"<WorkerPool size={self.size} python={self.spec.python!r} pids={self.pids()}>"

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- workers ------------------------------------------------------------------------------

    def _spawn(self) -> WorkerProcess:
        return WorkerProcess(self.spec, self.sink, service=self.service)

    def _start_locked(self) -> None:
        if self._started:
            return
        try:
            for index in range(self.size):
                self._workers[index] = self._spawn()
                self._idle.append(index)
        except BaseException:
            for worker in self._workers:
                if worker is not None:
                    worker.kill("failed_to_start")
            self._workers = [None] * self.size
            self._idle.clear()
            raise
        self._started = True

    def start(self, *, wait_ready: bool = True) -> None:
        """Start every worker now (the first call does it otherwise); optionally wait for all."""
        with self._cond:
            self._check_open()
            self._start_locked()
            workers = [w for w in self._workers if w is not None]
        if wait_ready:
            for worker in workers:
                if worker.alive:
                    worker.await_ready()

    def pids(self) -> list[int]:
        """Process ids of the live workers."""
        with self._cond:
            return [w.pid for w in self._workers if w is not None and w.alive]

    def _check_open(self) -> None:
        if self._closed:
            raise FlowstoneError(
                "the worker pool is closed (its resource was torn down); call it inside the "
                "step that owns it",
                service=self.service,
            )

    def _admit_locked(self) -> None:
        """Count a new call in, or refuse it when too many already wait."""
        if self._pending >= len(self._idle) + self.max_queued:
            raise WorkerPoolBusy(
                f"all {self.size} workers are busy and {self._pending - len(self._idle)} calls "
                f"already wait (max_queued={self.max_queued}); raise pool_size or max_queued, "
                "or submit fewer calls at once",
                service=self.service,
            )
        self._pending += 1

    def _acquire(
        self, *, admitted: bool, queued_since: float | None = None
    ) -> tuple[int, WorkerProcess, float]:
        """A free worker (its slot, itself, the seconds waited), waiting up to queue_timeout.

        ``queued_since`` (``time.monotonic()``): when a submitted call was queued; its wait
        counts from then, and a call that already waited ``queue_timeout`` fails even if a
        worker is free now (the limit is on the wait, whoever made it).
        """
        now = time.monotonic()
        queued_since = now if queued_since is None else queued_since
        limit = None
        if self.queue_timeout is not None:
            limit = max(self.queue_timeout - (now - queued_since), 0.0)
        with self._cond:
            try:
                self._check_open()
                self._start_locked()
                if not admitted:
                    self._admit_locked()
                admitted = True
                expired = limit == 0.0 and self.queue_timeout is not None
                if not expired and not self._idle:  # else the fast path: no waiting
                    expired = not self._cond.wait_for(
                        lambda: bool(self._idle) or self._closed, timeout=limit
                    )
                if expired:
                    raise CallTimeout(
                        f"no worker became free within {self.queue_timeout:g} s (all "
                        f"{self.size} busy); raise pool_size or queue_timeout",
                        timeout=self.queue_timeout,
                        service=self.service,
                    )
                self._check_open()
                index = self._idle.pop()  # the most recently used: its caches are warm
                worker = self._workers[index]
            finally:
                if admitted:
                    self._pending -= 1
        if worker is None:  # a replacement failed to start earlier: try again for this call
            try:
                worker = self._spawn()
            except BaseException:
                self._give_back(index, None)
                raise
        return index, worker, time.monotonic() - queued_since

    def _release(self, index: int, worker: WorkerProcess, *, damaged: bool = False) -> None:
        replacement: WorkerProcess | None = worker
        recycle = (
            self.max_calls_per_worker is not None and worker.calls >= self.max_calls_per_worker
        )
        if worker.alive and damaged:
            # Past its memory limit a native library failed half-way (threads it could not
            # start, a library it could not load): a fresh worker, not a crippled one.
            worker.stop("memory")
        elif worker.alive and recycle:
            worker.stop("recycled")
        if not worker.alive and not self._closed:
            try:
                replacement = self._spawn()  # boots while the failed call returns
            except Exception:
                logger.exception("could not start a replacement worker; the next call retries")
                replacement = None
        self._give_back(index, replacement)

    def _give_back(self, index: int, worker: WorkerProcess | None) -> None:
        with self._cond:
            if self._closed:
                if worker is not None:
                    worker.stop()
                self._workers[index] = None
                return
            self._workers[index] = worker
            self._idle.append(index)
            self._cond.notify()

    # -- calls --------------------------------------------------------------------------------

    def call(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        log: logging.Logger | None = None,
    ) -> Any:
        """``module.function(*args, **kwargs)`` in a worker; its return value.

        The worker's output during the call goes to ``log`` (a Dagster step's ``context.log``,
        say) instead of the pool's ``sink``.

        Raises ``PythonWorkerError`` (the function raised: remote type, message, traceback),
        ``CallTimeout`` (past ``timeout``; the worker was killed and replaced),
        ``WorkerCrashed`` (the worker died: exit code or signal), ``WorkerDataError`` (a value
        could not cross), ``WorkerPoolBusy`` (too many calls waiting), ``ConfigurationError``
        (a name that is not a dotted Python name, a bad timeout).
        """
        encoded = self._encode(module, function, args, kwargs)
        return self._call(encoded, timeout, admitted=False, log=log)

    def _encode(
        self,
        module: str,
        function: str,
        args: Sequence[Any],
        kwargs: Mapping[str, Any] | None,
    ) -> _Encoded:
        check_dotted_name(module, "module")
        check_dotted_name(function, "function")
        if isinstance(args, (str, bytes)) or not isinstance(args, Sequence):
            raise ConfigurationError(
                f"must be a tuple or list of positional arguments, got {type(args).__name__}",
                field="args",
            )
        if kwargs is not None and not isinstance(kwargs, Mapping):
            raise ConfigurationError(
                f"must be a dict of keyword arguments, got {type(kwargs).__name__}",
                field="kwargs",
            )
        encoded = _Encoded(module, function, args, kwargs or {})
        return encoded

    def _timeout_for(self, timeout: float | None) -> float:
        if timeout is not None and not timeout > 0:
            raise ConfigurationError(f"must be positive, got {timeout}", field="timeout")
        seconds = self.timeout if timeout is None else timeout
        deadline = current_deadline()  # a ResilienceResource policy's per-attempt timeout
        return min(seconds, deadline.remaining()) if deadline is not None else seconds

    def _call(
        self,
        encoded: _Encoded,
        timeout: float | None,
        *,
        admitted: bool,
        queued_since: float | None = None,
        log: logging.Logger | None = None,
    ) -> Any:
        self._timeout_for(timeout)  # a bad timeout fails before the call is counted
        span = telemetry.Span(
            "flowstone.worker.call",
            {
                "module": encoded.module,
                "function": encoded.function,
                "bytes_in": encoded.bytes_in,
                "buffers_in": encoded.buffers,
            },
        )

        attempts = 0

        def attempt() -> Any:
            nonlocal admitted, attempts
            attempts += 1
            span.attempts = attempts
            first, admitted = admitted, False  # a retry is a new call for the queue
            since = queued_since if attempts == 1 else None
            return self._call_once(
                encoded,
                self._timeout_for(timeout),
                span,
                admitted=first,
                queued_since=since,
                log=log,
            )

        # telemetry.span() would do; by hand it costs a few microseconds less per call.
        started = time.perf_counter()
        try:
            result = self._path.call(self.service, attempt, dagster_errors=False)
        except BaseException as exc:
            telemetry.emit(
                span.name,
                duration_s=time.perf_counter() - started,
                attempts=span.attempts,
                error=exc,
                **span.measures,
            )
            raise
        telemetry.emit(
            span.name,
            duration_s=time.perf_counter() - started,
            attempts=span.attempts,
            **span.measures,
        )
        return result

    def _call_once(
        self,
        encoded: _Encoded,
        timeout: float,
        span: telemetry.Span,
        *,
        admitted: bool,
        queued_since: float | None,
        log: logging.Logger | None,
    ) -> Any:
        index, worker, waited = self._acquire(admitted=admitted, queued_since=queued_since)
        span.set(pid=worker.pid, queue_ms=round(waited * 1000, 3))
        if log is not None:
            worker.output.sink = log  # this call's output goes to its step's log
        damaged = False
        try:
            frame = worker.request(encoded.parts, what=encoded.what, timeout=timeout)
            if frame.kind == wire.ERROR:
                damaged = _read_error(frame).get("memory_reason") in _DAMAGING_MEMORY_ERRORS
            if worker.output.has_output():  # the call's prints and logs, before its result
                worker.output.drain()
        finally:
            worker.output.sink = self.sink or fallback_logger
            self._release(index, worker, damaged=damaged)
        span.set(bytes_out=frame.size, buffers_out=len(frame.buffers))
        return self._decode(encoded, frame, worker.pid)

    def _decode(self, encoded: _Encoded, frame: wire.Frame, pid: int) -> Any:
        if frame.kind == wire.RESULT:
            try:
                return wire.loads(frame.payload, frame.buffers)
            except Exception as exc:
                raise WorkerDataError(
                    f"{encoded.what} returned a {frame.meta}, which cannot be loaded in this "
                    f"interpreter ({type(exc).__name__}: {exc}). Return plain data, or make the "
                    "type importable here with a compatible version (docs/python_worker.md, "
                    "'Data')",
                    direction="result",
                    path="result",
                    value_type=frame.meta,
                    service=self.service,
                ) from None
        error = _read_error(frame)
        stage, remote_type = error["stage"], error["type"]
        message, remote_traceback = error["message"], error["traceback"]
        if stage == wire.STAGE_ARGUMENTS:
            raise WorkerDataError(
                f"the worker (pid {pid}) could not load the arguments of {encoded.what}: "
                f"{remote_type}: {truncate(message)}. {_ARGUMENT_HELP}",
                direction="argument",
                service=self.service,
            )
        if stage == wire.STAGE_RESULT:
            path, value_type = error.get("path") or "result", error.get("value_type") or "?"
            raise WorkerDataError(
                f"{encoded.what} returned a value that cannot be sent back: {path} is a "
                f"{value_type} ({remote_type}: {truncate(message)}). Return plain data "
                "(builtins, dates, numpy arrays, pandas objects)",
                direction="result",
                path=path,
                value_type=value_type,
                service=self.service,
            )
        failure: PythonWorkerError
        if error.get("memory_limit_mb"):
            failure = WorkerMemoryExceeded(
                remote_type,
                truncate(message, 2000),
                remote_traceback,
                memory_limit_mb=int(error["memory_limit_mb"]),
                reason=str(error.get("memory_reason") or "allocation"),
                address_space_mb=_int_or_none(error.get("address_space_mb")),
                service=self.service,
            )
        else:
            failure = PythonWorkerError(
                remote_type, truncate(message, 2000), remote_traceback, service=self.service
            )
        if stage == wire.STAGE_IMPORT:
            failure.add_note(
                f"{encoded.what} could not be found in the worker (pid {pid}): add the directory "
                "that holds the module to `paths`, or install it in the worker's interpreter"
            )
        else:
            failure.add_note(f"raised by {encoded.what} in the worker (pid {pid})")
        failure.add_note(f"remote traceback:\n{remote_traceback.rstrip()}")
        raise failure

    # -- many calls ---------------------------------------------------------------------------

    def _executor_for_submit(self) -> ThreadPoolExecutor:
        with self._cond:
            self._check_open()
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.size, thread_name_prefix="flowstone-worker-call"
                )
            return self._executor

    def submit(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        log: logging.Logger | None = None,
    ) -> Future[Any]:
        """Queue a call; returns a ``concurrent.futures.Future`` of its result.

        The arguments are pickled now (later changes to them do not matter). Raises
        ``WorkerPoolBusy`` at once when ``max_queued`` calls already wait.
        """
        encoded = self._encode(module, function, args, kwargs)
        self._timeout_for(timeout)
        executor = self._executor_for_submit()
        with self._cond:
            self._start_locked()
            self._admit_locked()
        try:
            return executor.submit(
                self._call,
                encoded,
                timeout,
                admitted=True,
                queued_since=time.monotonic(),
                log=log,
            )
        except BaseException:
            with self._cond:
                self._pending -= 1
            raise

    def map(
        self,
        module: str,
        function: str,
        items: Iterable[Any],
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
        log: logging.Logger | None = None,
    ) -> list[Any]:
        """``[module.function(item, **kwargs) for item in items]``, spread over the workers.

        Results come back in order. Items are fed as workers free up (never more than twice the
        pool size in flight), so ``map`` over any number of items never hits ``max_queued``.
        Once a failure is seen, no further item is sent; the calls in flight finish and the
        failure of the earliest item is raised. With ``return_exceptions=True`` every item runs
        and a failed item's exception takes its place in the list.
        """
        executor = self._executor_for_submit()
        window = self.size * 2
        futures: list[Future[Any]] = []
        in_flight: set[Future[Any]] = set()
        failed = False
        try:
            for item in items:
                while len(in_flight) >= window and not failed:
                    done, in_flight = wait(in_flight, return_when=FIRST_COMPLETED)
                    failed = not return_exceptions and any(f.exception() for f in done)
                if failed:
                    break
                encoded = self._encode(module, function, (item,), kwargs)
                with self._cond:
                    self._check_open()
                    self._start_locked()
                    self._pending += 1  # map paces itself: not subject to max_queued
                future = executor.submit(self._call, encoded, timeout, admitted=True, log=log)
                futures.append(future)
                in_flight.add(future)
        finally:
            wait(futures)  # nothing keeps running behind an exception
        results: list[Any] = []
        for future in futures:
            error = future.exception()
            if error is not None and not return_exceptions:
                raise error
            results.append(error if error is not None else future.result())
        return results

    # -- shutdown -----------------------------------------------------------------------------

    def close(self) -> None:
        """Stop every worker (gracefully, then their process groups are killed). Idempotent.

        Calls still running finish first (each within its timeout); queued calls fail.
        """
        with self._cond:
            if self._closed:
                return
            self._closed = True
            idle = [self._workers[index] for index in self._idle]
            for index in self._idle:
                self._workers[index] = None
            self._idle.clear()
            self._cond.notify_all()
            executor, self._executor = self._executor, None
        for worker in idle:
            if worker is not None:
                worker.stop()
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)
        with self._cond:  # busy workers are stopped by _give_back as their calls end
            self._cond.wait_for(lambda: all(w is None for w in self._workers), timeout=None)


#: Memory errors after which a worker is replaced (a plain MemoryError leaves it sound).
_DAMAGING_MEMORY_ERRORS = frozenset({"thread", "map"})


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _read_error(frame: wire.Frame) -> dict[str, Any]:
    try:
        error = json.loads(bytes(frame.payload))
    except ValueError:
        error = {}
    error.setdefault("stage", wire.STAGE_CALL)
    error.setdefault("type", "UnknownError")
    error.setdefault("message", "")
    error.setdefault("traceback", "")
    return dict(error)
