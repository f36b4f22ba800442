"""Prompts, replies and token estimates: the provider-neutral shapes of an LLM call.

A prompt is a string (one user message) or a list of ``{"role", "content"}`` messages::

    normalize_messages("Summarise this.")
    # [{'role': 'user', 'content': 'Summarise this.'}]
    normalize_messages([
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
    ])

Roles are ``system``, ``user`` and ``assistant``; ``content`` is a string or a list of the
provider's content blocks (passed through untouched). Anything else is a
:class:`~flowstone_dagster.errors.ConfigurationError` naming the message, raised before any
request is sent.
"""

from __future__ import annotations

import json as jsonlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from flowstone_dagster.errors import ConfigurationError, DecodeError, truncate
from flowstone_dagster.llm.tools import ToolCall

__all__ = [
    "ROLES",
    "InvalidJSON",
    "LLMResponse",
    "Message",
    "Prompt",
    "System",
    "Usage",
    "estimate_tokens",
    "normalize_messages",
    "parse_json_reply",
    "prompt_chars",
    "split_system",
    "system_text",
]

Message = dict[str, Any]
Prompt = str | Sequence[Mapping[str, Any]]

ROLES = frozenset({"system", "user", "assistant"})

#: OpenAI's and Anthropic's rule of thumb: about 4 characters of English text per token.
CHARS_PER_TOKEN = 4
#: Tokens a provider adds around each message (role markers and separators).
TOKENS_PER_MESSAGE = 4


@dataclass(frozen=True)
class Usage:
    """Tokens a call used, as the provider counted them.

    ``input_tokens`` counts every input token, cached ones included (OpenAI's
    ``prompt_tokens``; Anthropic's ``input_tokens`` + ``cache_read_input_tokens`` +
    ``cache_creation_input_tokens``). ``cache_read_tokens`` of them were read from the
    provider's prompt cache (Anthropic's ``cache_read_input_tokens``, OpenAI's
    ``prompt_tokens_details.cached_tokens``), ``cache_write_tokens`` written to it (Anthropic's
    ``cache_creation_input_tokens``; OpenAI does not report writes).
    """

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens


@dataclass(frozen=True)
class LLMResponse:
    """One model reply.

    ``stop_reason`` is the provider's own value (Anthropic: ``end_turn``, ``max_tokens``,
    ``stop_sequence``, ...; OpenAI: ``stop``, ``length``, ...). ``raw`` is the SDK's response
    object (for a stream, the list of events). ``attempts`` counts the requests made.
    """

    text: str
    model: str
    stop_reason: str | None
    usage: Usage
    raw: Any = field(default=None, repr=False, compare=False)
    provider: str = ""
    attempts: int = 1
    #: The tools the model asks to call (``stop_reason`` ``tool_use`` / ``tool_calls``).
    tool_calls: tuple[ToolCall, ...] = ()
    #: With ``output=``: the reply validated (a model instance, or the parsed JSON).
    parsed: Any = None
    #: The fallback entry that answered (``None``: the primary); see ``fallbacks=``.
    fallback: str | None = None

    @property
    def message(self) -> Message:
        """This reply as the assistant message to append to the conversation (its text and
        tool calls, in the neutral shape every adapter sends)."""
        if not self.tool_calls:
            return {"role": "assistant", "content": self.text}
        blocks: list[dict[str, Any]] = []
        if self.text:
            blocks.append({"type": "text", "text": self.text})
        blocks.extend(
            {"type": "tool_use", "id": call.id, "name": call.name, "input": call.arguments}
            for call in self.tool_calls
        )
        return {"role": "assistant", "content": blocks}

    @property
    def truncated(self) -> bool:
        """Whether the reply stopped because it reached ``max_tokens``."""
        return self.stop_reason in ("max_tokens", "length")

    def json(self) -> Any:
        """The reply parsed as JSON; :class:`InvalidJSON` (with the text) when it is not."""
        return parse_json_reply(self.text, truncated=self.truncated, provider=self.provider)


class InvalidJSON(DecodeError):
    """A reply requested as JSON (``json=True``) does not parse as JSON. Not retried.

    ``text`` is the whole reply, so nothing the model said is lost. When the reply was cut at
    ``max_tokens`` the message says so: raise ``max_tokens``.
    """

    def __init__(self, message: str, *, text: str, service: str | None = None) -> None:
        super().__init__(message, fmt="json", service=service)
        self.text = text


def _strip_fence(text: str) -> str:
    """``text`` without one surrounding Markdown code fence (```json ... ```), if any."""
    stripped = text.strip()
    if stripped.startswith("```") and stripped.endswith("```") and stripped.count("\n") >= 1:
        body = stripped[3:-3]
        first_line, _, rest = body.partition("\n")
        return rest if first_line.strip().isalpha() or not first_line.strip() else body
    return stripped


