"""One adapter per provider: a provider-neutral :class:`LLMRequest` in, SDK call, reply out.

The adapters make exactly one HTTP request per call, through the official SDK with its own
retries off (``max_retries=0``); retrying, rate limiting and circuit breaking are the job of
the one resilience path (:class:`~flowstone_dagster.resilience.ResilienceResource`), through
which :class:`~flowstone_dagster.llm.client.LLMClient` sends each request. SDK
exceptions leave the adapters unchanged (the client maps them with
:func:`~.failures.to_taxonomy`).

=====================  ============================  =========================================
provider               endpoint                      request
=====================  ============================  =========================================
``anthropic``          ``POST {base}/v1/messages``   ``system`` as the top-level field,
                                                     ``max_tokens``, ``stop_sequences``
``openai``             ``POST {base}/chat/           ``system`` as the first message,
                       completions``                 ``max_completion_tokens``, ``stop``,
                                                     ``response_format`` for JSON
``openai_compatible``  the same, at ``base_url``     ``max_tokens`` (what Ollama, vLLM and
                       (Ollama, vLLM, llama.cpp)     llama.cpp's server read)
=====================  ============================  =========================================
"""

from __future__ import annotations

import json as jsonlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar

import anthropic
import httpx2
import openai

from flowstone_dagster.llm.deadlines import RequestDeadline
from flowstone_dagster.llm.deadlines import on_response as watch_deadline
from flowstone_dagster.llm.messages import LLMResponse, Message, System, Usage
from flowstone_dagster.llm.tools import InvalidOutput, OutputSpec, ToolCall, ToolSpec

__all__ = [
    "DEFAULT_BASE_URLS",
    "JSON_INSTRUCTION",
    "OUTPUT_INSTRUCTION",
    "AnthropicAdapter",
    "LLMRequest",
    "OpenAIAdapter",
    "ProviderAdapter",
    "ProviderName",
    "StructuredOutput",
    "anthropic_response",
    "openai_response",
    "RequestHook",
    "StreamState",
    "make_adapter",
]

ProviderName = Literal["anthropic", "openai", "openai_compatible"]

T = TypeVar("T")

#: Called in the calling thread just before each request goes on the wire (after the SDK has
#: built it): where the client has the request check its rate admission at the wire (see
#: :mod:`.wire`), so that what the provider counts is what the limiter admitted.
RequestHook = Callable[[httpx2.Request], None]
#: Called in the calling thread with each response, before the SDK reads it (429s included):
#: where the client reads the provider's rate-limit headers.
ResponseHook = Callable[[httpx2.Response], None]

DEFAULT_BASE_URLS: dict[str, str] = {
    "anthropic": "https://api.anthropic.com",
    "openai": "https://api.openai.com/v1",
}

# _WARM_UP: the adapters resolve the SDK's lazily imported resources (``client.messages``,
# ``client.chat.completions``) when they are built. The rate-limit admission is taken by the
# resilience path before the SDK builds the request; a first request that spent ~15 ms
# importing after its admission would reach the provider late, bunched with the next ones.

#: Added to the system prompt when ``json=True`` (OpenAI's JSON mode also requires the word
#: "JSON" to appear in the messages).
JSON_INSTRUCTION = (
    "Reply with one valid JSON value and nothing else: no prose, no Markdown code fences."
)
#: Added to the system prompt when ``output=`` is asked of a server without a schema mode
#: (``structured_output="json_mode"`` or ``"prompt"``), before the schema itself.
OUTPUT_INSTRUCTION = (
    "Reply with one JSON object that validates against this JSON schema, and nothing else: "
    "no prose, no Markdown code fences. The schema:"
)

#: How ``output=`` reaches the model: ``native``, the provider's schema mode (Anthropic's
#: ``output_config``, OpenAI's ``response_format`` of type ``json_schema``; also Ollama, vLLM,
#: llama.cpp's and LM Studio's servers); ``json_mode``, OpenAI's ``json_object`` mode with the
#: schema in the system prompt (servers without schema mode); ``prompt``, the schema in the
#: system prompt only. The reply is validated in every mode.
StructuredOutput = Literal["native", "json_mode", "prompt"]


