"""flowstone-dagster: resilient, observable Dagster integrations for a pipeline's edges.

Everything a user needs is importable from here, and this is the one canonical path used in
the docs::

    from flowstone_dagster import (
        ResilienceResource, ServicePolicy, RetryConfig, RestIOManager, LLMResource,
    )

Each integration is a subpackage (``resilience``, ``rest``, ``llm``, ``python_worker``,
``dbt``, ``notifications``, ``external_db``) over the shared ``errors``, ``http``,
``telemetry`` and ``redaction`` modules; their lower-level pieces stay importable from there.
``flowstone_dagster_tests/test_exported_members.py`` pins this surface.
"""

import typing as _typing

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
    RedirectRefused,
    ResponseTooLarge,
    StoreUnavailable,
    TransportError,
    Unauthorized,
    WorkerCrashed,
    is_retryable,
)
from flowstone_dagster.external_db import (
    ConstraintViolation,
    DatabaseError,
    ExternalDB,
    ExternalDBIOManager,
    ExternalDBResource,
    InvalidValue,
    PostgresConfig,
    SchemaMismatch,
    SQLiteConfig,
)
from flowstone_dagster.http import HttpSession, create_session
from flowstone_dagster.python_worker import (
    PythonWorkerResource,
    WorkerDataError,
    WorkerMemoryExceeded,
    WorkerPool,
    WorkerPoolBusy,
)
from flowstone_dagster.redaction import register_secret
from flowstone_dagster.resilience import (
    RECOMMENDED_RETRY_POLICY,
    BulkheadFull,
    CircuitBreaker,
    CircuitBreakerConfig,
    RateLimitConfig,
    RateLimiter,
    RateLimitExceeded,
    RateWindow,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    to_dagster_error,
    with_circuit_breaker,
    with_retry,
    with_timeout,
)
from flowstone_dagster.rest import (
    ApiKeyAuth,
    BasicAuth,
    BearerAuth,
    NoAuth,
    OAuth2ClientCredentials,
    RestClient,
    RestIOManager,
)
from flowstone_dagster.rest.pagination import (
    CursorPagination,
    HeaderCursorPagination,
    JsonLinkPagination,
    LinkPagination,
    NoPagination,
    OffsetPagination,
    PageNumberPagination,
)

if _typing.TYPE_CHECKING:  # imported on first use (below): each needs its extra
    from flowstone_dagster.dbt import (
        DbtExecutableNotFound,
        DbtNothingSelected,
        DbtProfileNotFound,
        DbtProjectNotFound,
        DbtResource,
        DbtResult,
        DbtTransientFailure,
        DbtWarehouseRejected,
        DbtWarehouseUnreachable,
        parse_dbt_output,
        stream_dbt,
    )
    from flowstone_dagster.llm import (
        BatchPending,
        BatchResult,
        BudgetExceeded,
        InvalidJSON,
        InvalidOutput,
        LLMClient,
        LLMFallback,
        LLMResource,
        LLMResponse,
        StreamInterrupted,
        ToolCall,
        ToolLoopExceeded,
        ToolRun,
        Usage,
        tool_result,
    )
    from flowstone_dagster.notifications import (
        AllChannelsFailed,
        EmailConfig,
        NotificationsResource,
        SlackApiRejected,
        SlackWebhookConfig,
        SmtpRejected,
        format_email_body,
        format_slack_message,
        make_notification_sensor,
    )

#: Names of integrations whose dependencies are an extra: imported on first use, so that
#: ``import flowstone_dagster`` needs only the core (dagster, requests, backoff).
_OPTIONAL: dict[str, tuple[str, str]] = {
    "AllChannelsFailed": ("flowstone_dagster.notifications", "slack"),
    "DbtExecutableNotFound": ("flowstone_dagster.dbt", "dbt"),
    "DbtNothingSelected": ("flowstone_dagster.dbt", "dbt"),
    "DbtProfileNotFound": ("flowstone_dagster.dbt", "dbt"),
    "DbtProjectNotFound": ("flowstone_dagster.dbt", "dbt"),
    "DbtResource": ("flowstone_dagster.dbt", "dbt"),
    "DbtResult": ("flowstone_dagster.dbt", "dbt"),
    "DbtTransientFailure": ("flowstone_dagster.dbt", "dbt"),
    "DbtWarehouseRejected": ("flowstone_dagster.dbt", "dbt"),
    "DbtWarehouseUnreachable": ("flowstone_dagster.dbt", "dbt"),
    "EmailConfig": ("flowstone_dagster.notifications", "slack"),
    "BatchPending": ("flowstone_dagster.llm", "llm"),
    "BatchResult": ("flowstone_dagster.llm", "llm"),
    "BudgetExceeded": ("flowstone_dagster.llm", "llm"),
    "InvalidOutput": ("flowstone_dagster.llm", "llm"),
    "LLMFallback": ("flowstone_dagster.llm", "llm"),
    "ToolCall": ("flowstone_dagster.llm", "llm"),
    "ToolLoopExceeded": ("flowstone_dagster.llm", "llm"),
    "ToolRun": ("flowstone_dagster.llm", "llm"),
    "tool_result": ("flowstone_dagster.llm", "llm"),
    "InvalidJSON": ("flowstone_dagster.llm", "llm"),
    "LLMClient": ("flowstone_dagster.llm", "llm"),
    "LLMResource": ("flowstone_dagster.llm", "llm"),
    "LLMResponse": ("flowstone_dagster.llm", "llm"),
    "NotificationsResource": ("flowstone_dagster.notifications", "slack"),
    "SlackApiRejected": ("flowstone_dagster.notifications", "slack"),
    "SlackWebhookConfig": ("flowstone_dagster.notifications", "slack"),
    "SmtpRejected": ("flowstone_dagster.notifications", "slack"),
    "StreamInterrupted": ("flowstone_dagster.llm", "llm"),
    "Usage": ("flowstone_dagster.llm", "llm"),
    "format_email_body": ("flowstone_dagster.notifications", "slack"),
    "format_slack_message": ("flowstone_dagster.notifications", "slack"),
    "make_notification_sensor": ("flowstone_dagster.notifications", "slack"),
    "parse_dbt_output": ("flowstone_dagster.dbt", "dbt"),
    "stream_dbt": ("flowstone_dagster.dbt", "dbt"),
}