def parse_json_reply(text: str, *, truncated: bool = False, provider: str | None = None) -> Any:
    """Parse a model's reply as JSON, tolerating one surrounding Markdown code fence.

    ::

        >>> parse_json_reply('{"label": "spam"}')
        {'label': 'spam'}
        >>> parse_json_reply('```json\\n[1, 2]\\n```')
        [1, 2]
    """
    try:
        return jsonlib.loads(_strip_fence(text))
    except ValueError as exc:
        hint = (
            "the reply was cut at max_tokens: raise max_tokens"
            if truncated
            else "ask for JSON only in the prompt, or parse the text yourself"
        )
        raise InvalidJSON(
            f"the model's reply is not valid JSON ({exc}; {hint}): {truncate(text, 200)!r}",
            text=text,
            service=provider,
        ) from None


def normalize_messages(prompt: Prompt) -> list[Message]:
    """``prompt`` as a list of ``{"role", "content"}`` messages, validated."""
    if isinstance(prompt, str):
        if not prompt:
            raise ConfigurationError("must not be empty", field="prompt")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence):
        raise ConfigurationError(
            f"must be a string or a list of {{'role', 'content'}} messages, got "
            f"{type(prompt).__name__}",
            field="prompt",
        )
    messages: list[Message] = []
    for index, message in enumerate(prompt):
        where = f"messages[{index}]"
        if not isinstance(message, Mapping):
            raise ConfigurationError(
                f"must be a {{'role', 'content'}} mapping, got {type(message).__name__}",
                field=where,
            )
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ConfigurationError(
                f"role must be one of {', '.join(sorted(ROLES))}, got {role!r}", field=where
            )
        if not isinstance(content, (str, list)):
            raise ConfigurationError(
                f"content must be a string or a list of content blocks, got "
                f"{type(content).__name__}",
                field=where,
            )
        extra = set(message) - {"role", "content"}
        if extra:
            raise ConfigurationError(
                f"unexpected keys {sorted(extra)}; a message has 'role' and 'content'",
                field=where,
            )
        messages.append({"role": role, "content": content})
    if not any(message["role"] != "system" for message in messages):
        raise ConfigurationError("needs at least one user or assistant message", field="messages")
    return messages


System = str | list[dict[str, Any]]


def split_system(
    messages: list[Message], system: System | None
) -> tuple[System | None, list[Message]]:
    """The system prompt (``system`` and any ``system`` messages, in order) and the others.

    Plain strings are joined into one string; as soon as one part is a list of content
    blocks (e.g. with Anthropic's ``cache_control``), the result is a list of text blocks
    that keeps every block as given.
    """
    parts: list[Any] = [system] if system else []
    rest: list[Message] = []
    for message in messages:
        if message["role"] == "system":
            parts.append(message["content"])
        else:
            rest.append(message)
    if not parts:
        return None, rest
    if all(isinstance(part, str) for part in parts):
        return "\n\n".join(parts), rest
    blocks: list[dict[str, Any]] = []
    for part in parts:
        if isinstance(part, str):
            blocks.append({"type": "text", "text": part})
        else:
            for block in part:
                if not isinstance(block, Mapping) or not isinstance(block.get("text"), str):
                    raise ConfigurationError(
                        "system content blocks must be text blocks {'type': 'text', 'text': "
                        "...} (optionally with cache_control)",
                        field="system",
                    )
                blocks.append(dict(block))
    return blocks, rest


def system_text(system: System | None) -> str:
    """The text of a system prompt (string or blocks)."""
    if system is None:
        return ""
    return system if isinstance(system, str) else _blocks_text(system)


def _blocks_text(blocks: list[Any]) -> str:
    return "".join(_block_text(block) for block in blocks)


def _block_text(block: Any) -> str:
    """The text a content block carries (a tool call's arguments and a tool result count)."""
    if not isinstance(block, Mapping):
        return str(block)
    if "text" in block:
        return str(block["text"])
    if block.get("type") == "tool_use":
        return jsonlib.dumps(block.get("input", {}))
    if block.get("type") == "tool_result":
        content = block.get("content", "")
        return content if isinstance(content, str) else _blocks_text(list(content))
    return ""


def prompt_chars(messages: Sequence[Message], system: System | None = None) -> int:
    """Characters of prompt text (what telemetry reports instead of the text itself)."""
    total = len(system_text(system))
    for message in messages:
        content = message["content"]
        total += len(content) if isinstance(content, str) else len(_blocks_text(content))
    return total


def estimate_tokens(messages: Sequence[Message], system: System | None = None) -> int:
    """A quick, conservative-ish estimate of a prompt's input tokens (before sending).

    About 4 characters per token plus a few per message, as both providers document for
    English text. Used only to take the tokens-per-minute budget before a request; the
    provider's ``usage`` corrects it afterwards.
    """
    chars = prompt_chars(messages, system)
    count = len(messages) + (1 if system else 0)
    return max(math.ceil(chars / CHARS_PER_TOKEN) + TOKENS_PER_MESSAGE * count, 1)