@dataclass(frozen=True)
class LLMRequest:
    """Everything one call sends, already validated."""

    model: str
    messages: list[Message]
    system: System | None
    max_tokens: int
    temperature: float | None = None
    stop: tuple[str, ...] = ()
    json: bool = False
    tools: tuple[ToolSpec, ...] = ()
    #: ``auto`` (the model decides), ``any`` (it must call one), ``none``, or a tool's name.
    tool_choice: str | None = None
    output: OutputSpec | None = None
    #: How ``output`` is asked for (see :data:`StructuredOutput`).
    output_mode: StructuredOutput = "native"
    #: OpenAI's ``prompt_cache_key`` (routes requests sharing a prefix to one cache).
    prompt_cache_key: str | None = None
    #: Seconds the whole request may take (for a stream: from sending to its last event).
    timeout: float = 120.0
    #: For a stream: the longest silence between two events (``None``: ``timeout``).
    idle_timeout: float | None = None

    @property
    def native_output(self) -> bool:
        """Whether ``output`` is sent as the provider's schema mode."""
        return self.output is not None and self.output_mode == "native"

    def system_prompt(self) -> System | None:
        """``system``, with the JSON instruction (``json=True``) or the output schema
        (``output=`` outside the native schema mode) appended."""
        if self.output is not None and self.output_mode != "native":
            schema = jsonlib.dumps(self.output.schema, separators=(",", ":"))
            extra = f"{OUTPUT_INSTRUCTION}\n{schema}"
        elif self.json:
            extra = JSON_INSTRUCTION
        else:
            return self.system
        if isinstance(self.system, list):
            return [*self.system, {"type": "text", "text": extra}]
        return f"{self.system}\n\n{extra}" if self.system else extra


@dataclass
class StreamState:
    """What a stream has said so far besides its text; ``complete`` once its final event came."""

    model: str = ""
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    complete: bool = False
    events: list[Any] = field(default_factory=list)
    close: Callable[[], None] = lambda: None


def openai_response(completion: Any, provider: str) -> LLMResponse:
    """A Chat Completions ``ChatCompletion`` as an :class:`LLMResponse`."""
    choice = completion.choices[0] if completion.choices else None
    calls: list[ToolCall] = []
    for call in (choice.message.tool_calls or []) if choice is not None else []:
        function = getattr(call, "function", None)
        if function is None:  # a custom (non-function) tool call: not ours
            continue
        try:
            arguments = jsonlib.loads(function.arguments or "{}")
        except ValueError:
            raise InvalidOutput(
                f"the arguments of the model's call of {function.name} are not JSON: "
                f"{function.arguments[:200]!r}",
                text=function.arguments,
            ) from None
        calls.append(ToolCall(call.id, function.name, arguments))
    return LLMResponse(
        text=(choice.message.content or "") if choice is not None else "",
        model=completion.model,
        stop_reason=choice.finish_reason if choice is not None else None,
        usage=openai_usage(completion.usage),
        raw=completion,
        provider=provider,
        tool_calls=tuple(calls),
    )


def anthropic_response(message: Any, provider: str) -> LLMResponse:
    """An Anthropic ``Message`` as an :class:`LLMResponse`."""
    text = "".join(block.text for block in message.content if block.type == "text")
    calls = tuple(
        ToolCall(block.id, block.name, dict(block.input))
        for block in message.content
        if block.type == "tool_use"
    )
    return LLMResponse(
        text=text,
        model=message.model,
        stop_reason=message.stop_reason,
        usage=anthropic_usage(message.usage),
        raw=message,
        provider=provider,
        tool_calls=calls,
    )


def anthropic_usage(usage: Any) -> Usage:
    """Anthropic's usage, neutral: ``input_tokens`` there excludes the cached tokens."""
    read = getattr(usage, "cache_read_input_tokens", None) or 0
    written = getattr(usage, "cache_creation_input_tokens", None) or 0
    return Usage(usage.input_tokens + read + written, usage.output_tokens, read, written)


