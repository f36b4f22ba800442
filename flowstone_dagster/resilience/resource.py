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

    retry( circuit_breaker( rate_limit( bulkhead( timeout( fn ) ) ) ) )

Each attempt passes the breaker (an open circuit ends the call at once: ``CircuitOpen`` is not
retried), then takes ``cost`` units from the limiter (a local refusal is not a breaker failure),
then a bulkhead slot when the policy sets ``max_concurrent`` (given back when the attempt
ends), then runs ``fn`` under the per-attempt ``timeout``. With ``dagster_errors`` (the
default), what escapes is turned into Dagster's control flow by :func:`to_dagster_error`: an
open circuit or a far-away rate limit becomes ``RetryRequested(seconds_to_wait=...)``, a
failure that retrying cannot fix ``Failure(allow_retries=False)``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr, field_validator, model_validator

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CircuitOpen,
    ConfigurationError,
    FlowstoneError,
    MaxAttemptsExceeded,
    StoreUnavailable,
    is_retryable,
    retry_after_of,
    status_of,
    truncate,
)
from flowstone_dagster.redaction import redact_exception_chain, redact_text
from flowstone_dagster.resilience.breaker import CircuitBreaker
from flowstone_dagster.resilience.bulkhead import DEFAULT_LEASE_SECONDS, Bulkhead
from flowstone_dagster.resilience.limiter import RateLimiter
from flowstone_dagster.resilience.retry import retry_loop
from flowstone_dagster.resilience.stores import (
    DEFAULT_STORE_TIMEOUT,
    StateStore,
    check_store_url,
    default_store_url,
    open_store,
)
from flowstone_dagster.resilience.timeouts import Deadline, deadline_scope, with_timeout

