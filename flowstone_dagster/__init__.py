"""flowstone-dagster: resilient, observable Dagster integrations for a pipeline's edges.

The public API is re-exported here::

    from flowstone_dagster import create_session, is_retryable, telemetry
"""

from flowstone_dagster import telemetry
from flowstone_dagster._version import __version__
from flowstone_dagster.errors import (
    CallTimeout,
    CircuitOpen,
    ConfigurationError,
    DbtFailed,
    DecodeError,
    ExternalServiceError,
    FlowstoneError,
    Forbidden,
    HTTPError,
    MaxAttemptsExceeded,
    NotFound,
    PartialFailure,
    PythonWorkerError,
    RateLimited,
    TransportError,
    Unauthorized,
    WorkerCrashed,
    is_retryable,
)
from flowstone_dagster.http import HttpSession, create_session

__all__ = [
    "CallTimeout",
    "CircuitOpen",
    "ConfigurationError",
    "DbtFailed",
    "DecodeError",
    "ExternalServiceError",
    "FlowstoneError",
    "Forbidden",
    "HTTPError",
    "HttpSession",
    "MaxAttemptsExceeded",
    "NotFound",
    "PartialFailure",
    "PythonWorkerError",
    "RateLimited",
    "TransportError",
    "Unauthorized",
    "WorkerCrashed",
    "__version__",
    "create_session",
    "is_retryable",
    "telemetry",
]