def openai_usage(usage: Any) -> Usage:
    """OpenAI's usage, neutral: ``prompt_tokens`` there includes the cached tokens."""
    if usage is None:
        return Usage()
    details = getattr(usage, "prompt_tokens_details", None)
    read = (getattr(details, "cached_tokens", None) or 0) if details is not None else 0
    written = (getattr(details, "cache_write_tokens", None) or 0) if details is not None else 0
    return Usage(usage.prompt_tokens, usage.completion_tokens, read, written)


def _openai_content(content: Any) -> Any:
    """Content for Chat Completions: text blocks without Anthropic's ``cache_control``
    (OpenAI caches prompt prefixes by itself)."""
    if isinstance(content, str):
        return content
    return [
        {key: value for key, value in block.items() if key != "cache_control"}
        if isinstance(block, dict)
        else block
        for block in content
    ]


def _openai_messages(message: Message) -> list[Message]:
    """One neutral message as Chat Completions messages: an assistant's ``tool_use`` blocks
    become ``tool_calls``, each ``tool_result`` block a ``role: "tool"`` message."""
    content = message["content"]
    if isinstance(content, str):
        return [message]
    kinds = {block.get("type") for block in content if isinstance(block, dict)}
    if message["role"] == "assistant" and "tool_use" in kinds:
        text = "".join(
            str(block.get("text", "")) for block in content if block.get("type") == "text"
        )
        return [
            {
                "role": "assistant",
                "content": text or None,
                "tool_calls": [
                    {
                        "id": block["id"],
                        "type": "function",
                        "function": {
                            "name": block["name"],
                            "arguments": jsonlib.dumps(block.get("input", {})),
                        },
                    }
                    for block in content
                    if block.get("type") == "tool_use"
                ],
            }
        ]
    if "tool_result" in kinds:
        results: list[Message] = []
        others = []
        for block in content:
            if isinstance(block, dict) and block.get("type") == "tool_result":
                result = block.get("content", "")
                if not isinstance(result, str):
                    result = "".join(str(part.get("text", "")) for part in result)
                results.append(
                    {"role": "tool", "tool_call_id": block["tool_use_id"], "content": result}
                )
            else:
                others.append(block)
        if others:
            results.append({"role": message["role"], "content": _openai_content(others)})
        return results
    return [{"role": message["role"], "content": _openai_content(content)}]


def _strict_ok(schema: Any) -> bool:
    """Whether OpenAI's strict schema mode accepts ``schema``: every object closed and every
    property required (a model field with a default is not)."""
    if isinstance(schema, dict):
        if schema.get("type") == "object":
            properties = schema.get("properties", {})
            if schema.get("additionalProperties") is not False:
                return False
            if set(properties) != set(schema.get("required", ())):
                return False
        return all(_strict_ok(value) for value in schema.values())
    if isinstance(schema, list):
        return all(_strict_ok(value) for value in schema)
    return True


def whole(request: LLMRequest, send: Callable[[], T]) -> T:
    """``send()`` (one SDK request) within ``request.timeout`` as a whole: a body trickling
    past it is cut (:mod:`.deadlines`) and reported as :class:`WholeRequestTimeout`."""
    deadline = RequestDeadline(request.timeout)
    try:
        with deadline.watching():
            return send()
    except Exception as exc:
        if deadline.expired:
            raise deadline.timeout_error(exc) from None
        raise
    finally:
        deadline.close()


def _idle(request: LLMRequest, deadline: RequestDeadline) -> float:
    """The SDK's per-read timeout of a stream: the idle timeout, within the whole deadline."""
    idle = request.timeout if request.idle_timeout is None else request.idle_timeout
    return min(idle, deadline.remaining())


def _opened(deadline: RequestDeadline, send: Callable[[], T]) -> T:
    """Open a stream (``send()``) under ``deadline``, which stays on until the stream ends."""
    try:
        with deadline.watching():
            return send()
    except Exception as exc:
        deadline.close()
        if deadline.expired:
            raise deadline.timeout_error(exc) from None
        raise


