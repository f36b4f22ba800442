"""``LLMClient``: one configured model endpoint, called through the one resilience path.

::

    from flowstone_dagster.resilience import ResilienceResource
    from flowstone_dagster.llm import LLMClient

    claude = LLMClient(
        "anthropic", model="claude-sonnet-5-5", api_key=os.environ["ANTHROPIC_API_KEY"],
        rpm_limit=50, tpm_limit=40_000,
        resilience=ResilienceResource(store_url="sqlite:////var/lib/dagster/flowstone.sqlite3"),
    )
    claude.call("Classify: 'free money!!!'", system="Answer spam or ham.")   # -> 'spam'
    claude.chat([{"role": "user", "content": "Hi"}]).usage                  # Usage(12, 5)
    with claude.stream("Write a haiku about rivers.") as stream:
        for delta in stream:
            print(delta, end="")
    stream.usage                                                             # at the end

Every request goes through :meth:`ResilienceResource.call
<flowstone_dagster.resilience.ResilienceResource.call>`, the package's one resilience path::

    retry( circuit_breaker( rate_limits( SDK request with timeout ) ) )

- retries, the breaker and the policy's per-attempt ``timeout`` are the policy of ``service``
  in ``resilience`` (without one: :data:`DEFAULT_POLICY`, on an in-process store). Retries are
  decided by :func:`~flowstone_dagster.errors.is_retryable` (429, 500, 502, 503, 504, 529,
  timeouts, connection errors) and never start sooner than the error's ``retry_after``: the
  SDK's errors are turned into the taxonomy's by :func:`~.failures.to_taxonomy`, which reads
  ``retry-after``, ``retry-after-ms`` and the providers' rate-limit reset headers;
- the breaker is named ``service``: by default ``llm:<provider>:<origin of base_url>`` (what
  fails together). A provider's 429 is ignored by it (the provider is healthy; we were fast);
- the limits are passed as ``limits=`` of the call: ``llm:<provider>:<origin>:<model>:rpm``
  (one unit per request) and ``...:tpm`` (the prompt's estimated tokens before the request;
  after it, the tokens the provider reports beyond the estimate are recorded too): what shares
  a quota is the provider's account at one endpoint for one model;
- breaker and limits live in ``resilience``'s store, shared by every process that opens it.

Each call emits one ``flowstone.llm.call`` event (provider, model, service, attempts,
input/output tokens, stop reason, prompt length in characters, outcome, duration). The prompt
text and the key never leave the call.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal, TypeVar, overload
from urllib.parse import urlsplit

import dagster as dg
import httpx2

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    CircuitOpen,
    ConfigurationError,
    FlowstoneError,
    HTTPError,
    MaxAttemptsExceeded,
    RateLimited,
    TransportError,
    truncate,
)
from flowstone_dagster.llm import usage as _usage  # noqa: F401 - registers the listener
from flowstone_dagster.llm.budgets import Budget, BudgetExceeded, budgets_for, record, take
from flowstone_dagster.llm.failures import StreamInterrupted, provider_limits, to_taxonomy
from flowstone_dagster.llm.messages import (
    LLMResponse,
    Message,
    Prompt,
    System,
    Usage,
    estimate_tokens,
    normalize_messages,
    prompt_chars,
    split_system,
)
from flowstone_dagster.llm.providers import (
    DEFAULT_BASE_URLS,
    LLMRequest,
    ProviderAdapter,
    StreamState,
    StructuredOutput,
    make_adapter,
)
from flowstone_dagster.llm.tools import (
    InvalidOutput,
    ToolCall,
    ToolLoopExceeded,
    ToolSpec,
    output_spec,
    tool_result,
    tool_specs,
)
from flowstone_dagster.llm.wire import PROVIDER_COUNTING_WINDOW, confirm_at_send, late_after
from flowstone_dagster.redaction import redact_exception_chain, register_secret
from flowstone_dagster.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    RateLimitConfig,
    RateLimiter,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    current_admission,
    current_deadline,
    resolve,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_POLICY",
    "DEFAULT_RATE_LIMIT_MARGIN",
    "DEFAULT_RPM_WINDOW",
    "DEFAULT_TIMEOUT",
    "EVENT",
    "LLMClient",
    "LLMStream",
    "ToolRun",
    "default_service",
    "falls_back",
    "limit_name",
    "origin_of",
]

if TYPE_CHECKING:
    from flowstone_dagster.llm.batches import BatchResult

T = TypeVar("T")

logger = logging.getLogger(__name__)

EVENT = "flowstone.llm.call"
DEFAULT_MAX_TOKENS = 1024
#: Seconds one request may take as a whole: connecting, sending, and reading the whole answer
#: (for a stream: from sending to its last event). The SDKs' own timeout bounds each read only.
DEFAULT_TIMEOUT = 120.0
PROVIDERS = ("anthropic", "openai", "openai_compatible")
#: How much longer than the provider's our rate windows are, as a fraction (0.03: 3 %). A
#: request reaches the provider later than we admitted it, by a delay that varies (network,
#: the provider's queue); the margin keeps the provider's own count, over arrival times,
#: within the limit: it absorbs a variation of up to ``margin`` x the provider's window (30 ms
#: per second at 0.03), at the price of running that much below the limit.
DEFAULT_RATE_LIMIT_MARGIN = 0.03
#: Default ``rpm_window``: a per-minute budget is admitted in tenths of a second (10 per 0.1 s
#: for 6,000 rpm) rather than in bursts of a whole second's budget, so that requests reach the
#: provider evenly spread and its count is not thrown off by queueing.
DEFAULT_RPM_WINDOW = 0.1
#: Longest wait for rpm/tpm capacity (seconds) before ``RateLimited``.
DEFAULT_RATE_LIMIT_MAX_WAIT = 60.0

#: The policy of LLM calls when no :class:`ResilienceResource` is given: 4 attempts, 1 s
#: doubling backoff (a provider's ``retry-after`` or reset headers are honoured, up to 60 s),
#: a 600 s retry deadline, and a breaker of 5 failures / 30 s. Without a resource the breaker
#: and the rpm/tpm limits live in this process's memory (they protect the calls of one
#: process only); pass ``resilience=ResilienceResource(...)`` to share them across processes.
DEFAULT_POLICY = ServicePolicy(
    retry=RetryConfig(max_attempts=4, base_delay=1.0, max_delay=60.0, deadline=600.0),
    circuit_breaker=CircuitBreakerConfig(threshold=5, timeout=30.0, probe_lease=180.0),
)


def origin_of(url: str) -> str:
    """``scheme://host[:port]`` of ``url`` (lower case): what fails together."""
    parts = urlsplit(url)
    if not parts.scheme or not parts.netloc:
        return url.rstrip("/")
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return f"{parts.scheme.lower()}://{netloc.lower()}"


