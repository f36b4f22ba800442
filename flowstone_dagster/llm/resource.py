"""``LLMResource``: a language model for Dagster assets, reliable under rate limits.

::

    import dagster as dg
    from flowstone_dagster import telemetry
    from flowstone_dagster.resilience import RECOMMENDED_RETRY_POLICY, ResilienceResource
    from flowstone_dagster.llm import LLMResource

    @dg.asset(retry_policy=RECOMMENDED_RETRY_POLICY)
    def ticket_labels(context: dg.AssetExecutionContext, llm: LLMResource) -> list[str]:
        with telemetry.observe(context):  # flowstone/llm.call/input_tokens, ... on the output
            return [llm.call(f"Label this ticket: {t}", max_tokens=5) for t in TICKETS]

    resilience = ResilienceResource()  # breakers and limits shared by every step process

    defs = dg.Definitions(
        assets=[ticket_labels],
        resources={
            "llm": LLMResource(
                provider="anthropic",
                model="claude-sonnet-5-5",
                api_key=dg.EnvVar("ANTHROPIC_API_KEY"),
                rpm_limit=50,
                tpm_limit=40_000,
                resilience=resilience,
            ),
            "local_llm": LLMResource(
                provider="openai_compatible",
                model="llama3.2",
                base_url="http://localhost:11434/v1",
            ),
        },
    )

The resource is a thin, configurable front of :class:`~.client.LLMClient` (which does the
work and documents it). Every request goes through ``resilience``
(:meth:`ResilienceResource.call <flowstone_dagster.resilience.ResilienceResource.call>`, the
package's one resilience path): its policy for the resource's ``service`` (retries, breaker,
per-attempt timeout), with the rpm/tpm limits passed to it per call. Without ``resilience``,
:data:`~.client.DEFAULT_POLICY` applies on an in-process store (the breaker and the limits then
protect one process only). Out-of-range fields (a negative limit or timeout) fail when the
resource is built (pydantic's ``ValidationError``); a missing key or no ``base_url`` for a local
server fails at resource set-up, before any request; both name the field.

What escapes a call is mapped to Dagster control flow by the resilience resource
(:meth:`~flowstone_dagster.resilience.ResilienceResource.dagster_error`) when its
``dagster_errors`` is on (the default): an open circuit or a long rate-limit wait becomes
``RetryRequested``, a failure that retrying cannot fix ``Failure(allow_retries=False)``. With
``ResilienceResource(dagster_errors=False)`` the taxonomy's errors come unchanged.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.llm.batches import BatchResult
from flowstone_dagster.llm.client import (
    DEFAULT_MAX_TOKENS,
    DEFAULT_RATE_LIMIT_MARGIN,
    DEFAULT_RATE_LIMIT_MAX_WAIT,
    DEFAULT_RPM_WINDOW,
    DEFAULT_TIMEOUT,
    LLMClient,
    LLMStream,
    ToolRun,
)
from flowstone_dagster.llm.messages import LLMResponse, Prompt, System
from flowstone_dagster.redaction import register_secret
from flowstone_dagster.resilience import ResilienceResource

__all__ = ["API_KEY_ENV", "LLMFallback", "LLMResource"]

#: Fields given to ``LLMClient`` otherwise than as their value: the resolved key, and the
#: resilience resource itself (not its dump).
_NOT_COPIED = {"api_key", "resilience", "fallbacks"}

#: The environment variable read when ``api_key`` is not set.
API_KEY_ENV = {"anthropic": "ANTHROPIC_API_KEY", "openai": "OPENAI_API_KEY"}


class LLMFallback(dg.Config):
    """A model tried when the resource's own cannot answer (see ``LLMResource.fallbacks``).

    Fields not given here (``max_tokens``, ``timeout``, ``rpm_window``, the waits, the
    resilience resource) are the resource's."""

    provider: Literal["anthropic", "openai", "openai_compatible"] = Field(
        description="anthropic, openai or openai_compatible."
    )
    model: str = Field(description="The model, e.g. gpt-4o-mini.")
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="API key; pass dg.EnvVar('...'). Null: $ANTHROPIC_API_KEY or "
        "$OPENAI_API_KEY for those providers.",
    )
    base_url: str | None = Field(
        default=None, description="Endpoint; null: the provider's (required for local servers)."
    )
    rpm_limit: float | None = Field(
        default=None, gt=0, description="Requests per minute for this endpoint and model."
    )
    tpm_limit: float | None = Field(
        default=None, ge=1, description="Tokens per minute for this endpoint and model."
    )
    service: str | None = Field(
        default=None, description="Breaker and policy name; null: llm:<provider>:<origin>."
    )
    structured_output: Literal["native", "json_mode", "prompt"] = Field(
        default="native",
        description="How output= reaches this model (as LLMResource.structured_output; not "
        "inherited: each endpoint states its own).",
    )