@contextmanager
def _watched(deadline: RequestDeadline) -> Iterator[None]:
    """A stream's events under its whole deadline: a cut is a :class:`WholeRequestTimeout`."""
    try:
        yield
    except Exception as exc:
        if deadline.expired:
            raise deadline.timeout_error(exc) from None
        raise
    finally:
        deadline.close()


class ProviderAdapter(Protocol):
    """What :class:`~.client.LLMClient` needs from a provider."""

    name: str

    def create(self, request: LLMRequest) -> LLMResponse:
        """Send one request and return the reply."""
        ...

    def stream(self, request: LLMRequest, state: StreamState) -> Iterator[str]:
        """Send one streaming request; yield text deltas, recording the rest in ``state``."""
        ...

    def close(self) -> None:
        """Close the SDK client's connections."""
        ...


class AnthropicAdapter:
    """The Messages API through the ``anthropic`` SDK."""

    name = "anthropic"

    def __init__(
        self,
        *,
        api_key: str,
        base_url: str,
        timeout: float,
        on_request: RequestHook,
        on_response: ResponseHook,
    ) -> None:
        self.client = anthropic.Anthropic(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            http_client=anthropic.DefaultHttpxClient(
                event_hooks={
                    "request": [on_request],
                    "response": [watch_deadline, on_response],
                }
            ),
        )
        _ = self.client.messages  # see _WARM_UP

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "max_tokens": request.max_tokens,
            "messages": request.messages,
        }
        system = request.system_prompt()
        if system:
            params["system"] = system
        if request.stop:
            params["stop_sequences"] = list(request.stop)
        if request.tools:
            params["tools"] = [tool.anthropic() for tool in request.tools]
        if request.tool_choice is not None:
            choice = request.tool_choice
            params["tool_choice"] = (
                {"type": choice}
                if choice in ("auto", "any", "none")
                else {"type": "tool", "name": choice}
            )
        if request.native_output:
            assert request.output is not None
            params["output_config"] = {
                "format": {"type": "json_schema", "schema": request.output.schema}
            }
        return params

    def create(self, request: LLMRequest) -> LLMResponse:
        message = whole(
            request,
            lambda: self.client.messages.create(**self._params(request), timeout=request.timeout),
        )
        return anthropic_response(message, self.name)

    def stream(self, request: LLMRequest, state: StreamState) -> Iterator[str]:
        deadline = RequestDeadline(request.timeout)
        events = _opened(
            deadline,
            lambda: self.client.messages.create(
                **self._params(request), stream=True, timeout=_idle(request, deadline)
            ),
        )
        state.close = events.close
        with events, _watched(deadline):
            for event in events:
                state.events.append(event)
                if event.type == "message_start":
                    state.model = event.message.model
                    usage = anthropic_usage(event.message.usage)
                    state.input_tokens = usage.input_tokens
                    state.output_tokens = usage.output_tokens
                    state.cache_read_tokens = usage.cache_read_tokens
                    state.cache_write_tokens = usage.cache_write_tokens
                elif event.type == "content_block_delta":
                    if event.delta.type == "text_delta":
                        yield event.delta.text
                elif event.type == "message_delta":
                    state.stop_reason = event.delta.stop_reason
                    state.output_tokens = event.usage.output_tokens  # cumulative
                    if event.usage.input_tokens is not None:
                        state.input_tokens = (
                            event.usage.input_tokens
                            + state.cache_read_tokens
                            + state.cache_write_tokens
                        )
                elif event.type == "message_stop":
                    state.complete = True

    def close(self) -> None:
        self.client.close()


