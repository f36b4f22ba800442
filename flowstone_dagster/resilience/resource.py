"""``ResilienceResource``: named policies per external service, and the Dagster interplay.

::

    import dagster as dg
    from flowstone_dagster.resilience import (
        RECOMMENDED_RETRY_POLICY, CircuitBreakerConfig, RateLimitConfig, ResilienceResource,
        RetryConfig, ServicePolicy,
    )

    resilience = ResilienceResource(
        store_url="postgresql://dagster:...@db/dagster",     # default: SQLite in DAGSTER_HOME
        policies={
            "orders-api": ServicePolicy(
                retry=RetryConfig(max_attempts=4, base_delay=0.5),
                circuit_breaker=CircuitBreakerConfig(threshold=5, timeout=30),
                rate_limit=RateLimitConfig(limit=10, period=1.0),
                timeout=20,
            ),
        },
    )

    @dg.asset(retry_policy=RECOMMENDED_RETRY_POLICY)
    def orders(resilience: ResilienceResource) -> list[dict]:
        return resilience.call("orders-api", fetch_orders, "2025-01-15")

``call(service, fn, *args, **kwargs)`` composes the service's policy in this fixed order::

    retry( circuit_breaker( rate_limit( timeout( fn ) ) ) )

Each attempt passes the breaker (an open circuit ends the call at once: ``CircuitOpen`` is not
retried), then takes ``cost`` units from the limiter (a local refusal is not a breaker failure),
then runs ``fn`` under the per-attempt ``timeout``. With ``dagster_errors`` (the default), what
escapes is turned into Dagster's control flow by :func:`to_dagster_error`: an open circuit or a
far-away rate limit becomes ``RetryRequested(seconds_to_wait=...)``, a failure that retrying
cannot fix ``Failure(allow_retries=False)``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, Literal, TypeVar

import dagster as dg
from pydantic import Field

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CircuitOpen,
    ConfigurationError,
    FlowstoneError,
    MaxAttemptsExceeded,
    is_retryable,
    retry_after_of,
    status_of,
    truncate,
)
from flowstone_dagster.resilience.breaker import CircuitBreaker
from flowstone_dagster.resilience.limiter import RateLimiter
from flowstone_dagster.resilience.retry import with_retry
from flowstone_dagster.resilience.stores import StateStore, default_store_url, open_store
from flowstone_dagster.resilience.timeouts import deadline_scope, with_timeout

__all__ = [
    "DEFAULT_STEP_MAX_RETRIES",
    "RECOMMENDED_RETRY_POLICY",
    "CircuitBreakerConfig",
    "RateLimitConfig",
    "ResilienceResource",
    "RetryConfig",
    "ServicePolicy",
    "dagster_retries",
    "to_dagster_error",
]

T = TypeVar("T")

logger = logging.getLogger(__name__)

#: Step retries in :data:`RECOMMENDED_RETRY_POLICY` and in the ``RetryRequested`` this module
#: raises. With the default 3 attempts per call, a step makes at most 3 x (2 + 1) = 9 calls.
DEFAULT_STEP_MAX_RETRIES = 2

#: A step-level retry policy that goes with the call-level retries: two more step attempts,
#: 30 s then 60 s later (+/- jitter), so that a service that is down for minutes is retried
#: by Dagster, not by a tight loop inside a call.
RECOMMENDED_RETRY_POLICY = dg.RetryPolicy(
    max_retries=DEFAULT_STEP_MAX_RETRIES,
    delay=30,
    backoff=dg.Backoff.EXPONENTIAL,
    jitter=dg.Jitter.PLUS_MINUS,
)

#: A rate-limit wait at least this long (seconds) becomes a step retry, not a sleep.
DEFAULT_RETRY_REQUESTED_AFTER = 5.0


class RetryConfig(dg.Config):
    """Call-level retries (each attempt passes the breaker and the limiter again)."""

    max_attempts: int = Field(
        default=3, description="Attempts per call, the first included (1 = no retries)."
    )
    base_delay: float = Field(
        default=0.5, description="Wait before the 2nd attempt, in seconds; doubles each time."
    )
    max_delay: float = Field(
        default=10.0,
        description="Cap on one wait, in seconds. A server asking to wait longer (Retry-After) "
        "ends the call's retries, so that Dagster retries the step later instead.",
    )
    deadline: float | None = Field(
        default=60.0,
        description="Total seconds a call may spend, waits included; no retry starts that would "
        "end after it. Null: bounded by attempts only.",
    )
    jitter: float = Field(
        default=1.0,
        description="Random extra wait, up to this fraction of each exponential delay "
        "(it only ever adds). 0 disables it.",
    )


class CircuitBreakerConfig(dg.Config):
    """A circuit breaker named after the service, shared by every process using the store."""

    threshold: int = Field(default=5, description="Consecutive failures that open the circuit.")
    timeout: float = Field(
        default=30.0,
        description="Seconds the circuit stays open before one probe call is let through.",
    )
    probe_lease: float = Field(
        default=60.0,
        description="Seconds a probe may run before another caller may probe (covers a crashed "
        "prober); set it above the call's timeout plus the limiter's max_wait.",
    )


class RateLimitConfig(dg.Config):
    """A rate limiter named after the service, shared by every process using the store."""

    limit: float = Field(description="Units (calls, or the call's `cost`) allowed per period.")
    period: float = Field(default=1.0, description="Window length in seconds.")
    mode: Literal["wait", "reject"] = Field(
        default="wait",
        description="'wait': block until the call may go (up to max_wait); "
        "'reject': raise RateLimited at once.",
    )
    max_wait: float = Field(
        default=30.0,
        description="Longest wait in 'wait' mode, in seconds; beyond it the attempt raises "
        "RateLimited with the wait (retried, or a step retry in Dagster).",
    )


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


def _validate_policy(service: str, policy: ServicePolicy) -> None:
    where = f"policies.{service}"
    retry = policy.retry
    checks: list[tuple[bool, str, str]] = [
        (retry.max_attempts >= 1, "retry.max_attempts", "must be at least 1"),
        (retry.base_delay >= 0, "retry.base_delay", "must not be negative"),
        (retry.max_delay >= retry.base_delay, "retry.max_delay", "must be >= base_delay"),
        (retry.deadline is None or retry.deadline > 0, "retry.deadline", "must be positive"),
        (retry.jitter >= 0, "retry.jitter", "must not be negative"),
        (policy.timeout is None or policy.timeout > 0, "timeout", "must be positive"),
    ]
    if policy.circuit_breaker is not None:
        breaker = policy.circuit_breaker
        checks += [
            (breaker.threshold >= 1, "circuit_breaker.threshold", "must be at least 1"),
            (breaker.timeout >= 0, "circuit_breaker.timeout", "must not be negative"),
            (breaker.probe_lease > 0, "circuit_breaker.probe_lease", "must be positive"),
        ]
    if policy.rate_limit is not None:
        limit = policy.rate_limit
        checks += [
            (limit.limit > 0, "rate_limit.limit", "must be positive"),
            (limit.period > 0, "rate_limit.period", "must be positive"),
            (limit.max_wait >= 0, "rate_limit.max_wait", "must not be negative"),
        ]
    for ok, field, message in checks:
        if not ok:
            raise ConfigurationError(message, field=f"{where}.{field}", service=service)


class ResilienceResource(dg.ConfigurableResource):
    """Retries, circuit breakers, rate limits and timeouts per external service.

    Breaker and limiter state lives in the store at ``store_url``, shared by every step process
    (see :mod:`flowstone_dagster.resilience.stores`). ``call`` composes a service's policy as
    ``retry(circuit_breaker(rate_limit(timeout(fn))))``; a service not in ``policies`` uses
    ``default_policy``, or is a ``ConfigurationError`` when that is null.
    """

    store_url: str | None = Field(
        default=None,
        repr=False,  # a postgresql:// URL carries its password
        description="Where breaker and limiter state is shared: sqlite:///<absolute path> (one "
        "machine), postgresql://user:password@host:port/db (many machines; use EnvVar for the "
        "password) or memory:// (in-process executor, tests). Null: "
        "$FLOWSTONE_RESILIENCE_STORE, else sqlite in $DAGSTER_HOME/flowstone/.",
    )
    policies: dict[str, ServicePolicy] = Field(
        default_factory=dict,
        description="Policy per external service name (the name is also the circuit breaker's "
        "and the rate limiter's name in the store).",
    )
    default_policy: ServicePolicy | None = Field(
        default_factory=ServicePolicy,
        description="Policy for services not named in `policies` (3 attempts, breaker of 5 "
        "failures / 30 s, no rate limit). Null: calling an unknown service is a "
        "ConfigurationError.",
    )
    dagster_errors: bool = Field(
        default=True,
        description="Turn what escapes call() into Dagster control flow: an open circuit or a "
        "long rate-limit wait into RetryRequested, a non-retryable error into "
        "Failure(allow_retries=False). Per call: call(..., dagster_errors=False).",
    )
    retry_requested_after: float = Field(
        default=DEFAULT_RETRY_REQUESTED_AFTER,
        description="A rate-limit wait at least this many seconds becomes RetryRequested.",
    )
    step_max_retries: int = Field(
        default=DEFAULT_STEP_MAX_RETRIES,
        description="max_retries of the RetryRequested raised (keep it equal to the step's "
        "RetryPolicy.max_retries; a raised RetryRequested takes precedence over the policy).",
    )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Fail at resource set-up on a bad policy or store URL, naming the field."""
        for service, policy in self.policies.items():
            _validate_policy(service, policy)
        if self.default_policy is not None:
            _validate_policy("<default>", self.default_policy)
        open_store(self.store_url)

    @property
    def store(self) -> StateStore:
        """This process's store for ``store_url``."""
        return open_store(self.store_url)

    def resolved_store_url(self) -> str:
        """``store_url``, or the default it stands for."""
        return self.store_url or default_store_url()

    def policy_for(self, service: str) -> ServicePolicy:
        """The policy of ``service`` (its own, or the default one)."""
        policy = self.policies.get(service)
        if policy is None:
            policy = self.default_policy
            if policy is None:
                known = ", ".join(sorted(self.policies)) or "none"
                raise ConfigurationError(
                    f"no policy for service {service!r} and default_policy is null "
                    f"(configured: {known})",
                    field="policies",
                    service=service,
                )
        _validate_policy(service, policy)
        return policy

    def breaker(self, service: str) -> CircuitBreaker | None:
        """The service's circuit breaker (``None`` when its policy has none)."""
        config = self.policy_for(service).circuit_breaker
        if config is None:
            return None
        return CircuitBreaker(
            service,
            threshold=config.threshold,
            timeout=config.timeout,
            probe_lease=config.probe_lease,
            store=self.store,
        )

    def limiter(self, service: str, *, max_wait: float | None = None) -> RateLimiter | None:
        """The service's rate limiter (``None`` when its policy has none); ``max_wait`` lowers
        the policy's own."""
        config = self.policy_for(service).rate_limit
        if config is None:
            return None
        return RateLimiter(
            service,
            config.limit,
            config.period,
            mode=config.mode,
            max_wait=config.max_wait if max_wait is None else min(config.max_wait, max_wait),
            store=self.store,
        )

    def dagster_error(self, exc: BaseException, *, service: str | None = None) -> BaseException:
        """:func:`to_dagster_error` with this resource's ``retry_requested_after`` and
        ``step_max_retries`` (whatever ``dagster_errors`` says)."""
        return to_dagster_error(
            exc,
            retry_requested_after=self.retry_requested_after,
            max_retries=self.step_max_retries,
            service=service,
        )

    @contextmanager
    def dagster_retries(self, *, service: str | None = None) -> Iterator[None]:
        """With ``dagster_errors`` on, turn errors escaping the block into Dagster control flow
        (:meth:`dagster_error`); with it off, let them through unchanged. For integrations
        whose own calls go through this resource::

            with resilience.dagster_retries(service="orders-api"):
                rows = client.load("2025-01-15")
        """
        if not self.dagster_errors:
            yield
            return
        with dagster_retries(
            retry_requested_after=self.retry_requested_after,
            max_retries=self.step_max_retries,
            service=service,
        ):
            yield

    def call(
        self,
        service: str,
        fn: Callable[..., T],
        *args: Any,
        cost: float = 1,
        dagster_errors: bool | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` protected by ``service``'s policy.

        ::

            text = resilience.call("anthropic", client.messages.create, model=..., cost=1)

        Order: ``retry(circuit_breaker(rate_limit(timeout(fn))))``; ``cost`` is the units the
        call takes from the rate limit. Emits ``flowstone.resilience.call`` (``service``,
        ``attempts``, outcome, duration). Errors: see :func:`to_dagster_error` when
        ``dagster_errors`` is on (the resource's setting unless given here); otherwise
        ``CircuitOpen``, ``MaxAttemptsExceeded`` (from the last error), ``RateLimited`` or
        the non-retryable error unchanged.
        """
        policy = self.policy_for(service)
        retry = policy.retry
        to_dagster = self.dagster_errors if dagster_errors is None else dagster_errors
        # With Dagster errors on, a wait of retry_requested_after or more is not slept inside
        # the call (by the limiter or between attempts): it ends the call and becomes a step
        # retry (RetryRequested), which frees the step's process meanwhile.
        long_wait = self.retry_requested_after if to_dagster else None
        max_delay = retry.max_delay
        if long_wait is not None:
            max_delay = max(min(max_delay, long_wait), retry.base_delay)
        breaker = self.breaker(service)
        limiter = self.limiter(service, max_wait=long_wait)
        timeout, enforce = policy.timeout, policy.enforce_timeout
        attempts = 0

        def record(ticket: Any, error: BaseException | None = None) -> None:
            # The breaker's store failing must neither hide the call's own error nor lose its
            # result: log it and carry on.
            try:
                breaker.exit(ticket, error)  # type: ignore[union-attr]
            except Exception as store_error:
                logger.warning(
                    "circuit breaker %r could not record a call: %s", service, store_error
                )
                telemetry.emit("flowstone.circuit.store_error", error=store_error, breaker=service)

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            ticket = breaker.enter() if breaker is not None else None
            try:
                if limiter is not None:
                    limiter.acquire(cost)
                # Nested in the call's deadline: each attempt gets min(timeout, time left).
                with deadline_scope(timeout) as deadline:
                    if enforce and deadline is not None:
                        result = with_timeout(fn, deadline.remaining(), *args, **kwargs)
                    else:
                        result = fn(*args, **kwargs)
            except BaseException as exc:
                if ticket is not None:
                    record(ticket, exc)
                raise
            if ticket is not None:
                record(ticket)
            return result

        started = time.perf_counter()
        try:
            with deadline_scope(retry.deadline):
                result = with_retry(
                    attempt,
                    max_attempts=retry.max_attempts,
                    base_delay=retry.base_delay,
                    max_delay=max_delay,
                    deadline=retry.deadline,
                    jitter=retry.jitter,
                    name=service,
                )
        except Exception as exc:
            telemetry.emit(
                "flowstone.resilience.call",
                duration_s=time.perf_counter() - started,
                attempts=max(attempts, 1),
                error=exc,
                service=service,
            )
            if to_dagster:
                mapped = self.dagster_error(exc, service=service)
                if mapped is not exc:
                    raise mapped from exc
            raise
        telemetry.emit(
            "flowstone.resilience.call",
            duration_s=time.perf_counter() - started,
            attempts=attempts,
            service=service,
        )
        return result


def _metadata(exc: BaseException, cause: BaseException, service: str | None) -> dict[str, Any]:
    metadata: dict[str, Any] = {
        "flowstone/error_type": type(cause).__name__,
        "flowstone/retryable": is_retryable(cause),
    }
    service = service or getattr(cause, "service", None)
    if service:
        metadata["flowstone/service"] = str(service)
    if isinstance(exc, MaxAttemptsExceeded):
        metadata["flowstone/attempts"] = exc.attempts
    status = status_of(cause)
    if status is not None:
        metadata["flowstone/status"] = status
    wait = retry_after_of(cause)
    if wait is not None:
        metadata["flowstone/retry_after_s"] = round(wait, 3)
    return metadata


def to_dagster_error(
    exc: BaseException,
    *,
    retry_requested_after: float = DEFAULT_RETRY_REQUESTED_AFTER,
    max_retries: int = DEFAULT_STEP_MAX_RETRIES,
    service: str | None = None,
) -> BaseException:
    """The Dagster control-flow exception for a failed external call (raise it ``from exc``).

    - ``CircuitOpen`` (also as the last error of ``MaxAttemptsExceeded``) ->
      ``RetryRequested(max_retries, seconds_to_wait=retry_in)`` (at least 1 s);
    - a rate limit (any error with a retry-after) asking to wait ``retry_requested_after``
      seconds or more -> ``RetryRequested(max_retries, seconds_to_wait=<the wait>)``;
    - an error that is not retryable -> ``Failure(allow_retries=False)``: Dagster fails the step
      even when it has a ``RetryPolicy``;
    - retries exhausted on a transient error -> ``Failure(allow_retries=True)``: the step's
      ``RetryPolicy``, if any, retries it;
    - ``Failure``, ``RetryRequested`` and ``BaseException`` that is not an ``Exception`` are
      returned unchanged.

    The ``Failure``'s description is the error's message (flowstone errors carry no secrets)
    and its metadata ``flowstone/error_type``, ``/retryable``, ``/service``, ``/attempts``,
    ``/status`` and ``/retry_after_s`` where known::

        try:
            rows = with_retry(fetch)
        except Exception as exc:
            raise to_dagster_error(exc) from exc
    """
    if not isinstance(exc, Exception) or isinstance(exc, (dg.Failure, dg.RetryRequested)):
        return exc
    cause = exc.last_error if isinstance(exc, MaxAttemptsExceeded) else exc
    if isinstance(cause, CircuitOpen):
        return dg.RetryRequested(
            max_retries=max_retries, seconds_to_wait=max(math.ceil(cause.retry_in), 1)
        )
    wait = retry_after_of(cause)
    if wait is not None and wait >= retry_requested_after and is_retryable(cause):
        return dg.RetryRequested(max_retries=max_retries, seconds_to_wait=math.ceil(wait))
    retryable = is_retryable(cause)
    is_ours = isinstance(exc, FlowstoneError)
    description = str(exc) if is_ours else f"{type(exc).__name__}: {exc}"
    return dg.Failure(
        description=truncate(description, 2000),
        metadata=_metadata(exc, cause, service),
        allow_retries=retryable,
    )


@contextmanager
def dagster_retries(
    *,
    retry_requested_after: float = DEFAULT_RETRY_REQUESTED_AFTER,
    max_retries: int = DEFAULT_STEP_MAX_RETRIES,
    service: str | None = None,
) -> Iterator[None]:
    """Turn errors escaping the block into Dagster control flow (see :func:`to_dagster_error`).

    ::

        @dg.asset(retry_policy=RECOMMENDED_RETRY_POLICY)
        def orders() -> list[dict]:
            with dagster_retries():
                return with_circuit_breaker("orders-api", fetch_orders)
    """
    try:
        yield
    except Exception as exc:
        mapped = to_dagster_error(
            exc,
            retry_requested_after=retry_requested_after,
            max_retries=max_retries,
            service=service,
        )
        if mapped is exc:
            raise
        raise mapped from exc
