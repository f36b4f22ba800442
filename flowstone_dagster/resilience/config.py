"""How calls to one service are protected: the policy and its parts, as Dagster config.

Constraints are declared on the fields (pydantic), so a bad value fails where it is written,
naming the field, in Python and in run config alike.
"""

from __future__ import annotations

from typing import Any, Literal

import dagster as dg
from pydantic import Field, field_validator, model_validator

from flowstone_dagster.resilience.bulkhead import DEFAULT_LEASE_SECONDS

__all__ = [
    "ONCE",
    "CircuitBreakerConfig",
    "OnStoreError",
    "RateLimitConfig",
    "RateWindow",
    "RetryConfig",
    "ServicePolicy",
]


class RetryConfig(dg.Config):
    """Call-level retries (each attempt passes the breaker and the limiter again)."""

    max_attempts: int = Field(
        default=3, ge=1, description="Attempts per call, the first included (1 = no retries)."
    )
    base_delay: float = Field(
        default=0.5, ge=0, description="Wait before the 2nd attempt, in seconds; doubles each time."
    )
    max_delay: float = Field(
        default=10.0,
        ge=0,
        description="Cap on one wait, in seconds. A server asking to wait longer (Retry-After) "
        "ends the call's retries, so that Dagster retries the step later instead.",
    )
    deadline: float | None = Field(
        default=60.0,
        gt=0,
        description="Seconds after the call began by which any new attempt must have started: "
        "no retry starts, and no wait (backoff, rate limit, store lock) lasts, past it. It never "
        "cuts a running attempt short; that is the policy's `timeout`. Null: bounded by "
        "attempts only.",
    )
    jitter: float = Field(
        default=1.0,
        ge=0,
        description="Random extra wait, up to this fraction of each exponential delay "
        "(it only ever adds). 0 disables it.",
    )

    @model_validator(mode="after")
    def _max_delay_covers_base_delay(self) -> RetryConfig:
        if self.max_delay < self.base_delay:
            raise ValueError(
                f"max_delay ({self.max_delay:g}) must be at least base_delay ({self.base_delay:g})"
            )
        return self


class CircuitBreakerConfig(dg.Config):
    """A circuit breaker named after the service, shared by every process using the store."""

    threshold: int = Field(
        default=5, ge=1, description="Consecutive failures that open the circuit."
    )
    timeout: float = Field(
        default=30.0,
        ge=0,
        description="Seconds the circuit stays open before one probe call is let through.",
    )
    probe_lease: float = Field(
        default=60.0,
        gt=0,
        description="Seconds a probe may run before another caller may probe (covers a crashed "
        "prober); set it above the call's timeout plus the limiter's max_wait.",
    )


class RateWindow(dg.Config):
    """One rate: at most ``limit`` units in any ``period`` seconds."""

    limit: float = Field(gt=0, description="Units allowed per period.")
    period: float = Field(default=1.0, gt=0, description="Window length in seconds.")