class OpenAIAdapter:
    """Chat Completions through the ``openai`` SDK (OpenAI, or a compatible local server)."""

    def __init__(
        self,
        *,
        api_key: str | None,
        base_url: str,
        timeout: float,
        compatible: bool,
        on_request: RequestHook,
        on_response: ResponseHook,
    ) -> None:
        self.name = "openai_compatible" if compatible else "openai"
        self.compatible = compatible
        # Never let the SDK fall back to $OPENAI_API_KEY: a local server must not receive a
        # real OpenAI key. Without a key, no Authorization header is sent at all.
        # (The SDK insists on a key: a placeholder stands in, and each request omits its header.)
        self.headers: dict[str, Any] = {} if api_key else {"Authorization": openai.Omit()}
        self.client = openai.OpenAI(
            api_key=api_key or "no-key-configured",
            base_url=base_url,
            timeout=timeout,
            max_retries=0,
            http_client=openai.DefaultHttpxClient(
                event_hooks={
                    "request": [on_request],
                    "response": [watch_deadline, on_response],
                }
            ),
        )
        _ = self.client.chat.completions  # see _WARM_UP

    def _params(self, request: LLMRequest) -> dict[str, Any]:
        messages: list[Message] = []
        system = request.system_prompt()
        if system:
            messages.append({"role": "system", "content": _openai_content(system)})
        for message in request.messages:
            messages.extend(_openai_messages(message))
        params: dict[str, Any] = {"model": request.model, "messages": messages}
        if request.tools:
            params["tools"] = [tool.openai() for tool in request.tools]
        if request.tool_choice is not None:
            choice = request.tool_choice
            params["tool_choice"] = (
                {"auto": "auto", "any": "required", "none": "none"}[choice]
                if choice in ("auto", "any", "none")
                else {"type": "function", "function": {"name": choice}}
            )
        if request.native_output:
            assert request.output is not None
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {
                    "name": request.output.name,
                    "schema": request.output.schema,
                    "strict": _strict_ok(request.output.schema),
                },
            }
        if request.prompt_cache_key is not None:
            params["prompt_cache_key"] = request.prompt_cache_key
        if self.headers:
            params["extra_headers"] = self.headers
        # OpenAI deprecated max_tokens (its reasoning models reject it); local servers read it.
        params["max_tokens" if self.compatible else "max_completion_tokens"] = request.max_tokens
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.stop:
            params["stop"] = list(request.stop)
        if (request.json and request.output is None) or (
            request.output is not None and request.output_mode == "json_mode"
        ):
            params["response_format"] = {"type": "json_object"}
        return params

    def create(self, request: LLMRequest) -> LLMResponse:
        completion = whole(
            request,
            lambda: self.client.chat.completions.create(
                **self._params(request), timeout=request.timeout
            ),
        )
        return openai_response(completion, self.name)

    def stream(self, request: LLMRequest, state: StreamState) -> Iterator[str]:
        deadline = RequestDeadline(request.timeout)
        chunks = _opened(
            deadline,
            lambda: self.client.chat.completions.create(
                **self._params(request),
                stream=True,
                stream_options={"include_usage": True},
                timeout=_idle(request, deadline),
            ),
        )
        state.close = chunks.close
        with chunks, _watched(deadline):
            for chunk in chunks:
                state.events.append(chunk)
                if chunk.model:
                    state.model = chunk.model
                for choice in chunk.choices:
                    if choice.delta is not None and choice.delta.content:
                        yield choice.delta.content
                    if choice.finish_reason is not None:
                        state.stop_reason = choice.finish_reason
                        state.complete = True
                if chunk.usage is not None:
                    usage = openai_usage(chunk.usage)
                    state.input_tokens = usage.input_tokens
                    state.output_tokens = usage.output_tokens
                    state.cache_read_tokens = usage.cache_read_tokens
                    state.cache_write_tokens = usage.cache_write_tokens

    def close(self) -> None:
        self.client.close()


def make_adapter(
    provider: str,
    *,
    api_key: str | None,
    base_url: str,
    timeout: float,
    on_request: RequestHook = lambda request: None,
    on_response: ResponseHook = lambda response: None,
) -> ProviderAdapter:
    """The adapter for ``provider`` (``anthropic``, ``openai`` or ``openai_compatible``)."""
    if provider == "anthropic":
        assert api_key, "checked by the caller"
        return AnthropicAdapter(
            api_key=api_key,
            base_url=base_url,
            timeout=timeout,
            on_request=on_request,
            on_response=on_response,
        )
    return OpenAIAdapter(
        api_key=api_key,
        base_url=base_url,
        timeout=timeout,
        compatible=provider == "openai_compatible",
        on_request=on_request,
        on_response=on_response,
    )
