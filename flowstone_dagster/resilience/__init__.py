"""How flowstone-dagster survives failing or slow external systems.

::

    from flowstone_dagster.resilience import (
        CircuitBreaker, RateLimiter, ResilienceResource, with_circuit_breaker, with_retry,
    )

    rows = with_retry(lambda: api.get("/orders"), max_attempts=5, base_delay=0.2)
    rows = with_circuit_breaker("orders-api", lambda: api.get("/orders"), threshold=5)
    with RateLimiter("orders-api", limit=10, period=1.0):
        api.get("/orders")

- :mod:`.retry`: :func:`with_retry` (exponential backoff on ``backoff``; only what
  :func:`~flowstone_dagster.errors.is_retryable` accepts) and :func:`backoff_delays`;
- :mod:`.breaker`: :class:`CircuitBreaker`, :func:`with_circuit_breaker`, :func:`state`,
  :func:`reset`;
- :mod:`.limiter`: :class:`RateLimiter` (sliding window, exact across processes);
- :mod:`.bulkhead`: :class:`Bulkhead` (at most N calls at once, as expiring leases);
- :mod:`.stores`: where breaker, limiter and bulkhead state is shared (:func:`open_store`:
  SQLite, PostgreSQL, Redis, memory);
- :mod:`.timeouts`: :class:`Deadline`, :func:`deadline_scope`, :func:`with_timeout`;
- :mod:`.config`: :class:`ServicePolicy` and its parts (retry, breaker, rate limit, bulkhead,
  timeout, ``on_store_error``);
- :mod:`.resource`: :class:`ResilienceResource` (policies per service) and :func:`resolve`;
  :mod:`.call`: one guarded call;
- :mod:`.dagster_mapping`: the one mapping to Dagster (:func:`to_dagster_error`,
  :func:`dagster_retries`, :data:`RECOMMENDED_RETRY_POLICY`).

The full guide is ``docs/resilience.md``.
"""

from flowstone_dagster.resilience.admission import Admission, current_admission
from flowstone_dagster.resilience.breaker import (
    BreakerStatus,
    CircuitBreaker,
    classify,
    reset,
    state,
    with_circuit_breaker,
)
from flowstone_dagster.resilience.bulkhead import Bulkhead, BulkheadFull
from flowstone_dagster.resilience.config import (
    ONCE,
    CircuitBreakerConfig,
    OnStoreError,
    RateLimitConfig,
    RateWindow,
    RetryConfig,
    ServicePolicy,
)
from flowstone_dagster.resilience.dagster_mapping import (
    RECOMMENDED_RETRY_POLICY,
    dagster_retries,
    to_dagster_error,
)
from flowstone_dagster.resilience.limiter import RateLimiter, RateLimitExceeded
from flowstone_dagster.resilience.resource import ResilienceResource, resolve
from flowstone_dagster.resilience.retry import backoff_delays, with_retry
from flowstone_dagster.resilience.stores import (
    BreakerRecord,
    MemoryStore,
    PostgresStore,
    RedisStore,
    Reservation,
    SQLiteStore,
    StateStore,
    check_store_url,
    close_stores,
    default_store_url,
    open_store,
)
from flowstone_dagster.resilience.timeouts import (
    Deadline,
    current_deadline,
    deadline_scope,
    with_timeout,
)

__all__ = [
    "ONCE",
    "Admission",
    "RECOMMENDED_RETRY_POLICY",
    "BreakerRecord",
    "BreakerStatus",
    "Bulkhead",
    "BulkheadFull",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "Deadline",
    "MemoryStore",
    "OnStoreError",
    "PostgresStore",
    "RedisStore",
    "RateLimitConfig",
    "RateLimitExceeded",
    "RateLimiter",
    "RateWindow",
    "Reservation",
    "ResilienceResource",
    "RetryConfig",
    "SQLiteStore",
    "ServicePolicy",
    "StateStore",
    "backoff_delays",
    "check_store_url",
    "classify",
    "close_stores",
    "current_admission",
    "current_deadline",
    "dagster_retries",
    "deadline_scope",
    "default_store_url",
    "open_store",
    "reset",
    "resolve",
    "state",
    "to_dagster_error",
    "with_circuit_breaker",
    "with_retry",
    "with_timeout",
]
