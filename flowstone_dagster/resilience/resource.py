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

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
)
from flowstone_dagster.resilience.breaker import CircuitBreaker
from flowstone_dagster.resilience.bulkhead import Bulkhead
from flowstone_dagster.resilience.call import (
    LOCAL_FALLBACK_STORE_URL,
    RESOLVED_STORE_URL,
    _GuardedCall,
    _private,
)
from flowstone_dagster.resilience.config import ONCE, RateLimitConfig, ServicePolicy
from flowstone_dagster.resilience.dagster_mapping import (
    DEFAULT_RETRY_REQUESTED_AFTER,
    DEFAULT_STEP_MAX_RETRIES,
    DEFAULT_STORE_RETRY_AFTER,
    to_dagster_error,
)
from flowstone_dagster.resilience.limiter import RateLimiter
from flowstone_dagster.resilience.stores import (
    StateStore,
    check_store_url,
    default_store_url,
    open_store,
)

__all__ = ["ResilienceResource", "resolve"]

T = TypeVar("T")

logger = logging.getLogger(__name__)


class ResilienceResource(dg.ConfigurableResource):
    """Retries, circuit breakers, rate limits and timeouts per external service.

    Breaker and limiter state lives in the store at ``store_url``, shared by every step process
    (see :mod:`flowstone_dagster.resilience.stores`). ``call`` composes a service's policy as
    ``retry(circuit_breaker(bulkhead(rate_limit(timeout(fn)))))``; a service not in
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

        Order: ``retry(circuit_breaker(bulkhead(rate_limit(timeout(fn)))))``; ``cost`` is the
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
        # Nothing to guard: one call and the same Dagster mapping. The integration's own event
        # (flowstone.http.request, flowstone.worker.call, ...) is the call's one telemetry
        # event; a flowstone.resilience.call event would only repeat it.
        guarded = (
            None
            if policy.circuit_breaker is None
            and policy.rate_limit is None
            and not limits
            and policy.retry.max_attempts == 1
            and policy.timeout is None
            and policy.max_concurrent is None
            else _GuardedCall(
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
        )
        try:
            result = fn(*args, **kwargs) if guarded is None else guarded.run()
        except Exception as exc:
            if guarded is not None:
                self._ended(service, started, max(guarded.attempts, 1), exc, guarded.degraded)
            if to_dagster:
                mapped = self.dagster_error(exc, service=service)
                if mapped is not exc:
                    raise mapped  # noqa: B904 - carries its own (redacted) cause
            raise
        if guarded is not None:
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


_once_resources: dict[tuple[str, ...], ResilienceResource] = {}
# The same policy object resolves to the same resource without serialising it again (that cost
# about as much as the rest of an unguarded call); the entry holds the policy, so its id is not
# reused while cached.
_by_policy_object: dict[int, tuple[ServicePolicy, ResilienceResource]] = {}


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
    cached = _by_policy_object.get(id(policy))
    if cached is not None and cached[0] is policy:
        return cached[1]
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
    if len(_by_policy_object) >= 256:  # policies built per call: keep the cache small
        _by_policy_object.clear()
    _by_policy_object[id(policy)] = (policy, found)
    return found