class LLMResource(dg.ConfigurableResource):
    """Calls an Anthropic, OpenAI or OpenAI-compatible (Ollama, vLLM, llama.cpp) model.

    ``call(prompt)`` returns the text (with ``json=True`` the parsed JSON), ``chat(messages)``
    an :class:`~.messages.LLMResponse`, ``stream(prompt)`` an :class:`~.client.LLMStream` of
    text deltas. See ``docs/llm.md``.
    """

    provider: Literal["anthropic", "openai", "openai_compatible"] = Field(
        description="anthropic (Messages API), openai (Chat Completions) or openai_compatible "
        "(a local server speaking the Chat Completions API: Ollama, vLLM, llama.cpp)."
    )
    model: str = Field(description="Default model of every call, e.g. claude-sonnet-5-5.")
    api_key: str | None = Field(
        default=None,
        repr=False,
        description="API key; pass dg.EnvVar('...'). Null: $ANTHROPIC_API_KEY or "
        "$OPENAI_API_KEY for those providers (a missing key fails at set-up); "
        "openai_compatible sends no key unless one is given.",
    )
    base_url: str | None = Field(
        default=None,
        description="Endpoint. Default https://api.anthropic.com or https://api.openai.com/v1; "
        "required for openai_compatible (e.g. http://localhost:11434/v1).",
    )
    max_tokens: int = Field(
        default=DEFAULT_MAX_TOKENS, ge=1, description="Default cap on a reply's tokens."
    )
    temperature: float | None = Field(
        default=None, description="Default sampling temperature; null: the provider's."
    )
    timeout: float = Field(
        default=DEFAULT_TIMEOUT,
        gt=0,
        description="Seconds one request may take as a whole (a body trickling past it, or a "
        "stream from sending to its last event, is cut: CallTimeout); cut to the resilience "
        "policy's per-attempt timeout when that is sooner. A call's `timeout=` overrides it.",
    )
    stream_idle_timeout: float | None = Field(
        default=None,
        gt=0,
        description="For a stream, the longest silence between two events, in seconds. Null: "
        "timeout.",
    )
    rpm_limit: float | None = Field(
        default=None,
        gt=0,
        description="Requests per minute for this endpoint and model, for every process "
        "sharing the resilience store; callers wait for their turn instead of earning 429s. "
        "Null: no limit.",
    )
    rpm_window: float = Field(
        default=DEFAULT_RPM_WINDOW,
        gt=0,
        description="Seconds over which rpm_limit is enforced: rpm_limit * rpm_window / 60 "
        "requests per window (at least one), so that requests go out evenly spread; providers "
        "enforce per-minute limits over short windows too.",
    )
    tpm_limit: float | None = Field(
        default=None,
        ge=1,
        description="Tokens (input + output) per minute for this endpoint and model, for every "
        "process sharing the resilience store; estimated from the prompt before sending, "
        "corrected from usage after. Null: no limit.",
    )
    rate_limit_max_wait: float = Field(
        default=DEFAULT_RATE_LIMIT_MAX_WAIT,
        ge=0,
        description="Longest wait for rpm/tpm capacity in seconds, then RateLimited (also "
        "bounded by the policy's retry deadline and, with Dagster errors on, by the resilience "
        "resource's retry_requested_after).",
    )
    rate_limit_margin: float = Field(
        default=DEFAULT_RATE_LIMIT_MARGIN,
        ge=0,
        description="How much longer our rate windows are than the provider's, as a fraction "
        "(0.03 = 3 %): absorbs the varying delay between our admission and the provider's "
        "count, at the price of running that much below the limit.",
    )
    service: str | None = Field(
        default=None,
        description="Name of the circuit breaker and of the policy in `resilience`, errors and "
        "telemetry. Null: llm:<provider>:<origin of base_url> (e.g. "
        "llm:openai:https://api.openai.com), so that endpoints never share a breaker.",
    )
    resilience: ResilienceResource | None = Field(
        default=None,
        description="The resilience resource every request goes through (policy `service`; "
        "its store holds the breaker and the rpm/tpm limits). Null: 4 attempts honouring "
        "retry-after, a breaker of 5 failures / 30 s, both in this process's memory.",
    )

    run_token_budget: float | None = Field(
        default=None,
        ge=1,
        description="Tokens (input + output) one Dagster run may spend through this resource, "
        "shared by the run's step processes through the resilience store; a call that does "
        "not fit raises BudgetExceeded (not retried) before sending. Null: no budget.",
    )
    asset_token_budget: float | None = Field(
        default=None,
        ge=1,
        description="The same per asset (per step for ops) of a run. Null: no budget.",
    )
    structured_output: Literal["native", "json_mode", "prompt"] = Field(
        default="native",
        description="How output= reaches the model: native (the provider's schema mode: "
        "Anthropic's output_config, OpenAI's json_schema response_format, which Ollama, vLLM, "
        "llama.cpp and LM Studio also take), json_mode (the json_object response_format and "
        "the schema in the system prompt, for compatible servers without a schema mode) or "
        "prompt (the schema in the system prompt only). The reply is validated in every mode.",
    )
    fallbacks: list[LLMFallback] = Field(
        default_factory=list,
        description="Models tried in order when this one's circuit is open, it stays "
        "overloaded or failing (5xx, 529, timeouts) through its retries, or its rate limit "
        "cannot be waited out; the response (`fallback`, `model`) and the metadata "
        "(flowstone/llm/models) name the model that answered. A stream falls back only before "
        "its first text.",
    )

    _client: LLMClient | None = PrivateAttr(default=None)
    _lock: threading.Lock = PrivateAttr(default_factory=threading.Lock)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Build the client now, so that a missing key or bad field fails before any request."""
        self.client()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        with self._lock:
            if self._client is not None:
                for fallback in self._client.fallbacks:
                    fallback.close()
                self._client.close()
                self._client = None

    def _fallback_client(self, entry: LLMFallback, fields: dict[str, Any]) -> LLMClient:
        key = entry.api_key
        variable = API_KEY_ENV.get(entry.provider)
        if not key and variable:
            key = os.environ.get(variable)
            if not key:
                raise ConfigurationError(
                    f"no API key for the {entry.provider} fallback {entry.model!r}: set its "
                    f"api_key=dg.EnvVar('{variable}') or export {variable}",
                    field="fallbacks.api_key",
                )
        register_secret(key)
        own = entry.model_dump(exclude={"api_key"})
        inherited = {name: value for name, value in fields.items() if name not in own}
        if entry.provider == "anthropic":
            inherited.pop("temperature", None)  # the Messages API of anthropic 2.x has none
        return LLMClient(
            **inherited,
            **own,
            api_key=key,
            resilience=self.resilience,
            dagster_errors=None,
        )

    def resolved_api_key(self) -> str | None:
        """``api_key``, else the provider's environment variable (none for local servers)."""
        if self.api_key:
            return self.api_key
        variable = API_KEY_ENV.get(self.provider)
        key = os.environ.get(variable) if variable else None
        if variable and not key:
            raise ConfigurationError(
                f"no API key: set api_key=dg.EnvVar('{variable}') or export {variable}",
                field="api_key",
            )
        return key

    def client(self) -> LLMClient:
        """The :class:`~.client.LLMClient` this resource configures (built once)."""
        with self._lock:
            if self._client is None:
                api_key = self.resolved_api_key()
                register_secret(api_key)  # every redaction in the process hides it from now on
                # Every other field is LLMClient's argument of the same name: a field added
                # here reaches the client (or fails loudly if LLMClient lacks it).
                fields = self.model_dump(exclude=_NOT_COPIED)
                fallbacks = [self._fallback_client(entry, fields) for entry in self.fallbacks]
                self._client = LLMClient(
                    **fields,
                    api_key=api_key,
                    resilience=self.resilience,
                    dagster_errors=None,  # the resilience resource's setting
                    fallbacks=fallbacks,
                )
            return self._client

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
        """The reply's text (``json=True``: the parsed JSON; ``output=``: the validated reply);
        see :meth:`LLMClient.call`."""
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
        """The whole reply as an :class:`LLMResponse` (text, usage, ``tool_calls``,
        ``parsed``); see :meth:`LLMClient.chat`."""
        return self.client().chat(
            messages,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            json=json,
            timeout=timeout,
            tools=tools,
            tool_choice=tool_choice,
            output=output,
            output_retries=output_retries,
            prompt_cache_key=prompt_cache_key,
        )

    def get_client(self, context: Any = None) -> Any:
        """The official SDK client (``anthropic.Anthropic`` / ``openai.OpenAI``), governed:
        each of its requests goes through this resource's breaker, rpm limit, retries and
        telemetry, and its usage counts in the step's ``flowstone/llm/...`` metadata (as
        ``dagster-openai``'s ``get_client(context)``); ``context`` makes that work from worker
        threads too. Usable as a context manager (``with llm.get_client(context) as sdk``)."""
        return self.client().sdk_client(context)

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
        """``prompts`` as one Anthropic / OpenAI batch job, results in input order, resumed
        after a step restart; see :meth:`LLMClient.batch` and ``docs/llm.md``."""
        return self.client().batch(
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
        self, messages: Prompt, *, tools: Sequence[Any], max_rounds: int = 8, **options: Any
    ) -> ToolRun:
        """Let the model call Python ``tools`` until it answers; see
        :meth:`LLMClient.run_tools`."""
        return self.client().run_tools(messages, tools=tools, max_rounds=max_rounds, **options)

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
        """Text deltas as they arrive; usage at the end. See :meth:`LLMClient.stream`."""
        return self.client().stream(
            prompt,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            timeout=timeout,
        )

    def stream_text(self, prompt: Prompt, **kwargs: Any) -> Iterator[str]:
        """The text deltas of :meth:`stream` (failures mapped as any call's)."""
        with self.stream(prompt, **kwargs) as stream:
            yield from stream