def default_service(provider: str, base_url: str) -> str:
    """The breaker's default name: ``llm:<provider>:<origin>``, e.g.
    ``llm:openai:https://api.openai.com``."""
    return f"llm:{provider}:{origin_of(base_url)}"


def limit_name(provider: str, base_url: str, model: str, kind: str) -> str:
    """A rate limit's name: ``llm:<provider>:<origin>:<model>:<kind>`` (``rpm`` or ``tpm``)."""
    return f"llm:{provider}:{origin_of(base_url)}:{model}:{kind}"


def _rpm_window(rpm_limit: float, window: float) -> tuple[float, float]:
    """``(requests, seconds)``: ``rpm_limit`` as a budget per ``window`` seconds.

    Providers enforce a per-minute limit over shorter windows (OpenAI: "60,000 requests/minute
    may be enforced as 1,000 requests/second"), so a burst of a whole minute's budget earns
    429s. The window is lengthened until it holds at least one request.
    """
    seconds = max(window, 60.0 / rpm_limit)
    return rpm_limit * seconds / 60.0, seconds


def _reported(exc: BaseException) -> BaseException:
    """The error a telemetry event names: the failure behind a Dagster control-flow error."""
    if isinstance(exc, (dg.Failure, dg.RetryRequested)) and exc.__cause__ is not None:
        return exc.__cause__
    return exc