def __getattr__(name: str) -> _typing.Any:
    """Import an optional integration's name on first use, naming the extra it needs."""
    if name not in _OPTIONAL:
        raise AttributeError(f"module 'flowstone_dagster' has no attribute {name!r}")
    module_name, extra = _OPTIONAL[name]
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ImportError(
            f"flowstone_dagster.{name} needs the [{extra}] extra: "
            f"pip install 'flowstone-dagster[{extra}]' ({exc})"
        ) from exc
    value = getattr(module, name)
    globals()[name] = value
    return value


__all__ = [
    # LLM tools, structured output, fallbacks, budgets and batches (flowstone_dagster.llm)
    "BatchPending",
    "BatchResult",
    "BudgetExceeded",
    "InvalidOutput",
    "LLMFallback",
    "ToolCall",
    "ToolLoopExceeded",
    "ToolRun",
    "tool_result",
    # REST pagination kinds (flowstone_dagster.rest.pagination) and OAuth2 auth
    "OAuth2ClientCredentials",
    "CursorPagination",
    "HeaderCursorPagination",
    "JsonLinkPagination",
    "LinkPagination",
    "NoPagination",
    "OffsetPagination",
    "PageNumberPagination",
    "RECOMMENDED_RETRY_POLICY",
    "AllChannelsFailed",
    "BulkheadFull",
    "ApiKeyAuth",
    "BasicAuth",
    "BearerAuth",
    "CallTimeout",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpen",
    "ConfigurationError",
    "ConstraintViolation",
    "DatabaseError",
    "DbtExecutableNotFound",
    "DbtFailed",
    "DbtNothingSelected",
    "DbtProfileNotFound",
    "DbtProjectNotFound",
    "DbtResource",
    "DbtResult",
    "DbtTransientFailure",
    "DbtWarehouseRejected",
    "DbtWarehouseUnreachable",
    "DecodeError",
    "EmailConfig",
    "ExternalDB",
    "ExternalDBIOManager",
    "ExternalDBResource",
    "ExternalServiceError",
    "FlowstoneError",
    "Forbidden",
    "HTTPError",
    "HttpSession",
    "InvalidJSON",
    "InvalidValue",
    "LLMClient",
    "LLMResource",
    "LLMResponse",
    "MaxAttemptsExceeded",
    "NoAuth",
    "NotFound",
    "NotificationsResource",
    "PartialFailure",
    "PostgresConfig",
    "PythonWorkerError",
    "PythonWorkerResource",
    "RateLimitConfig",
    "RateLimitExceeded",
    "RateLimited",
    "RateLimiter",
    "RateWindow",
    "RedirectRefused",
    "ResilienceResource",
    "ResponseTooLarge",
    "RestClient",
    "RestIOManager",
    "RetryConfig",
    "SQLiteConfig",
    "SchemaMismatch",
    "ServicePolicy",
    "SlackApiRejected",
    "SlackWebhookConfig",
    "SmtpRejected",
    "StoreUnavailable",
    "StreamInterrupted",
    "TransportError",
    "Unauthorized",
    "Usage",
    "WorkerCrashed",
    "WorkerDataError",
    "WorkerMemoryExceeded",
    "WorkerPool",
    "WorkerPoolBusy",
    "__version__",
    "create_session",
    "format_email_body",
    "format_slack_message",
    "is_retryable",
    "make_notification_sensor",
    "parse_dbt_output",
    "register_secret",
    "stream_dbt",
    "telemetry",
    "to_dagster_error",
    "with_circuit_breaker",
    "with_retry",
    "with_timeout",
]
