"""Dagster resources: LLMs, Python workers, dbt and notifications."""

from flowstone_dagster.resources.dbt import (
    DbtOptions,
    DbtResource,
    DbtResult,
    DbtSettings,
    stream_dbt,
)
from flowstone_dagster.resources.dbt_artifacts import DbtNodeResult
from flowstone_dagster.resources.dbt_errors import (
    DbtExecutableNotFound,
    DbtNothingSelected,
    DbtProfileNotFound,
    DbtProjectNotFound,
    DbtWarehouseUnreachable,
)
from flowstone_dagster.resources.dbt_output import DbtOutputSummary, parse_dbt_output
from flowstone_dagster.resources.llm import (
    InvalidJSON,
    LLMClient,
    LLMResource,
    LLMResponse,
    LLMStream,
    StreamInterrupted,
    Usage,
)
from flowstone_dagster.resources.notifications import NotificationsResource
from flowstone_dagster.resources.python_worker import PythonWorkerResource
from flowstone_dagster.resources.python_worker_errors import WorkerDataError, WorkerPoolBusy
from flowstone_dagster.resources.python_worker_pool import WorkerPool
from flowstone_dagster.resources.python_worker_process import WorkerSpec

__all__ = [
    "DbtExecutableNotFound",
    "DbtNodeResult",
    "DbtNothingSelected",
    "DbtOptions",
    "DbtOutputSummary",
    "DbtProfileNotFound",
    "DbtProjectNotFound",
    "DbtResource",
    "DbtResult",
    "DbtSettings",
    "DbtWarehouseUnreachable",
    "InvalidJSON",
    "LLMClient",
    "LLMResource",
    "LLMResponse",
    "LLMStream",
    "NotificationsResource",
    "PythonWorkerResource",
    "StreamInterrupted",
    "Usage",
    "WorkerDataError",
    "WorkerPool",
    "WorkerPoolBusy",
    "WorkerSpec",
    "parse_dbt_output",
    "stream_dbt",
]
