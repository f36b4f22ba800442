"""The errors of the Python worker pool that the shared taxonomy has no class for.

Everything else a worker call raises is from :mod:`flowstone_dagster.errors`:
``PythonWorkerError`` (user code raised), ``CallTimeout`` (the call, or the wait for a free
worker, took too long) and ``WorkerCrashed`` (the worker process died).
"""

from __future__ import annotations

from flowstone_dagster.errors import DecodeError, PythonWorkerError, RateLimited

__all__ = ["WorkerDataError", "WorkerMemoryExceeded", "WorkerPoolBusy"]


class WorkerMemoryExceeded(PythonWorkerError):
    """The call went past the worker's memory limit (``memory_limit_mb``). Not retried.

    ``memory_limit_mb`` is the limit; ``reason`` is ``"allocation"`` (an allocation failed:
    ``MemoryError``), ``"map"`` (a shared library could not be loaded) or ``"thread"`` (a native
    library could not start a thread, the way OpenBLAS does when ``import numpy`` has too
    little address space; it then raises SIGINT, which Python reports as
    ``KeyboardInterrupt``); ``address_space_mb`` the worker's address space when it failed,
    where known. ``remote_type``, ``remote_message`` and ``remote_traceback`` are those of the
    error raised in the worker. Raise ``memory_limit_mb``
    (or use less memory per call).
    """

    def __init__(
        self,
        remote_type: str,
        remote_message: str,
        remote_traceback: str = "",
        *,
        memory_limit_mb: int,
        reason: str,
        address_space_mb: int | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(remote_type, remote_message, remote_traceback, service=service)
        if reason == "thread":
            what = "a native library could not start a thread"
        elif reason == "map":
            what = f"a shared library could not be loaded ({remote_type})"
        else:
            what = f"{remote_type}: {remote_message}".rstrip(": ")
        used = f", address space {address_space_mb} MB" if address_space_mb is not None else ""
        self.message = (
            f"worker exceeded its memory limit of {memory_limit_mb} MB (memory_limit_mb"
            f"{used}): {what}"
        )
        self.args = (self.message,)
        self.memory_limit_mb = memory_limit_mb
        self.reason = reason
        self.address_space_mb = address_space_mb


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