class RateLimitConfig(dg.Config):
    """A rate limiter named after the service, shared by every process using the store.

    One rate (``limit`` per ``period``), several (``rates``, all enforced in one atomic
    decision), or both::

        RateLimitConfig(limit=50, period=1)                       # 50/s
        RateLimitConfig(rates=[(50, 1), (1000, 60)])              # 50/s and 1000/min
    """

    limit: float | None = Field(
        default=None, gt=0, description="Units (calls, or the call's `cost`) allowed per period."
    )
    period: float = Field(default=1.0, gt=0, description="Window length of `limit`, seconds.")
    rates: list[RateWindow] = Field(
        default_factory=list,
        description="More windows, each {limit, period} (or a (limit, period) pair in Python); "
        "a call is admitted only when every window has room.",
    )
    mode: Literal["wait", "reject"] = Field(
        default="wait",
        description="'wait': block until the call may go (up to max_wait); "
        "'reject': raise RateLimited at once.",
    )
    max_wait: float = Field(
        default=30.0,
        ge=0,
        description="Longest wait in 'wait' mode, in seconds; beyond it the attempt raises "
        "RateLimited with the wait (retried, or a step retry in Dagster).",
    )

    @field_validator("rates", mode="before")
    @classmethod
    def _pairs_as_windows(cls, value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return [
                {"limit": item[0], "period": item[1]} if isinstance(item, (tuple, list)) else item
                for item in value
            ]
        return value

    @model_validator(mode="after")
    def _at_least_one_rate(self) -> RateLimitConfig:
        if self.limit is None and not self.rates:
            raise ValueError("a rate limit needs `limit` (with `period`) or `rates`")
        return self

    def windows(self) -> tuple[tuple[float, float], ...]:
        """Every ``(limit, period)`` this configuration enforces."""
        pairs = [(window.limit, window.period) for window in self.rates]
        if self.limit is not None:
            pairs.insert(0, (self.limit, self.period))
        return tuple(pairs)


OnStoreError = Literal["retry_step", "local"]


class ServicePolicy(dg.Config):
    """How calls to one external service are protected."""

    retry: RetryConfig = Field(
        default_factory=RetryConfig, description="Call-level retry settings."
    )
    circuit_breaker: CircuitBreakerConfig | None = Field(
        default_factory=CircuitBreakerConfig,
        description="Circuit breaker settings; null disables the breaker.",
    )
    rate_limit: RateLimitConfig | None = Field(
        default=None, description="Rate limit settings; null (the default) means no limit."
    )
    timeout: float | None = Field(
        default=None,
        gt=0,
        description="Per-attempt time limit in seconds, published to the called function as "
        "flowstone_dagster.resilience.current_deadline() so that it can pass it to its I/O. "
        "Null: no limit here (the integration's own I/O timeouts apply).",
    )
    enforce_timeout: bool = Field(
        default=False,
        description="Also run each attempt in a helper thread and raise CallTimeout when "
        "`timeout` passes. The abandoned thread keeps running (Python cannot stop it); use "
        "only for code that takes no timeout.",
    )
    max_concurrent: int | None = Field(
        default=None,
        ge=1,
        description="Bulkhead: at most this many calls to the service run at once, across "
        "every process sharing the store (each holds an expiring lease in the store). A call "
        "that finds every slot taken waits (bounded by the retry deadline), then raises "
        "BulkheadFull (retryable, never a breaker failure). Null: no bulkhead.",
    )
    lease_seconds: float | None = Field(
        default=None,
        gt=0,
        description="How long a bulkhead slot is held at most: a worker killed mid-call frees "
        "its slot after this long. Keep it above the longest attempt. Null: twice the "
        "policy's timeout (at least 60 s), or 300 s without a timeout.",
    )
    on_store_error: OnStoreError = Field(
        default="retry_step",
        description="When the resilience store fails or times out: 'retry_step' (default) ends "
        "the call with StoreUnavailable, a step retry in Dagster (RetryRequested), without "
        "calling the service; 'local' goes on with this process's own breaker and limiter "
        "state (a WARNING once per process, flowstone/store_degraded in the metadata).",
    )

    @model_validator(mode="after")
    def _lease_outlives_an_attempt(self) -> ServicePolicy:
        if (
            self.lease_seconds is not None
            and self.timeout is not None
            and self.lease_seconds <= self.timeout
        ):
            raise ValueError(
                f"lease_seconds ({self.lease_seconds:g}) must be above timeout "
                f"({self.timeout:g}): a lease that expires mid-attempt lets more than "
                "max_concurrent calls run"
            )
        return self

    def bulkhead_lease(self) -> float:
        """Seconds a bulkhead slot is held at most (``lease_seconds`` or its default)."""
        if self.lease_seconds is not None:
            return self.lease_seconds
        if self.timeout is not None:
            return max(2 * self.timeout, 60.0)
        return DEFAULT_LEASE_SECONDS


#: A policy that calls once: no retries, no breaker, no rate limit. What an integration uses
#: when no ResilienceResource is configured.
ONCE = ServicePolicy(retry=RetryConfig(max_attempts=1), circuit_breaker=None)
