"""The two errors of the Python worker pool that the shared taxonomy has no class for.

Everything else a worker call raises is from :mod:`flowstone_dagster.errors`:
``PythonWorkerError`` (user code raised), ``CallTimeout`` (the call, or the wait for a free
worker, took too long) and ``WorkerCrashed`` (the worker process died).
"""

from __future__ import annotations

from flowstone_dagster.errors import DecodeError, RateLimited

__all__ = ["WorkerDataError", "WorkerPoolBusy"]


class WorkerDataError(DecodeError):
    """A value could not cross between the step and a worker. Never retried.

    ``direction`` is ``"argument"`` or ``"result"``, ``path`` where in the value the problem is
    (``args[0]['model']``), ``value_type`` the type that could not be sent or loaded. Send plain
    data (builtins, numpy, pandas) instead, or make sure both interpreters can import the type
    with compatible versions (``docs/python_worker.md``, "Data").
    """

    def __init__(
        self,
        message: str,
        *,
        direction: str,
        path: str | None = None,
        value_type: str | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, fmt="pickle", service=service)
        self.direction = direction
        self.path = path
        self.value_type = value_type


class WorkerPoolBusy(RateLimited):
    """Every worker is busy and ``max_queued`` calls already wait: the call was refused.

    Retryable (after a back-off, or by a ``ResilienceResource`` policy). Raise ``pool_size`` or
    ``max_queued``, or submit fewer calls at once (``map`` feeds the pool at its own pace).
    """
