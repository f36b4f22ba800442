"""flowstone-dagster: resilient, observable Dagster integrations for a pipeline's edges.

The public API is re-exported here::

    from flowstone_dagster import RestIOManager, ResilienceResource, create_session, telemetry
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
    ResponseTooLarge,
    TransportError,
    Unauthorized,
    WorkerCrashed,
    is_retryable,
)
from flowstone_dagster.http import HttpSession, create_session
from flowstone_dagster.io_managers import ExternalDB, ExternalDBIOManager, RestClient, RestIOManager
from flowstone_dagster.notifications import (
    AllChannelsFailed,
    EmailConfig,
    NotificationsResource,
    SlackWebhookConfig,
    format_email_body,
    format_slack_message,
)
from flowstone_dagster.resilience import (
    RECOMMENDED_RETRY_POLICY,
    CircuitBreaker,
    RateLimiter,
    ResilienceResource,
    with_circuit_breaker,
    with_retry,
    with_timeout,
)
from flowstone_dagster.resources import (
    DbtResource,
    DbtResult,
    LLMClient,
    LLMResource,
    LLMResponse,
    PythonWorkerResource,
    WorkerDataError,
    WorkerPoolBusy,
    parse_dbt_output,
    stream_dbt,
)
from flowstone_dagster.sensors import make_notification_sensor

__all__ = [
    "AllChannelsFailed",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitOpen",
    "ConfigurationError",
    "DbtFailed",
    "DbtResource",
    "DbtResult",
    "DecodeError",
    "EmailConfig",
    "ExternalDB",
    "ExternalDBIOManager",
    "ExternalServiceError",
    "FlowstoneError",
    "Forbidden",
    "HTTPError",
    "HttpSession",
    "LLMClient",
    "LLMResource",
    "LLMResponse",
    "MaxAttemptsExceeded",
    "NotFound",
    "NotificationsResource",
    "PartialFailure",
    "PythonWorkerError",
    "PythonWorkerResource",
    "RECOMMENDED_RETRY_POLICY",
    "RateLimited",
    "RateLimiter",
    "ResilienceResource",
    "ResponseTooLarge",
    "RestClient",
    "RestIOManager",
    "SlackWebhookConfig",
    "TransportError",
    "Unauthorized",
    "WorkerCrashed",
    "WorkerDataError",
    "WorkerPoolBusy",
    "__version__",
    "create_session",
    "format_email_body",
    "format_slack_message",
    "is_retryable",
    "make_notification_sensor",
    "parse_dbt_output",
    "stream_dbt",
    "telemetry",
    "with_circuit_breaker",
    "with_retry",
    "with_timeout",
]
