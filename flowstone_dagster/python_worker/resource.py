"""``PythonWorkerResource``: call Python functions in warm, isolated, killable worker processes.

::

    import dagster as dg
    from flowstone_dagster.python_worker.resource import PythonWorkerResource

    @dg.asset
    def scores(workers: PythonWorkerResource) -> list[int]:
        model_path = workers.call("scoring", "train", ("/data/iris.parquet",))
        return workers.map("scoring", "predict", batches, kwargs={"model_path": model_path})

    defs = dg.Definitions(
        assets=[scores],
        resources={"workers": PythonWorkerResource(
            python="/opt/ml-venv/bin/python",      # another virtualenv, its own package versions
            paths=["/srv/ml-code"],                # where `scoring` lives
            pool_size=2,
            timeout=120,
        )},
    )

A segfault, hang or memory blow-up in the called code costs that call (``WorkerCrashed``,
``CallTimeout``, ``WorkerMemoryExceeded`` past ``memory_limit_mb``, 4096 MB per worker by
default), not the Dagster step; a model loaded at module level, or cached by the module,
stays warm across calls. The pool starts on the first call, lives for the step (the resource's
``setup_for_execution`` / ``teardown_after_execution``) and is shut down with it: no worker
outlives the step. The workers' stdout, stderr and ``logging`` go to the step's log, tagged with
the worker's pid. The details are in ``docs/python_worker.md``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future
from typing import Any, Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.python_worker.errors import (
    WorkerDataError,
    WorkerMemoryExceeded,
    WorkerPoolBusy,
)
from flowstone_dagster.python_worker.pool import (
    DEFAULT_MAX_QUEUED,
    DEFAULT_QUEUE_TIMEOUT,
    DEFAULT_TIMEOUT,
    WorkerPool,
)
from flowstone_dagster.python_worker.process import DEFAULT_MEMORY_LIMIT_MB, WorkerSpec
from flowstone_dagster.resilience import ResilienceResource, resolve

__all__ = [
    "PythonWorkerResource",
    "WorkerDataError",
    "WorkerMemoryExceeded",
    "WorkerPool",
    "WorkerPoolBusy",
]

LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class PythonWorkerResource(dg.ConfigurableResource):
    """A pool of Python worker processes for the step: ``call``, ``submit`` and ``map``.

    ``call(module, function, args, kwargs, timeout=...)`` returns the function's result or
    raises ``PythonWorkerError`` (remote type, message, traceback), ``CallTimeout`` (the worker
    was killed and replaced), ``WorkerCrashed`` (exit code or signal), ``WorkerDataError`` (a
    value could not cross), ``WorkerMemoryExceeded`` (past ``memory_limit_mb``) or
    ``WorkerPoolBusy``. Every call goes through ``resolve(resilience)``: the ``service`` policy
    of the resilience resource (``WorkerCrashed`` and ``CallTimeout`` are retryable) or, without
    one, one attempt. What escapes ``call`` and ``map`` becomes Dagster control flow
    (``Failure``, ``RetryRequested``; the error is its ``__cause__``) by the one mapping,
    ``ResilienceResource.dagster_error``, when the resilience resource's ``dagster_errors`` is
    on: the default, also with no ``resilience`` configured. Per call: ``dagster_errors=``.
    """

    python: str | None = Field(
        default=None,
        description="Interpreter that runs the workers: the `python` of another virtualenv, for "
        "instance. Python 3.8+. Null: the interpreter running Dagster.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Directories put first on the workers' module search path (sys.path).",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        repr=False,
        description="Environment variables set for the workers (on top of Dagster's own unless "
        "inherit_env is false). Values are never logged.",
    )
    inherit_env: bool = Field(
        default=True, description="Start the workers with this process's environment plus `env`."
    )
    cwd: str | None = Field(default=None, description="Working directory of the workers.")
    pool_size: int | None = Field(
        default=None,
        ge=1,
        description="Worker processes (one call each at a time). Null: the CPUs this process "
        "may use.",
    )
    timeout: float = Field(
        default=DEFAULT_TIMEOUT,
        gt=0,
        description="Seconds a call may run (300 by default); past it the worker and its child "
        "processes are killed and the call raises CallTimeout. Per call: call(..., timeout=).",
    )
    start_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a worker may take to start (interpreter boot)."
    )
    max_calls_per_worker: int | None = Field(
        default=None,
        ge=1,
        description="Replace a worker after this many calls (frees leaked memory; warm caches "
        "are lost). Null: never.",
    )
    max_queued: int = Field(
        default=DEFAULT_MAX_QUEUED,
        ge=0,
        description="Calls that may wait while every worker is busy; one more raises "
        "WorkerPoolBusy at once. map() paces itself and never hits it.",
    )
    queue_timeout: float | None = Field(
        default=DEFAULT_QUEUE_TIMEOUT,
        gt=0,
        description="Seconds a call may wait for a free worker before CallTimeout (600 by "
        "default). Null: no limit.",
    )
    memory_limit_mb: int | None = Field(
        default=DEFAULT_MEMORY_LIMIT_MB,
        ge=1,
        description="Address-space limit per worker (RLIMIT_AS), in MiB (4096 by default): a "
        "blow-up fails the call with WorkerMemoryExceeded ('worker exceeded its memory limit of "
        "N MB') instead of waking the OOM killer. Thread stacks and malloc arenas count, so a "
        "library starting many threads needs room. Null: no limit.",
    )
    log_level: LogLevel = Field(
        default="INFO", description="Level of the workers' root logger (their logging records)."
    )
    resilience: ResilienceResource | None = Field(
        default=None,
        description="Retry/breaker/rate-limit policy for each call (policy `service`), and "
        "whether errors become Dagster control flow (its dagster_errors). Null: each call is "
        "made exactly once, errors mapped to Dagster.",
    )
    service: str = Field(
        default="python_worker",
        description="Service name in errors, telemetry and the resilience policy.",
    )

    _pool: WorkerPool | None = PrivateAttr(default=None)
    _log: Any = PrivateAttr(default=None)

    # -- life cycle ---------------------------------------------------------------------------

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Check the configuration (naming the field); the workers start on the first call."""
        self._log = context.log
        self._pool = self._new_pool()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        """Stop every worker of the step."""
        self.close()

    def close(self) -> None:
        """Stop every worker (outside Dagster, call it when done). Idempotent."""
        if self._pool is not None:
            self._pool.close()
            self._pool = None

    def spec(self) -> WorkerSpec:
        """How workers are started, from the configuration (validated)."""
        python = self.python or sys.executable
        is_path = os.sep in python or bool(os.altsep and os.altsep in python)
        if is_path and not (os.path.isfile(python) and os.access(python, os.X_OK)):
            raise ConfigurationError(
                f"{python!r} is not an executable file; give the path of a Python 3.8+ "
                "interpreter (for a virtualenv: <venv>/bin/python)",
                field="python",
                service=self.service,
            )
        for path in self.paths:
            if not os.path.isdir(path):
                raise ConfigurationError(
                    f"{path!r} is not a directory", field="paths", service=self.service
                )
        if self.cwd is not None and not os.path.isdir(self.cwd):
            raise ConfigurationError(
                f"{self.cwd!r} is not a directory", field="cwd", service=self.service
            )
        env = {**os.environ, **self.env} if self.inherit_env else dict(self.env)
        return WorkerSpec(
            python=python,
            paths=tuple(os.path.abspath(path) for path in self.paths),
            env=env,
            cwd=self.cwd,
            log_level=self.log_level,
            memory_limit_mb=self.memory_limit_mb,
            start_timeout=self.start_timeout,
        )

    def _new_pool(self) -> WorkerPool:
        return WorkerPool(
            self.spec(),
            size=self.pool_size,
            timeout=self.timeout,
            max_calls_per_worker=self.max_calls_per_worker,
            max_queued=self.max_queued,
            queue_timeout=self.queue_timeout,
            sink=self._log,
            resilience=self.resilience,
            service=self.service,
        )

    @property
    def pool(self) -> WorkerPool:
        """The step's pool (created on first use outside Dagster too)."""
        # Read through the private-attribute dict: pydantic's __getattr__ costs about 1 us a
        # read, on every call (measured).
        private: dict[str, Any] = self.__pydantic_private__  # type: ignore[assignment]
        pool = private["_pool"]
        if pool is None:
            pool = private["_pool"] = self._new_pool()
        return pool

    # -- calls --------------------------------------------------------------------------------

    def _step_log(self) -> Any:
        """The running step's log (so that worker output lands in that step), else the
        resource's (Dagster's run log), else ``None`` (Python logging)."""
        try:
            return dg.OpExecutionContext.get().log
        except dg.DagsterInvariantViolationError:  # not inside an op or asset
            return self._log

    def _mapped(self, exc: Exception, dagster_errors: bool | None) -> BaseException:
        """``exc`` as Dagster control flow by the one mapping, when errors are mapped (the
        call's ``dagster_errors``, else the resilience resource's), else ``exc``."""
        resilience = resolve(self.resilience)
        to_dagster = resilience.dagster_errors if dagster_errors is None else dagster_errors
        if not to_dagster:
            return exc
        return resilience.dagster_error(exc, service=self.service)

    def call(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
        dagster_errors: bool | None = None,
    ) -> Any:
        """``module.function(*args, **kwargs)`` in a worker; returns its result.

        ::

            workers.call("test_module", "add", (2, 3))          # 5

        ``timeout`` overrides the configured one for this call. ``dagster_errors`` (default:
        the resilience resource's ``dagster_errors``, on, also without ``resilience``) turns
        what escapes into ``Failure`` / ``RetryRequested`` whose ``__cause__`` is the error
        (redacted); off, the taxonomy errors propagate as they are.
        """
        try:
            return self.pool.call(
                module, function, args, kwargs, timeout=timeout, log=self._step_log()
            )
        except Exception as exc:
            mapped = self._mapped(exc, dagster_errors)
            if mapped is exc:
                raise
            raise mapped  # noqa: B904 - the mapped error carries its own (redacted) cause

    def submit(
        self,
        module: str,
        function: str,
        args: Sequence[Any] = (),
        kwargs: Mapping[str, Any] | None = None,
        *,
        timeout: float | None = None,
    ) -> Future[Any]:
        """Queue a call; a ``concurrent.futures.Future`` of its result (taxonomy errors)."""
        return self.pool.submit(
            module, function, args, kwargs, timeout=timeout, log=self._step_log()
        )

    def map(
        self,
        module: str,
        function: str,
        items: Iterable[Any],
        *,
        kwargs: Mapping[str, Any] | None = None,
        timeout: float | None = None,
        return_exceptions: bool = False,
        dagster_errors: bool | None = None,
    ) -> list[Any]:
        """``[module.function(item, **kwargs) for item in items]`` across the pool, in order.

        ::

            workers.map("scoring", "predict", batches, kwargs={"model_path": path})
        """
        try:
            return self.pool.map(
                module,
                function,
                items,
                kwargs=kwargs,
                timeout=timeout,
                return_exceptions=return_exceptions,
                log=self._step_log(),
            )
        except Exception as exc:
            mapped = self._mapped(exc, dagster_errors)
            if mapped is exc:
                raise
            raise mapped  # noqa: B904 - the mapped error carries its own (redacted) cause

    def start(self) -> list[int]:
        """Start every worker now and wait until they are ready; their pids.

        Optional: the first call starts the pool. Useful to pay the start-up before timing.
        """
        self.pool.start(wait_ready=True)
        return self.pool.pids()