__all__ = [
    "DEFAULT_STEP_MAX_RETRIES",
    "ONCE",
    "RECOMMENDED_RETRY_POLICY",
    "CircuitBreakerConfig",
    "OnStoreError",
    "RateLimitConfig",
    "RateWindow",
    "ResilienceResource",
    "RetryConfig",
    "ServicePolicy",
    "dagster_retries",
    "resolve",
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

#: Seconds Dagster waits before retrying a step whose resilience store was unavailable.
DEFAULT_STORE_RETRY_AFTER = 10.0


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

#: The in-process store a policy with ``on_store_error="local"`` falls back to.
LOCAL_FALLBACK_STORE_URL = "memory://flowstone-local-fallback"
#: The in-process store of the resources :func:`resolve` makes for integrations configured
#: without a resilience resource (kept apart from the fallback's state).
RESOLVED_STORE_URL = "memory://flowstone-integration-defaults"

#: After a store failure, a policy with ``on_store_error="local"`` stays on local state this
#: many seconds before it tries the store again (a hung store would otherwise cost every call
#: its full store timeout).
STORE_RECHECK_AFTER = 5.0

_degraded_warned: set[str] = set()
_degraded_lock = threading.Lock()
_store_down_until: dict[str, float] = {}


def _warn_degraded_once(store: str, error: StoreUnavailable, service: str) -> None:
    """One WARNING (log line and ``flowstone.store.degraded`` event) per store per process."""
    with _degraded_lock:
        first = store not in _degraded_warned
        _degraded_warned.add(store)
    if first:
        logger.warning(
            "resilience store %s is unavailable (%s); service %r goes on with this process's "
            "own breaker and limiter state (on_store_error='local') until it is back",
            error.store,
            error.reason,
            service,
        )
        telemetry.emit(
            "flowstone.store.degraded", error=error, service=service, operation=error.operation
        )


class ResilienceResource(dg.ConfigurableResource):
    """Retries, circuit breakers, rate limits and timeouts per external service.

    Breaker and limiter state lives in the store at ``store_url``, shared by every step process
    (see :mod:`flowstone_dagster.resilience.stores`). ``call`` composes a service's policy as
    ``retry(circuit_breaker(rate_limit(bulkhead(timeout(fn)))))``; a service not in
    ``policies`` uses ``default_policy``, or is a ``ConfigurationError`` when that is null.
    """

    store_url: str | None = Field(
        default=None,
        repr=False,  # a postgresql:// URL carries its password
        description="Where breaker and limiter state is shared: sqlite:///<absolute path> (one "
        "machine), postgresql://user:password@host:port/db (many machines; use EnvVar for the "
        "password) or memory:// (in-process executor, tests). Null: "
        "$FLOWSTONE_RESILIENCE_STORE, else sqlite in $DAGSTER_HOME/flowstone/ (private to the "
        "user).",
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
        description="Turn what escapes call() into Dagster control flow: an open circuit, a "
        "long rate-limit wait or an unavailable store into RetryRequested, a non-retryable "
        "error into Failure(allow_retries=False). Per call: call(..., dagster_errors=False).",
    )
    retry_requested_after: float = Field(
        default=DEFAULT_RETRY_REQUESTED_AFTER,
        ge=0,
        description="A rate-limit wait at least this many seconds becomes RetryRequested.",
    )
    store_retry_after: float = Field(
        default=DEFAULT_STORE_RETRY_AFTER,
        ge=0,
        description="Seconds_to_wait of the RetryRequested raised when the store is "
        "unavailable (on_store_error='retry_step').",
    )
    step_max_retries: int = Field(
        default=DEFAULT_STEP_MAX_RETRIES,
        ge=0,
        description="max_retries of the RetryRequested raised (keep it equal to the step's "
        "RetryPolicy.max_retries; a raised RetryRequested takes precedence over the policy).",
    )

    _clock: Callable[[], float] = PrivateAttr(default=time.monotonic)
    _sleep: Callable[[float], None] = PrivateAttr(default=time.sleep)
    # Breaker and limiter objects per (service or limit, local store?, process): building them
    # on every call cost more than the memory store's whole decision.
    _guards_cache: dict[tuple[Any, ...], Any] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Fail at resource set-up on a bad store URL, naming the field.

        The store is only opened (not connected to) here: a store that is down at set-up is
        the same failure as a store that goes down later, handled per call.
        """
        check_store_url(self.resolved_store_url())

    def with_time(
        self, *, clock: Callable[[], float] | None = None, sleep: Callable[[float], None] | None
    ) -> ResilienceResource:
        """A copy that reads ``clock`` (monotonic seconds) and waits with ``sleep``: retries,
        backoff waits and rate-limit waits then run on the caller's time (tests)."""
        copy = self.model_copy()
        copy._clock = clock or time.monotonic
        copy._sleep = sleep or time.sleep
        copy._guards_cache = {}
        return copy

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
        return policy

    def breaker(self, service: str, *, store: StateStore | None = None) -> CircuitBreaker | None:
        """The service's circuit breaker (``None`` when its policy has none)."""
        config = self.policy_for(service).circuit_breaker
        if config is None:
            return None
        return CircuitBreaker(
            service,
            threshold=config.threshold,
            timeout=config.timeout,
            probe_lease=config.probe_lease,
            store=store or self.store,
        )

    def limiter(
        self,
        service: str,
        *,
        max_wait: float | None = None,
        config: RateLimitConfig | None = None,
        store: StateStore | None = None,
    ) -> RateLimiter | None:
        """The service's rate limiter (``None`` when its policy has none); ``max_wait`` lowers
        the policy's own, ``config`` replaces the policy's."""
        if config is None:
            config = self.policy_for(service).rate_limit
        if config is None:
            return None
        return RateLimiter(
            service,
            rates=config.windows(),
            mode=config.mode,
            max_wait=config.max_wait if max_wait is None else min(config.max_wait, max_wait),
            store=store or self.store,
            sleep=_private(self)["_sleep"],
        )

    def _guards(
        self, service: str, local: bool
    ) -> tuple[CircuitBreaker | None, RateLimiter | None]:
        """The service's breaker and limiter on the shared (or the local fallback) store."""
        key = (service, local, os.getpid())
        cache = _private(self)["_guards_cache"]
        found = cache.get(key)
        if found is None:
            store = open_store(LOCAL_FALLBACK_STORE_URL) if local else self.store
            found = cache[key] = (
                self.breaker(service, store=store),
                self.limiter(service, store=store),
            )
        return found

    def _extra_limiter(self, name: str, config: RateLimitConfig, local: bool) -> RateLimiter:
        windows = config.windows()
        key = (name, windows, config.mode, config.max_wait, local, os.getpid())
        cache = _private(self)["_guards_cache"]
        found = cache.get(key)
        if found is None:
            store = open_store(LOCAL_FALLBACK_STORE_URL) if local else self.store
            found = cache[key] = self.limiter(name, config=config, store=store)
        return found

    def bulkhead(self, service: str, *, store: StateStore | None = None) -> Bulkhead | None:
        """The service's bulkhead (``None`` when its policy sets no ``max_concurrent``)."""
        policy = self.policy_for(service)
        if policy.max_concurrent is None:
            return None
        return Bulkhead(
            service,
            policy.max_concurrent,
            lease_seconds=policy.bulkhead_lease(),
            store=store or self.store,
            sleep=_private(self)["_sleep"],
        )

    def _bulkhead(self, service: str, local: bool) -> Bulkhead | None:
        key = ("bulkhead", service, local, os.getpid())
        cache = _private(self)["_guards_cache"]
        if key not in cache:
            store = open_store(LOCAL_FALLBACK_STORE_URL) if local else self.store
            cache[key] = self.bulkhead(service, store=store)
        found: Bulkhead | None = cache[key]
        return found

    def dagster_error(self, exc: BaseException, *, service: str | None = None) -> BaseException:
        """:func:`to_dagster_error` with this resource's settings (whatever ``dagster_errors``
        says). Raise the result as it is (``raise mapped``): its cause chain is already set,
        without secrets."""
        return to_dagster_error(
            exc,
            retry_requested_after=self.retry_requested_after,
            max_retries=self.step_max_retries,
            service=service,
            store_retry_after=self.store_retry_after,
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
        try:
            yield
        except Exception as exc:
            mapped = self.dagster_error(exc, service=service)
            if mapped is exc:
                raise
            raise mapped  # noqa: B904 - the mapped error carries its own (redacted) cause

    def call(
        self,
        service: str,
        fn: Callable[..., T],
        *args: Any,
        cost: float = 1,
        limits: Sequence[tuple[str, RateLimitConfig, float]] = (),
        dagster_errors: bool | None = None,
        **kwargs: Any,
    ) -> T:
        """``fn(*args, **kwargs)`` protected by ``service``'s policy.

        ::

            text = resilience.call("anthropic", client.messages.create, model=..., cost=1)

        Order: ``retry(circuit_breaker(rate_limit(bulkhead(timeout(fn)))))``; ``cost`` is the
        units the call takes from the service's rate limit; ``limits`` adds rate limits of the
        caller's own, ``(name, config, cost)`` each (an LLM's requests and tokens per model),
        taken on every attempt after the service's (and before the bulkhead slot). Emits
        ``flowstone.resilience.call`` (``service``, ``attempts``, outcome, duration).

        Time: the retry ``deadline`` bounds when an attempt may start and every wait (backoff,
        rate limit, store); the policy's ``timeout`` alone bounds a running attempt, published
        to ``fn`` as :func:`~.timeouts.current_deadline`.

        Errors: see :func:`to_dagster_error` when ``dagster_errors`` is on (the resource's
        setting unless given here); otherwise ``CircuitOpen``, ``StoreUnavailable``,
        ``MaxAttemptsExceeded`` (from the last error), ``RateLimited`` or the non-retryable
        error unchanged.
        """
        policy = self.policy_for(service)
        to_dagster = self.dagster_errors if dagster_errors is None else dagster_errors
        started = time.perf_counter()
        if (
            policy.circuit_breaker is None
            and policy.rate_limit is None
            and not limits
            and policy.retry.max_attempts == 1
            and policy.timeout is None
            and policy.max_concurrent is None
        ):
            # Nothing to guard: one call and the same Dagster mapping. The integration's own
            # event (flowstone.http.request, flowstone.worker.call, ...) is the call's one
            # telemetry event; a flowstone.resilience.call event would only repeat it.
            try:
                return fn(*args, **kwargs)
            except Exception as exc:
                if to_dagster:
                    mapped = self.dagster_error(exc, service=service)
                    if mapped is not exc:
                        raise mapped  # noqa: B904 - carries its own (redacted) cause
                raise
        guarded = _GuardedCall(
            self,
            service,
            policy=policy,
            to_dagster=to_dagster,
            cost=cost,
            limits=limits,
            fn=fn,
            args=args,
            kwargs=kwargs,
        )
        try:
            result = guarded.run()
        except Exception as exc:
            self._ended(service, started, max(guarded.attempts, 1), exc, guarded.degraded)
            if to_dagster:
                mapped = self.dagster_error(exc, service=service)
                if mapped is not exc:
                    raise mapped  # noqa: B904 - carries its own (redacted) cause
            raise
        self._ended(service, started, guarded.attempts, None, guarded.degraded)
        return result

    @staticmethod
    def _ended(
        service: str,
        started: float,
        attempts: int,
        error: BaseException | None,
        degraded: bool = False,
    ) -> None:
        measures: dict[str, Any] = {"service": service}
        if degraded:
            measures["store_degraded"] = 1
        telemetry.emit(
            "flowstone.resilience.call",
            duration_s=time.perf_counter() - started,
            attempts=attempts,
            error=error,
            **measures,
        )


class _GuardedCall:
    """One ``ResilienceResource.call`` with a breaker, limits, retries or a timeout."""

    def __init__(
        self,
        resource: ResilienceResource,
        service: str,
        *,
        policy: ServicePolicy,
        to_dagster: bool,
        cost: float,
        limits: Sequence[tuple[str, RateLimitConfig, float]],
        fn: Callable[..., Any],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> None:
        self.resource = resource
        self.service = service
        self.policy = policy
        self.cost = cost
        self.limits = limits
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.attempts = 0
        self.degraded = False
        retry = policy.retry
        private = _private(resource)
        self.clock: Callable[[], float] = private["_clock"]
        self.sleep: Callable[[float], None] = private["_sleep"]
        # With Dagster errors on, a wait of retry_requested_after or more is not slept inside
        # the call (by the limiter or between attempts): it ends the call and becomes a step
        # retry (RetryRequested), which frees the step's process meanwhile.
        self.long_wait = resource.retry_requested_after if to_dagster else None
        self.max_delay = retry.max_delay
        if self.long_wait is not None:
            self.max_delay = max(min(self.max_delay, self.long_wait), retry.base_delay)
        self.deadline: Deadline | None = None

    def run(self) -> Any:
        retry = self.policy.retry
        clock = self.clock
        self.deadline = Deadline(retry.deadline, clock=clock) if retry.deadline else None
        return retry_loop(
            self.attempt,
            max_attempts=retry.max_attempts,
            base_delay=retry.base_delay,
            max_delay=self.max_delay,
            deadline=retry.deadline,
            jitter=retry.jitter,
            label=self.service,
            # A store outage ends the call at once: it is retried at step level, never in a
            # tight loop against a store that is down.
            should_retry=_retryable_in_call,
            clock=clock,
            sleep=self.sleep,
        )

    def _wait_budget(self) -> float | None:
        """How long limiter waits may last now (the retry deadline's remaining time)."""
        budget = self.long_wait
        if self.deadline is not None:
            remaining = self.deadline.remaining()
            budget = remaining if budget is None else min(budget, remaining)
        return budget

    def _degrade(self, error: StoreUnavailable) -> None:
        self.degraded = True
        url = self.resource.resolved_store_url()
        if error is not _RECENTLY_DOWN:
            _store_down_until[url] = time.monotonic() + STORE_RECHECK_AFTER
        _warn_degraded_once(url, error, self.service)

    def _admit(self, local: bool) -> tuple[CircuitBreaker | None, Any, _Slot | None]:
        """Pass the breaker, take the limits, then a bulkhead slot (every wait bounded by
        the retry deadline)."""
        resource = self.resource
        breaker, limiter = resource._guards(self.service, local)
        bulkhead = resource._bulkhead(self.service, local)
        with _store_bound(self.deadline):
            ticket = breaker.enter() if breaker is not None else None
            try:
                if limiter is not None:
                    limiter.acquire(self.cost, max_wait=self._wait_budget())
                for name, config, units in self.limits:
                    extra = resource._extra_limiter(name, config, local)
                    extra.acquire(units, max_wait=self._wait_budget())
                slot = None
                if bulkhead is not None:
                    budget = self._wait_budget()
                    slot = _Slot(bulkhead, bulkhead.acquire(max_wait=budget))
            except BaseException as exc:
                if breaker is not None and ticket is not None:
                    # The service was not called: give a probe lease back, count nothing.
                    _record_outcome(breaker, ticket, exc)
                raise
        return breaker, ticket, slot

    def attempt(self) -> Any:
        self.attempts += 1
        local = self.degraded
        if not local and self.policy.on_store_error == "local" and _store_down_until:
            until = _store_down_until.get(self.resource.resolved_store_url())
            if until is not None and time.monotonic() < until:
                self._degrade(_RECENTLY_DOWN)
                local = True
        try:
            breaker, ticket, slot = self._admit(local)
        except StoreUnavailable as error:
            if self.policy.on_store_error != "local" or local:
                raise
            self._degrade(error)
            breaker, ticket, slot = self._admit(True)
        try:
            # Only the policy's timeout (and any deadline the caller set) bounds the attempt.
            if self.policy.timeout is None:
                result = self.fn(*self.args, **self.kwargs)
            else:
                with deadline_scope(self.policy.timeout) as deadline:
                    if self.policy.enforce_timeout and deadline is not None:
                        result = with_timeout(
                            self.fn, deadline.remaining(), *self.args, **self.kwargs
                        )
                    else:
                        result = self.fn(*self.args, **self.kwargs)
        except BaseException as exc:
            if slot is not None:
                self._after(_release_slot, slot)
            if breaker is not None and ticket is not None:
                self._record(breaker, ticket, exc)
            raise
        if slot is not None:
            self._after(_release_slot, slot)
        if breaker is not None and ticket is not None:
            self._record(breaker, ticket, None)
        return result

    def _record(self, breaker: CircuitBreaker, ticket: Any, error: BaseException | None) -> None:
        self._after(_record_outcome, breaker, ticket, error)

    def _after(self, write: Callable[..., None], *args: Any) -> None:
        # What an attempt writes after it ran (its outcome, its slot given back) gets the retry
        # deadline's remaining time, but at least RECORD_GRACE: the attempt may legitimately
        # have outlived the deadline.
        if self.deadline is None or self.deadline.remaining() >= DEFAULT_STORE_TIMEOUT:
            write(*args)  # the store's own bound is the lower
            return
        with deadline_scope(max(self.deadline.remaining(), RECORD_GRACE)):
            write(*args)


#: Seconds a breaker may wait on the store to record a call's outcome after the retry deadline
#: passed (the attempt itself may run longer than the deadline).
RECORD_GRACE = 1.0


_NO_SCOPE = contextlib.nullcontext()


def _store_bound(deadline: Deadline | None) -> contextlib.AbstractContextManager[Any]:
    """Publish ``deadline`` to the store operations of the block, when it lowers their own
    bound (:data:`DEFAULT_STORE_TIMEOUT`): most calls need no scope at all."""
    if deadline is None or deadline.remaining() >= DEFAULT_STORE_TIMEOUT:
        return _NO_SCOPE
    return deadline_scope(deadline)


def _private(resource: ResilienceResource) -> dict[str, Any]:
    """The resource's private attributes: ``resource._clock`` goes through pydantic's
    ``__getattr__`` (about 1 us a read, measured), the dict does not."""
    return resource.__pydantic_private__  # type: ignore[return-value]


class _Slot(NamedTuple):
    bulkhead: Bulkhead
    lease_id: str


def _release_slot(slot: _Slot) -> None:
    # Like recording an outcome: a store failure must not hide the call's result or error; the
    # lease then expires on its own.
    try:
        slot.bulkhead.release(slot.lease_id)
    except Exception as store_error:
        logger.warning(
            "bulkhead %r could not give its slot back (it frees when its lease expires): %s",
            slot.bulkhead.name,
            store_error,
        )
        telemetry.emit(
            "flowstone.bulkhead.store_error", error=store_error, bulkhead=slot.bulkhead.name
        )


def _record_outcome(breaker: CircuitBreaker, ticket: Any, error: BaseException | None) -> None:
    # The store failing must neither hide the call's own error nor lose its result: log it
    # and carry on.
    try:
        breaker.exit(ticket, error)
    except Exception as store_error:
        logger.warning("circuit breaker %r could not record a call: %s", breaker.name, store_error)
        telemetry.emit("flowstone.circuit.store_error", error=store_error, breaker=breaker.name)


_RECENTLY_DOWN = StoreUnavailable(
    "(this process's view)", "skipped", f"failed less than {STORE_RECHECK_AFTER:g} s ago"
)


def _retryable_in_call(exc: BaseException) -> bool:
    return is_retryable(exc) and not isinstance(exc, StoreUnavailable)


_once_resources: dict[tuple[str, ...], ResilienceResource] = {}


def resolve(
    resource: ResilienceResource | None, default_policy: ServicePolicy | None = None
) -> ResilienceResource:
    """The resilience resource an integration calls through: ``resource`` when the user
    configured one, else one whose every service gets ``default_policy`` (default
    :data:`ONCE`: one attempt, no breaker, no limit), on the default shared store when that
    policy has a breaker or a rate limit, in process memory otherwise. Either way the call has
    the same mapping to Dagster::

        self._resilience = resolve(self.resilience)
        rows = self._resilience.call(self.service, fetch, day, dagster_errors=False)
    """
    if resource is not None:
        return resource
    policy = default_policy or ONCE
    key = (policy.model_dump_json(),)
    found = _once_resources.get(key)
    if found is None:
        # A policy with a breaker or a rate limit needs the shared default store (what protects
        # one process only protects nothing under Dagster's multiprocess executor); one without
        # either never touches a store.
        shared = policy.circuit_breaker is not None or policy.rate_limit is not None
        found = _once_resources[key] = ResilienceResource(
            store_url=None if shared else RESOLVED_STORE_URL, default_policy=policy
        )
    return found


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
    store_retry_after: float = DEFAULT_STORE_RETRY_AFTER,
) -> BaseException:
    """The Dagster control-flow exception for a failed external call: the one mapping.

    Raise the result as it is (``raise to_dagster_error(exc)``): its ``__cause__`` is ``exc``
    with every link of its chain redacted (:func:`~flowstone_dagster.redaction.
    redact_exception_chain`), because Dagster records the whole chain in the event log.

    - ``CircuitOpen`` (also as the last error of ``MaxAttemptsExceeded``) ->
      ``RetryRequested(max_retries, seconds_to_wait=retry_in)`` (at least 1 s);
    - ``StoreUnavailable`` (the resilience store failed; the service was not called) ->
      ``RetryRequested(max_retries, seconds_to_wait=store_retry_after)``;
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
            raise to_dagster_error(exc)
    """
    if not isinstance(exc, Exception) or isinstance(exc, (dg.Failure, dg.RetryRequested)):
        return exc
    cause = exc.last_error if isinstance(exc, MaxAttemptsExceeded) else exc
    mapped: BaseException
    if isinstance(cause, CircuitOpen):
        mapped = dg.RetryRequested(
            max_retries=max_retries, seconds_to_wait=max(math.ceil(cause.retry_in), 1)
        )
    elif isinstance(cause, StoreUnavailable):
        mapped = dg.RetryRequested(
            max_retries=max_retries, seconds_to_wait=max(math.ceil(store_retry_after), 0)
        )
    else:
        wait = retry_after_of(cause)
        retryable = is_retryable(cause)
        if wait is not None and wait >= retry_requested_after and retryable:
            mapped = dg.RetryRequested(max_retries=max_retries, seconds_to_wait=math.ceil(wait))
        else:
            is_ours = isinstance(exc, FlowstoneError)
            description = str(exc) if is_ours else f"{type(exc).__name__}: {exc}"
            mapped = dg.Failure(
                description=truncate(redact_text(description), 2000),
                metadata=_metadata(exc, cause, service),
                allow_retries=retryable,
            )
    mapped.__cause__ = redact_exception_chain(exc, is_ours=FlowstoneError)
    return mapped


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
        raise mapped  # noqa: B904 - the mapped error carries its own (redacted) cause