class LLMClient:
    """Calls one model endpoint; see the module docs. Thread-safe.

    Args:
        provider: ``anthropic``, ``openai`` or ``openai_compatible``.
        model: the default model; each call may name another.
        api_key: the key (required for ``anthropic`` and ``openai``); registered with
            :func:`~flowstone_dagster.redaction.register_secret`, so that no redaction in the
            process lets it through.
        base_url: the endpoint (required for ``openai_compatible``, e.g.
            ``http://localhost:11434/v1`` for Ollama).
        max_tokens, temperature: defaults of every call.
        timeout: seconds one request may take as a whole (a trickled body, or a stream from
            sending to its last event, is cut when they pass); cut to the policy's per-attempt
            ``timeout`` when that is sooner.
        stream_idle_timeout: for a stream, the longest silence between two events (``None``:
            ``timeout``).
        rpm_limit, rpm_window: requests per minute, enforced per ``rpm_window`` seconds.
        tpm_limit: tokens (input + output) per minute, over a sliding minute.
        rate_limit_max_wait: the longest wait for the limits before ``RateLimited``.
        rate_limit_margin: how much longer our windows are than the provider's (a fraction),
            to absorb the varying delay between our admission and the provider's count.
        run_token_budget, asset_token_budget: tokens a Dagster run (an asset of the run) may
            spend through this client, shared by the run's processes (see :mod:`.budgets`).
        fallbacks: clients tried in order when this one's circuit is open, it stays
            overloaded or failing through its retries, or its rate limit cannot be waited out
            (see :meth:`chat`; :func:`falls_back` decides).
        structured_output: how ``output=`` reaches the model: ``"native"`` (the provider's
            schema mode, the default), ``"json_mode"`` (OpenAI's ``json_object`` mode and the
            schema in the system prompt, for compatible servers without a schema mode) or
            ``"prompt"`` (the schema in the system prompt only); the reply is validated in
            every mode.
        service: the breaker's name, and the name of errors and telemetry (default
            ``llm:<provider>:<origin of base_url>``); also the policy looked up in
            ``resilience``.
        resilience: the :class:`~flowstone_dagster.resilience.ResilienceResource` every
            request goes through; ``None``: :data:`DEFAULT_POLICY` in this process's memory.
        dagster_errors: turn failures into Dagster control flow (``RetryRequested``,
            ``Failure``); ``None``: ``resilience``'s own setting. Default ``False``: the
            taxonomy's errors, as fits a client used outside Dagster.
    """

    def __init__(
        self,
        provider: str,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        stream_idle_timeout: float | None = None,
        rpm_limit: float | None = None,
        rpm_window: float = DEFAULT_RPM_WINDOW,
        tpm_limit: float | None = None,
        rate_limit_max_wait: float = DEFAULT_RATE_LIMIT_MAX_WAIT,
        rate_limit_margin: float = DEFAULT_RATE_LIMIT_MARGIN,
        service: str | None = None,
        resilience: ResilienceResource | None = None,
        dagster_errors: bool | None = False,
        fallbacks: Sequence[LLMClient] = (),
        run_token_budget: float | None = None,
        asset_token_budget: float | None = None,
        structured_output: StructuredOutput = "native",
    ) -> None:
        if provider not in PROVIDERS:
            raise ConfigurationError(f"must be one of {', '.join(PROVIDERS)}", field="provider")
        if not model:
            raise ConfigurationError("must name a model", field="model")
        register_secret(api_key)
        if provider != "openai_compatible" and not api_key:
            raise ConfigurationError(
                f"no API key for {provider}: pass api_key (in Dagster: "
                f"api_key=dg.EnvVar('{provider.upper()}_API_KEY'))",
                field="api_key",
            )
        base_url = base_url or DEFAULT_BASE_URLS.get(provider)
        if not base_url:
            raise ConfigurationError(
                "is required for openai_compatible (e.g. http://localhost:11434/v1 for Ollama)",
                field="base_url",
            )
        checks: list[tuple[bool, str, str]] = [
            (max_tokens >= 1, "max_tokens", "must be at least 1"),
            (timeout > 0, "timeout", "must be positive"),
            (
                stream_idle_timeout is None or stream_idle_timeout > 0,
                "stream_idle_timeout",
                "must be positive",
            ),
            (rpm_limit is None or rpm_limit > 0, "rpm_limit", "must be positive"),
            (rpm_window > 0, "rpm_window", "must be positive"),
            (tpm_limit is None or tpm_limit >= 1, "tpm_limit", "must be at least 1"),
            (rate_limit_max_wait >= 0, "rate_limit_max_wait", "must not be negative"),
            (rate_limit_margin >= 0, "rate_limit_margin", "must not be negative"),
            (service is None or bool(service.strip()), "service", "must not be empty"),
            (
                run_token_budget is None or run_token_budget >= 1,
                "run_token_budget",
                "must be at least 1",
            ),
            (
                asset_token_budget is None or asset_token_budget >= 1,
                "asset_token_budget",
                "must be at least 1",
            ),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ConfigurationError(message, field=field)
        if structured_output not in ("native", "json_mode", "prompt"):
            raise ConfigurationError(
                f"must be native, json_mode or prompt, got {structured_output!r}",
                field="structured_output",
            )
        if structured_output == "json_mode" and provider == "anthropic":
            raise ConfigurationError(
                "Anthropic has no JSON mode: use native (its schema mode) or prompt",
                field="structured_output",
            )
        _check_temperature(provider, temperature)
        self.provider = provider
        self.model = model
        self.base_url = base_url
        self.origin = origin_of(base_url)
        self._limit_prefix = f"llm:{provider}:{self.origin}:"  # of every limit_name
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = float(timeout)
        self.stream_idle_timeout = stream_idle_timeout
        self.service = service or default_service(provider, base_url)
        self.resilience: ResilienceResource = resolve(resilience, default_policy=DEFAULT_POLICY)
        self.dagster_errors = dagster_errors
        self._secrets = [api_key] if api_key else []
        self._rate_options = (rpm_window, rate_limit_margin, rate_limit_max_wait)
        #: The configured limits per minute (``rpm_limit``, ``tpm_limit``).
        self.per_minute: dict[str, float] = {}
        if rpm_limit is not None:
            self.per_minute["rpm"] = float(rpm_limit)
        if tpm_limit is not None:
            self.per_minute["tpm"] = float(tpm_limit)
        self.rpm: RateLimitConfig | None = self._config("rpm", rpm_limit)
        self.tpm: RateLimitConfig | None = self._config("tpm", tpm_limit)
        # Limits a provider stated lower than configured, by limit name (see correct_limits):
        # the stated figure per minute and its config.
        self._lowered: dict[str, tuple[float, RateLimitConfig]] = {}
        #: How late (seconds after its rpm admission) a request may go on the wire before it
        #: is admitted again; see :mod:`.wire`.
        self.late_after = late_after(rate_limit_margin)
        self._adapter: ProviderAdapter = make_adapter(
            provider,
            api_key=api_key,
            base_url=base_url,
            timeout=self.timeout,
            on_request=self._on_request,
            on_response=self._on_response,
        )
        self._closed = threading.Event()
        self.run_token_budget = run_token_budget
        self.asset_token_budget = asset_token_budget
        self.structured_output: StructuredOutput = structured_output
        self.fallbacks: tuple[LLMClient, ...] = tuple(fallbacks)
        for index, fallback in enumerate(self.fallbacks):
            if not isinstance(fallback, LLMClient):
                raise ConfigurationError(
                    f"must be LLMClients, got {type(fallback).__name__}",
                    field=f"fallbacks[{index}]",
                )

    def __repr__(self) -> str:
        return (
            f"LLMClient(provider={self.provider!r}, model={self.model!r}, "
            f"service={self.service!r}, base_url={self.base_url!r})"
        )

    def close(self) -> None:
        """Close the SDK's connections (the client is unusable afterwards)."""
        self._closed.set()
        self._adapter.close()

    # -- what the one path protects ------------------------------------------------------------

    def limit_name(self, kind: Literal["rpm", "tpm"], model: str | None = None) -> str:
        """The store name of ``model``'s (default: the client's) ``rpm`` or ``tpm`` limit
        (:func:`limit_name`, from the origin parsed once)."""
        return f"{self._limit_prefix}{model or self.model}:{kind}"

    def limiter(self, kind: Literal["rpm", "tpm"], model: str | None = None) -> RateLimiter | None:
        """``model``'s ``rpm`` or ``tpm`` limiter on the resilience store (``None`` when no
        such limit is set), e.g. to read its ``usage()``."""
        name = self.limit_name(kind, model)
        config = self._config_of(kind, name)
        if config is None:
            return None
        return self.resilience.limiter(name, config=config)

    def _config(self, kind: str, per_minute: float | None) -> RateLimitConfig | None:
        """The limiter config of ``per_minute`` requests (``rpm``) or tokens (``tpm``)."""
        if per_minute is None:
            return None
        rpm_window, margin, max_wait = self._rate_options
        if kind == "rpm":
            limit, seconds = _rpm_window(float(per_minute), rpm_window)
        else:
            limit, seconds = float(per_minute), 60.0
        return RateLimitConfig(
            limit=limit, period=seconds * (1 + margin), mode="wait", max_wait=max_wait
        )

    def _config_of(self, kind: str, name: str) -> RateLimitConfig | None:
        """The config of limit ``name``: the configured one, or the provider's lower one."""
        if self._lowered:
            lowered = self._lowered.get(name)
            if lowered is not None:
                return lowered[1]
        return self.rpm if kind == "rpm" else self.tpm

    @property
    def breaker(self) -> CircuitBreaker | None:
        """The endpoint's circuit breaker (``None`` when the service's policy has none)."""
        return self.resilience.breaker(self.service)

    def _limits(self, model: str, estimate: int) -> list[tuple[str, RateLimitConfig, float]]:
        """The limits one request takes: tokens first, then the request itself, so that a
        wait for token capacity never stands between the rpm admission and the send."""
        limits: list[tuple[str, RateLimitConfig, float]] = []
        if self.tpm is not None:
            name = self.limit_name("tpm", model)
            tpm = self._config_of("tpm", name)
            assert tpm is not None
            assert tpm.limit is not None
            limits.append((name, tpm, float(max(min(estimate, tpm.limit), 1))))
        if self.rpm is not None:
            limits.extend(self.limits_for(model))
        return limits

    def limits_for(self, model: str | None = None) -> list[tuple[str, RateLimitConfig, float]]:
        """The limits one request of ``model`` takes when its tokens are not known (a request
        of the governed SDK client): the rpm limit."""
        if self.rpm is None:
            return []
        name = self.limit_name("rpm", model or self.model)
        rpm = self._config_of("rpm", name)
        assert rpm is not None
        return [(name, rpm, 1.0)]

    def sdk_client(self, context: Any = None) -> Any:
        """A new official SDK client (``anthropic.Anthropic`` / ``openai.OpenAI``) for this
        endpoint whose every request goes through this client's resilience path (breaker, rpm
        limit, retries, telemetry); see :mod:`.governed`. ``context``: the Dagster context
        its usage counts for when it is used from a worker thread."""
        from flowstone_dagster.llm.governed import governed_sdk_client

        return governed_sdk_client(
            self, api_key=self._secrets[0] if self._secrets else None, context=context
        )

    def _on_response(self, response: httpx2.Response) -> None:
        """The SDK's response hook (every response, 429s included): correct the shared rate
        state from the provider's rate-limit headers."""
        if self.per_minute:
            admission = current_admission()
            if admission is not None:
                self.correct_limits(response.headers, admission.limiters)

    def correct_limits(self, headers: Mapping[str, str], names: Sequence[str]) -> None:
        """Correct the limits ``names`` (this client's ``...:rpm``/``...:tpm`` limits a
        request was admitted under) from the rate-limit headers of its response.

        - A provider stating a lower limit per minute than configured (its
          ``...-limit-requests``/``-tokens``: the account's tier, or a limit shared with
          clients we do not see) wins: this process uses it for that model from now on, with
          one WARNING naming both figures.
        - A provider stating that a limit has nothing ``remaining`` until a reset further off
          than its one-second counting window (a minute's budget spent, e.g. by other users
          of the key) fills the limit's shared window until that reset: no process sends
          into it (each would earn a 429). A reset within a second is the window our own
          admission already keeps.
        """
        stated = provider_limits(headers)
        if not stated:
            return
        for name in names:
            kind = name.rpartition(":")[2]
            configured = self.per_minute.get(kind)
            limit = stated.get("requests" if kind == "rpm" else "tokens")
            if configured is None or limit is None or not name.startswith(self._limit_prefix):
                continue  # not one of this client's rpm/tpm limits (a policy's own limit)
            if limit.limit is not None and 0 < limit.limit < configured:
                self._lower(kind, name, configured, limit.limit)
            reset = limit.reset
            if limit.remaining == 0 and reset is not None and reset > PROVIDER_COUNTING_WINDOW:
                self._fill(kind, name, reset)

    def _lower(self, kind: str, name: str, configured: float, stated: float) -> None:
        if stated >= self._lowered.get(name, (math.inf,))[0]:
            return  # known already
        config = self._config(kind, stated)
        assert config is not None
        self._lowered[name] = (stated, config)
        logger.warning(
            "%s states a limit of %g %s per minute for %s, lower than %s_limit=%g: using %g "
            "(set %s_limit to it to silence this warning)",
            self.service,
            stated,
            "requests" if kind == "rpm" else "tokens",
            name,
            kind,
            configured,
            stated,
            kind,
        )
        telemetry.emit(
            "flowstone.llm.limit_lowered",
            limiter=name,
            configured=configured,
            provider_limit=stated,
        )

    def _fill(self, kind: str, name: str, seconds: float) -> None:
        """Take the whole of limit ``name`` for the next ``seconds`` in the shared store (the
        provider's window is full, whatever ours says). The reservation is dated so that it
        leaves the window ``seconds`` from now; on a store keeping its server's clock the
        end moves by the machines' clock difference."""
        config = self._config_of(kind, name)
        if config is None or config.limit is None:
            return
        # Within one window: the store's own clock. Beyond: dated on ours.
        at = time.time() + seconds - config.period if seconds > config.period else None
        try:
            self.resilience.store.reserve(name, config.limit, math.inf, config.period, now=at)
        except Exception as exc:
            logger.warning("could not record %s's full rate window: %s", name, exc)

    def _on_request(self, request: httpx2.Request) -> None:
        """The SDK's request hook: confirm the rate admission at the wire (see :mod:`.wire`)."""
        confirm_at_send(request, self.late_after)

    def _to_dagster(self) -> bool:
        if self.dagster_errors is None:
            return self.resilience.dagster_errors
        return self.dagster_errors

    def _guarded(
        self,
        model: str,
        estimate: int,
        attempt: Callable[[], T],
        *,
        to_dagster: bool | None = None,
    ) -> T:
        """``attempt`` (one request) through the one resilience path.

        A provider's 429 asking for a longer wait than the retries may take ends them: the
        caller gets the ``RateLimited`` itself (with its ``retry_after``), not the retry
        loop's ``MaxAttemptsExceeded`` wrapping it (the Dagster mapping is the same for both).
        """
        try:
            return self.resilience.call(
                self.service,
                attempt,
                limits=self._limits(model, estimate),
                dagster_errors=self._to_dagster() if to_dagster is None else to_dagster,
            )
        except MaxAttemptsExceeded as exc:  # only with Dagster errors off
            cause = exc.last_error
            max_delay = self.resilience.policy_for(self.service).retry.max_delay
            if not (isinstance(cause, RateLimited) and (cause.retry_after or 0) > max_delay):
                raise
        raise cause

    def _failure(self, exc: BaseException, *, to_dagster: bool | None = None) -> BaseException:
        """What to raise for ``exc`` raised outside the resilience call (invalid JSON, a
        broken stream): the Dagster mapping when it is on, else ``exc``."""
        if not (self._to_dagster() if to_dagster is None else to_dagster):
            return exc
        return self.resilience.dagster_error(exc, service=self.service)

    # -- the three calls -----------------------------------------------------------------------

    @overload
    def call(
        self,
        prompt: Prompt,
        *,
        system: System | None = ...,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        stop: str | list[str] | None = ...,
        json: Literal[False] = ...,
        timeout: float | None = ...,
        output: None = ...,
        output_retries: int = ...,
        prompt_cache_key: str | None = ...,
    ) -> str: ...

    @overload
    def call(
        self,
        prompt: Prompt,
        *,
        system: System | None = ...,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        stop: str | list[str] | None = ...,
        json: bool = ...,
        timeout: float | None = ...,
        output: Any,
        output_retries: int = ...,
        prompt_cache_key: str | None = ...,
    ) -> Any: ...

    @overload
    def call(
        self,
        prompt: Prompt,
        *,
        system: System | None = ...,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        stop: str | list[str] | None = ...,
        json: Literal[True],
        timeout: float | None = ...,
        output: Any = ...,
        output_retries: int = ...,
        prompt_cache_key: str | None = ...,
    ) -> Any: ...

    def call(
        self,
        prompt: Prompt,
        *,
        system: System | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        json: bool = False,
        timeout: float | None = None,
        output: Any = None,
        output_retries: int = 0,
        prompt_cache_key: str | None = None,
    ) -> Any:
        """The reply's text; with ``json=True`` the reply parsed as JSON; with ``output=`` (a
        pydantic model or a JSON schema) the validated reply (see :meth:`chat`).

        ``prompt`` is a string (one user message) or a list of ``{"role", "content"}``
        messages. Raises ``InvalidJSON`` (carrying the text) when ``json=True`` and the reply
        does not parse, ``MaxAttemptsExceeded`` when every attempt failed transiently,
        ``CircuitOpen`` while the breaker is open, and the provider's non-retryable error
        (``HTTPError`` 400/404/422 with its message, ``Unauthorized``, ``Forbidden``) at once.
        """
        response = self.chat(
            prompt,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            json=json,
            timeout=timeout,
            output=output,
            output_retries=output_retries,
            prompt_cache_key=prompt_cache_key,
        )
        if output is not None:
            return response.parsed
        return response.json() if json else response.text

    def chat(
        self,
        messages: Prompt,
        *,
        system: System | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        json: bool = False,
        timeout: float | None = None,
        tools: Sequence[Any] | None = None,
        tool_choice: str | None = None,
        output: Any = None,
        output_retries: int = 0,
        prompt_cache_key: str | None = None,
    ) -> LLMResponse:
        """The whole reply: text, model, stop reason, usage, tool calls, the SDK's object and
        attempts.

        With ``json=True`` the reply is checked to parse (``InvalidJSON`` otherwise). With
        ``tools=`` (functions, pydantic models or tool mappings; see :mod:`.tools`) the model
        may ask for tool calls: ``response.tool_calls``, ``stop_reason`` ``tool_use`` /
        ``tool_calls``; ``tool_choice`` is ``auto``, ``any``, ``none`` or a tool's name. With
        ``output=`` (a pydantic model or a JSON schema) the provider's schema mode is used and
        ``response.parsed`` is the validated reply; a reply that does not validate is sent
        back with the errors up to ``output_retries`` times, then raises ``InvalidOutput``.

        With ``fallbacks``, a primary whose circuit is open, that stays overloaded or failing
        (5xx, 529, timeouts) through its retries, or whose rate limit cannot be waited out, is
        replaced by the next fallback (its own model; ``model=`` names the primary's);
        ``response.fallback`` and ``response.model`` say which answered.
        """
        args: dict[str, Any] = {
            "messages": messages,
            "system": system,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stop": stop,
            "json": json,
            "timeout": timeout,
            "tools": tools,
            "tool_choice": tool_choice,
            "output": output,
            "output_retries": output_retries,
            "prompt_cache_key": prompt_cache_key,
        }
        if not self.fallbacks:
            return self._chat_single(args, model=model)
        index, response = self._first_to_answer(
            lambda index, candidate: candidate._chat_single(
                args, model=model if index == 0 else None, to_dagster=False
            ),
            model=model,
        )
        return replace(response, fallback=None if index == 0 else self.fallbacks[index - 1].label)

    def _first_to_answer(
        self,
        attempt: Callable[[int, LLMClient], T],
        *,
        model: str | None,
        **measures: Any,
    ) -> tuple[int, T]:
        """``attempt(index, candidate)`` on this client (index 0), then on each fallback in
        turn while the failure is one :func:`falls_back` moves on from, each move emitting
        ``flowstone.llm.fallback`` (with ``measures``); returns the index that answered and
        its result. The last failure is raised (mapped to Dagster when that is on).
        ``model``: the model asked of this client (``None``: its own)."""
        candidates = [self, *self.fallbacks]
        failure: BaseException | None = None
        for index, candidate in enumerate(candidates):
            try:
                return index, attempt(index, candidate)
            except Exception as exc:
                failure = exc
                if index + 1 < len(candidates) and falls_back(exc):
                    telemetry.emit(
                        "flowstone.llm.fallback",
                        outcome="ok",
                        error=None,
                        service=candidate.service,
                        model=model if index == 0 and model else candidate.model,
                        reason=type(_cause_of(exc)).__name__,
                        to=candidates[index + 1].label,
                        **measures,
                    )
                    continue
                break
        assert failure is not None
        mapped = self._failure(failure)
        if mapped is failure:
            raise failure
        raise mapped

    @property
    def label(self) -> str:
        """``provider:model`` (and the origin for a non-default endpoint): how a fallback is
        named in responses and telemetry."""
        default = DEFAULT_BASE_URLS.get(self.provider)
        where = "" if default and origin_of(default) == self.origin else f"@{self.origin}"
        return f"{self.provider}:{self.model}{where}"

    def _chat_single(
        self, args: dict[str, Any], *, model: str | None, to_dagster: bool | None = None
    ) -> LLMResponse:
        """:meth:`chat` on this endpoint alone."""
        output_retries = args["output_retries"]
        request = self._request(
            args["messages"],
            system=args["system"],
            model=model,
            max_tokens=args["max_tokens"],
            temperature=args["temperature"],
            stop=args["stop"],
            json=args["json"],
            timeout=args["timeout"],
            tools=args["tools"],
            tool_choice=args["tool_choice"],
            output=args["output"],
            prompt_cache_key=args["prompt_cache_key"],
        )
        if output_retries < 0:
            raise ConfigurationError(
                f"must not be negative, got {output_retries}", field="output_retries"
            )
        attempts = 0
        for repair in range(output_retries + 1):
            response = self._chat_once(
                request, check=repair == output_retries, to_dagster=to_dagster
            )
            attempts += response.attempts
            if request.output is None or repair == output_retries:
                break  # the last round was validated inside its event (``parsed`` set)
            try:
                parsed = request.output.validate(response.text, service=self.service)
            except InvalidOutput as exc:  # only before the last round (checked in it)
                request = replace(
                    request,
                    messages=[
                        *request.messages,
                        {"role": "assistant", "content": response.text or "(empty)"},
                        {
                            "role": "user",
                            "content": "Your reply does not follow the required JSON schema: "
                            f"{truncate(exc.errors, 1500)}\nReply again with JSON only.",
                        },
                    ],
                )
                continue
            return replace(response, parsed=parsed, attempts=attempts)
        return replace(response, attempts=attempts)

    def _chat_once(
        self, request: LLMRequest, *, check: bool = True, to_dagster: bool | None = None
    ) -> LLMResponse:
        """One reply through the resilience path, with its telemetry event; ``check``: a reply
        that does not parse (``json``) or validate (``output``) is raised, inside the event."""
        estimate = estimate_tokens(request.messages, request.system)
        measures = self._measures(request, stream=False)
        attempts = 0

        def attempt() -> LLMResponse:
            nonlocal attempts
            attempts += 1
            return self._send(request, self._adapter.create)

        started = time.perf_counter()
        parsed: Any = None
        try:
            budgets = self._take_budget(estimate)
            response = self._guarded(request.model, estimate, attempt, to_dagster=to_dagster)
            self._record_budget(budgets, estimate, response.usage)
            measures.update(_usage_measures(response.usage))
            measures.update(model=response.model or request.model, stop_reason=response.stop_reason)
            if request.tools:
                measures.update(tool_calls=len(response.tool_calls))
            self._record_actual(request.model, estimate, response.usage)
            if check and (request.json or request.output is not None):
                try:
                    # InvalidJSON / InvalidOutput, with the text, inside the event
                    if request.output is not None:
                        parsed = request.output.validate(response.text, service=self.service)
                    else:
                        response.json()
                except Exception as exc:
                    mapped = self._failure(exc, to_dagster=to_dagster)
                    if mapped is exc:
                        raise
                    raise mapped  # noqa: B904 - carries its own (redacted) cause
        except BaseException as exc:
            telemetry.emit(
                EVENT,
                duration_s=time.perf_counter() - started,
                attempts=max(attempts, 1),
                error=_reported(exc),
                **measures,
            )
            raise
        telemetry.emit(
            EVENT, duration_s=time.perf_counter() - started, attempts=attempts, **measures
        )
        return replace(response, provider=self.provider, attempts=attempts, parsed=parsed)

    def batch_request(
        self,
        prompt: Prompt,
        *,
        system: System | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
    ) -> dict[str, Any]:
        """The wire-format body :meth:`chat` would send for ``prompt`` (a batch item's)."""
        request = self._request(
            prompt,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=None,
            stop=None,
            json=False,
            timeout=None,
        )
        params: dict[str, Any] = self._adapter._params(request)  # type: ignore[attr-defined]
        params.pop("extra_headers", None)
        return params

    def batch(
        self,
        prompts: Sequence[Prompt],
        *,
        job: str,
        system: System | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        poll_interval: float = 5.0,
        max_poll_interval: float = 60.0,
        max_wait: float = 3600.0,
        context: Any = None,
    ) -> list[BatchResult]:
        """Run ``prompts`` as one provider batch job (half price, results within 24 h), in
        input order, resumable by ``job`` after a step restart; see :mod:`.batches`."""
        from flowstone_dagster.llm.batches import run_batch

        return run_batch(
            self,
            prompts,
            job=job,
            system=system,
            model=model,
            max_tokens=max_tokens,
            poll_interval=poll_interval,
            max_poll_interval=max_poll_interval,
            max_wait=max_wait,
            context=context,
        )

    def run_tools(
        self,
        messages: Prompt,
        *,
        tools: Sequence[Any],
        max_rounds: int = 8,
        **options: Any,
    ) -> ToolRun:
        """Let the model call Python ``tools`` until it answers without a tool call.

        ::

            def order_status(order_id: str) -> str:
                "The shipping status of one order."
                return db.status(order_id)

            run = llm.run_tools("Where is order 42?", tools=[order_status])
            run.response.text, run.rounds, run.messages

        Each round is one :meth:`chat` (limited, retried and counted like any call); every tool
        call of a round runs here and its result (or its exception's ``type: message``, marked
        as an error) is sent back. After ``max_rounds`` requests that still ask for tools,
        ``ToolLoopExceeded`` (with the last reply). ``options`` are :meth:`chat`'s.
        """
        if max_rounds < 1:
            raise ConfigurationError(f"must be at least 1, got {max_rounds}", field="max_rounds")
        specs = tool_specs(tools)
        runnable = {spec.name: spec for spec in specs}
        for spec in specs:
            if spec.function is None and spec.model is None:
                raise ConfigurationError(
                    f"tool {spec.name!r} has no Python function to run; run_tools needs "
                    "functions (or pydantic models, whose instance is the result)",
                    field="tools",
                )
        conversation: list[Message] = normalize_messages(messages)
        usage = Usage()
        calls = 0
        for rounds in range(1, max_rounds + 1):
            response = self.chat(conversation, tools=specs, **options)
            usage = _add_usage(usage, response.usage)
            conversation.append(response.message)
            if not response.tool_calls:
                return ToolRun(response, conversation, rounds, calls, usage)
            # One message with every result of the round (Anthropic requires them together,
            # right after the assistant's tool_use blocks; OpenAI gets one tool message each).
            blocks: list[Any] = []
            for call in response.tool_calls:
                calls += 1
                blocks.extend(_run_tool(runnable.get(call.name), call)["content"])
            conversation.append({"role": "user", "content": blocks})
        raise ToolLoopExceeded(
            f"the model still asked for tools after {max_rounds} rounds "
            f"({calls} tool calls); raise max_rounds or check the tools' results",
            response=response,
            rounds=max_rounds,
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        system: System | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
    ) -> LLMStream:
        """Stream the reply: iterate for text deltas; ``usage`` and friends are set at the end.

        The request is sent when iteration starts. Until the first text arrives, failures are
        retried like :meth:`call`'s, and with ``fallbacks`` a primary that cannot open the
        stream (as :meth:`chat` decides) is replaced by the next fallback (``stream.fallback``
        names it). A stream that breaks after its first text raises
        :class:`~.failures.StreamInterrupted` (with the text so far), never a silent
        truncation, and never moves to a fallback (the text handed out would be repeated).
        """

        def request_of(client: LLMClient, model: str | None) -> LLMRequest:
            return client._request(
                prompt,
                system=system,
                model=model,
                max_tokens=max_tokens,
                temperature=temperature,
                stop=stop,
                json=False,
                timeout=timeout,
            )

        return LLMStream(
            self, request_of(self, model), fallback_request=lambda f: request_of(f, None)
        )

    # -- the machinery -------------------------------------------------------------------------

    def _request(
        self,
        prompt: Prompt,
        *,
        system: System | None,
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        stop: str | list[str] | None,
        json: bool,
        timeout: float | None,
        tools: Sequence[Any] | None = None,
        tool_choice: str | None = None,
        output: Any = None,
        prompt_cache_key: str | None = None,
    ) -> LLMRequest:
        if self._closed.is_set():
            raise ConfigurationError("this LLM client is closed", field="client")
        system_text, messages = split_system(normalize_messages(prompt), system)
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ConfigurationError(f"must be at least 1, got {max_tokens}", field="max_tokens")
        timeout = self.timeout if timeout is None else timeout
        if timeout <= 0:
            raise ConfigurationError(f"must be positive, got {timeout}", field="timeout")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        _check_temperature(self.provider, temperature)
        specs = tool_specs(tools)
        if tool_choice not in (None, "auto", "any", "none") and tool_choice not in {
            spec.name for spec in specs
        }:
            raise ConfigurationError(
                f"must be auto, any, none or the name of one of the tools, got {tool_choice!r}",
                field="tool_choice",
            )
        if prompt_cache_key is not None and self.provider == "anthropic":
            raise ConfigurationError(
                "is OpenAI's; Anthropic caches the blocks marked with cache_control",
                field="prompt_cache_key",
            )
        return LLMRequest(
            model=model or self.model,
            messages=messages,
            system=system_text,
            max_tokens=max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            stop=stops,
            json=json,
            timeout=float(timeout),
            idle_timeout=self.stream_idle_timeout,
            tools=specs,
            tool_choice=tool_choice,
            output=output_spec(output),
            output_mode=self.structured_output,
            prompt_cache_key=prompt_cache_key,
        )

    def _measures(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "service": self.service,
            "model": request.model,
            "prompt_chars": prompt_chars(request.messages, request.system),
            "stream": stream,
        }

    def _timed(self, request: LLMRequest) -> LLMRequest:
        """``request`` with its timeout cut to the policy's per-attempt deadline, if sooner."""
        deadline = current_deadline()
        if deadline is None:
            return request
        remaining = max(deadline.remaining(), 0.001)
        if remaining >= request.timeout:
            return request
        return LLMRequest(**{**request.__dict__, "timeout": remaining})

    def _send(self, request: LLMRequest, send: Callable[[LLMRequest], T]) -> T:
        """One request; an SDK error becomes the taxonomy's, raised from a redacted chain
        (never from the SDK error itself, whose message may echo the key)."""
        timed = self._timed(request)
        try:
            return send(timed)
        except Exception as exc:
            mapped = self._map(exc, timed.timeout)
            if mapped is exc:
                raise
            cause = redact_exception_chain(exc, is_ours=FlowstoneError)
        if isinstance(mapped, RateLimited) and mapped.status == 429:
            self._provider_window_full(request.model)
        # Raised outside the except block: no implicit __context__ pointing at the SDK error.
        raise mapped from cause

    def _provider_window_full(self, model: str) -> None:
        """The provider answered 429 although our limiter admitted the request: its window,
        counted at arrival, is fuller than ours (requests reached it later than we admitted
        them). Fill our current window, in the shared store, so that no process sends more
        until it passes, instead of each earning its own 429 meanwhile."""
        if self.rpm is not None:
            self._fill("rpm", self.limit_name("rpm", model), 0.0)

    def _map(self, exc: BaseException, timeout: float | None) -> BaseException:
        return to_taxonomy(exc, service=self.service, secrets=self._secrets, timeout=timeout)

    def _take_budget(self, estimate: int) -> list[Budget]:
        """Take the prompt's estimate from the run's (and asset's) token budget, or raise
        ``BudgetExceeded`` (mapped to Dagster when that is on) before anything is sent."""
        found = budgets_for(self.run_token_budget, self.asset_token_budget)
        if found:
            try:
                take(self.resilience.store, found, float(estimate))
            except BudgetExceeded as exc:
                mapped = self._failure(exc)
                if mapped is exc:
                    raise
                raise mapped  # noqa: B904 - carries its own cause
        return found

    def _record_budget(self, found: list[Budget], estimate: int, usage: Usage) -> None:
        if not found:
            return
        try:
            record(self.resilience.store, found, float(usage.total_tokens - max(estimate, 1)))
        except Exception as exc:  # the call succeeded; its spend is logged, never lost silently
            logger.warning(
                "could not record %d tokens against a budget: %s", usage.total_tokens, exc
            )

    def _record_actual(self, model: str, estimate: int, usage: Usage) -> None:
        """Record the tokens the provider counted beyond the estimate taken before sending.

        They were spent already, so they are recorded at once (never waited for); callers that
        come next, in any process, wait for them to leave the window. Overestimates are not
        given back (the store has no refunds); the estimate is kept close instead. A store
        failure here is logged, never raised: the call itself succeeded.
        """
        name = self.limit_name("tpm", model)
        tpm = self._config_of("tpm", name) if self.tpm is not None else None
        if tpm is None or tpm.limit is None:
            return
        extra = usage.total_tokens - max(min(estimate, tpm.limit), 1)
        if extra <= 0:
            return
        try:
            self.resilience.store.reserve(name, float(extra), math.inf, tpm.period)
        except Exception as exc:
            logger.warning("could not record %d tokens of %s: %s", extra, self.service, exc)


class LLMStream:
    """An LLM reply as it arrives: iterate for text deltas.

    ::

        with llm.stream("Tell me a story") as stream:
            for delta in stream:
                print(delta, end="", flush=True)
        print(stream.usage, stream.stop_reason)

    After the last delta, ``text``, ``usage``, ``stop_reason``, ``model`` and ``response`` (an
    :class:`LLMResponse`) are set. A stream that breaks, or ends without the provider's final
    event, raises :class:`~.failures.StreamInterrupted` with ``partial_text``. Leaving the
    ``with`` block (or :meth:`close`) early closes the connection.

    Opening the stream (sending the request and reading until the first text) is one attempt
    of the resilience path, retried like any call; once text has been handed out, nothing is
    retried or replayed. The breaker therefore records the opening: a stream that breaks later
    raises ``StreamInterrupted`` but is not counted by the breaker.
    """

    def __init__(
        self,
        client: LLMClient,
        request: LLMRequest,
        *,
        fallback_request: Callable[[LLMClient], LLMRequest] | None = None,
    ) -> None:
        self._client = client
        self._request = request
        #: The request for a fallback of ``client`` (``None``: the stream does not fall back).
        self._fallback_request = fallback_request
        #: The fallback that answered (``provider:model``), ``None`` for the primary.
        self.fallback: str | None = None
        self._parts: list[str] = []
        self._iterator: Iterator[str] | None = None
        self.usage: Usage | None = None
        self.stop_reason: str | None = None
        self.model: str = request.model
        self.response: LLMResponse | None = None
        self.attempts = 0

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def __enter__(self) -> LLMStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading (and close the connection) if the stream has not ended."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]

    def _open(self) -> tuple[Iterator[str], str | None, StreamState]:
        """One attempt: send the request and read until the first text (or the end)."""
        client = self._client
        self.attempts += 1
        state = StreamState()

        def first(request: LLMRequest) -> tuple[Iterator[str], str | None]:
            deltas = client._adapter.stream(request, state)
            try:
                return deltas, next(deltas)
            except StopIteration:
                return deltas, None
            except BaseException:
                state.close()
                raise

        deltas, head = client._send(self._request, first)
        return deltas, head, state

    def _broken(self, exc: BaseException | None) -> StreamInterrupted:
        client = self._client
        if exc is None:
            return StreamInterrupted(
                f"the stream from {client.service} ended without its final event after "
                f"{len(self.text)} characters; the text so far is in partial_text",
                partial_text=self.text,
                service=client.service,
            )
        mapped = client._map(exc, self._request.timeout)
        if mapped is not exc:
            mapped.__cause__ = redact_exception_chain(exc, is_ours=FlowstoneError)
        interrupted = StreamInterrupted(
            f"the stream from {client.service} broke after {len(self.text)} characters: "
            f"{type(mapped).__name__}: {mapped}",
            partial_text=self.text,
            error=mapped,
            service=client.service,
        )
        interrupted.__cause__ = mapped
        return interrupted

    def _open_any(self, estimate: int) -> tuple[Iterator[str], str | None, StreamState]:
        """Open the stream on the primary, else on each fallback in turn (as :meth:`chat`
        does); the client and request that answered become the stream's."""
        primary, first_request = self._client, self._request
        fallback_request = self._fallback_request
        if not primary.fallbacks or fallback_request is None:
            return primary._guarded(first_request.model, estimate, self._open)

        def attempt(
            index: int, candidate: LLMClient
        ) -> tuple[Iterator[str], str | None, StreamState]:
            self._client = candidate
            self._request = first_request if index == 0 else fallback_request(candidate)
            return candidate._guarded(self._request.model, estimate, self._open, to_dagster=False)

        index, opened = primary._first_to_answer(attempt, model=first_request.model, stream=True)
        self.fallback = None if index == 0 else self._client.label
        return opened

    def _finish(self, state: StreamState, estimate: int) -> Usage:
        """Set ``usage``, ``stop_reason``, ``model`` and ``response`` at the stream's end."""
        usage = Usage(
            state.input_tokens if state.input_tokens is not None else estimate,
            state.output_tokens
            if state.output_tokens is not None
            else estimate_tokens([{"role": "assistant", "content": self.text}]),
            state.cache_read_tokens,
            state.cache_write_tokens,
        )
        self.usage, self.stop_reason = usage, state.stop_reason
        self.model = state.model or self._request.model
        self.response = LLMResponse(
            text=self.text,
            model=self.model,
            stop_reason=self.stop_reason,
            usage=usage,
            raw=state.events,
            provider=self._client.provider,
            attempts=self.attempts,
            fallback=self.fallback,
        )
        return usage

    def _run(self) -> Iterator[str]:
        client, request = self._client, self._request
        estimate = estimate_tokens(request.messages, request.system)
        measures = client._measures(request, stream=True)
        started = time.perf_counter()
        opened = False
        outcome, error = "ok", None
        try:
            budgets = client._take_budget(estimate)
            deltas, head, state = self._open_any(estimate)
            opened = True
            if self._client is not client:  # a fallback answered
                client, request = self._client, self._request
                measures.update(service=client.service, model=request.model, fallback=self.fallback)
            broken: StreamInterrupted | None = None
            try:
                if head is not None:
                    self._parts.append(head)
                    yield head
                for delta in deltas:
                    self._parts.append(delta)
                    yield delta
                if not state.complete:
                    broken = self._broken(None)
            except GeneratorExit:
                outcome = "cancelled"
                state.close()
                raise
            except Exception as exc:
                broken = self._broken(exc)
            if broken is not None:
                # Raised outside the except block: no implicit __context__ (the SDK's error).
                raise client._failure(broken)
        except GeneratorExit:
            raise
        except BaseException as exc:
            outcome, error = "error", _reported(exc)
            raise
        else:
            usage = self._finish(state, estimate)
            client._record_actual(request.model, estimate, usage)
            client._record_budget(budgets, estimate, usage)
            measures.update(_usage_measures(usage))
            measures.update(model=self.model, stop_reason=self.stop_reason)
        finally:
            if outcome != "ok" and opened:
                measures.update(output_chars=len(self.text))
            telemetry.emit(
                EVENT,
                outcome=outcome if error is None else None,
                error=error,
                duration_s=time.perf_counter() - started,
                attempts=max(self.attempts, 1),
                **measures,
            )


def _check_temperature(provider: str, temperature: float | None) -> None:
    if provider == "anthropic" and temperature is not None:
        raise ConfigurationError(
            "the Messages API of the installed anthropic SDK (2.x) has no temperature; leave it "
            "unset for provider anthropic",
            field="temperature",
        )


@dataclass(frozen=True)
class ToolRun:
    """What :meth:`LLMClient.run_tools` did: the final reply, the whole conversation (to go
    on with), the requests made (``rounds``), the tool calls run and the summed usage."""

    response: LLMResponse
    messages: list[Message]
    rounds: int
    tool_calls: int
    usage: Usage


def _run_tool(spec: ToolSpec | None, call: ToolCall) -> Message:
    """Run one tool call; its result, or its failure, as the message to send back."""
    if spec is None:
        return tool_result(call, f"unknown tool {call.name!r}", is_error=True)
    try:
        if spec.function is not None:
            result = spec.function(**call.arguments)
        else:
            assert spec.model is not None
            result = spec.model.model_validate(call.arguments).model_dump(mode="json")
    except Exception as exc:  # the model sees the failure and may recover
        return tool_result(call, f"{type(exc).__name__}: {truncate(str(exc), 500)}", is_error=True)
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    return tool_result(call, result)


def _add_usage(total: Usage, more: Usage) -> Usage:
    return Usage(
        total.input_tokens + more.input_tokens,
        total.output_tokens + more.output_tokens,
        total.cache_read_tokens + more.cache_read_tokens,
        total.cache_write_tokens + more.cache_write_tokens,
    )


def _usage_measures(usage: Usage) -> dict[str, int]:
    measures = {"input_tokens": usage.input_tokens, "output_tokens": usage.output_tokens}
    if usage.cache_read_tokens or usage.cache_write_tokens:
        measures["cache_read_tokens"] = usage.cache_read_tokens
        measures["cache_write_tokens"] = usage.cache_write_tokens
    return measures


#: HTTP statuses after which a call goes to the next fallback: the provider is failing or
#: overloaded, not the request.
FALLBACK_STATUSES = frozenset({500, 502, 503, 504, 529})


def _cause_of(exc: BaseException) -> BaseException:
    return exc.last_error if isinstance(exc, MaxAttemptsExceeded) else exc


def falls_back(exc: BaseException) -> bool:
    """Whether a failed call goes to the next fallback: an open circuit, a rate limit that
    cannot be waited out (the provider's 429 or our own limiter), a provider failing or
    overloaded (500, 502, 503, 504, 529) or unreachable (timeouts, connection errors) through
    every retry. Never a request the provider refused (4xx): another model would too."""
    cause = _cause_of(exc)
    if isinstance(cause, (CircuitOpen, RateLimited, CallTimeout, TransportError)):
        return not isinstance(cause, StreamInterrupted)
    return isinstance(cause, HTTPError) and cause.status in FALLBACK_STATUSES
