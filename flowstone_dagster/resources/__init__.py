"""Dagster resources: LLMs, Python workers, dbt and notifications."""

from flowstone_dagster.resources.notifications import NotificationsResource
from flowstone_dagster.resources.python_worker import PythonWorkerResource
from flowstone_dagster.resources.python_worker_errors import WorkerDataError, WorkerPoolBusy
from flowstone_dagster.resources.python_worker_pool import WorkerPool
from flowstone_dagster.resources.python_worker_process import WorkerSpec

__all__ = [
    "NotificationsResource",
    "PythonWorkerResource",
    "WorkerDataError",
    "WorkerPool",
    "WorkerPoolBusy",
    "WorkerSpec",
]
