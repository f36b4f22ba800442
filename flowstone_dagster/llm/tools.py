"""Tools and schema-constrained output: what the model may call, and the shape of its answer.

A tool is given as a Python function (its signature becomes the JSON schema of its
arguments, its docstring the description), a pydantic model (its schema, its docstring), or a
mapping: the neutral ``{"name", "description", "input_schema"}``, Anthropic's tool
definition, or OpenAI's ``{"type": "function", "function": {...}}``::

    def lookup_order(order_id: str, include_items: bool = False) -> dict:
        "Fetch one order by its id."
        ...

    tool_spec(lookup_order).input_schema
    # {'type': 'object', 'properties': {'order_id': {'type': 'string'}, ...},
    #  'required': ['order_id']}

The model's requests to call tools come back as :class:`ToolCall` (``id``, ``name``,
``arguments`` parsed into a dict) on :attr:`LLMResponse.tool_calls
<flowstone_dagster.llm.messages.LLMResponse.tool_calls>`; :func:`tool_result` builds the message
that sends a tool's result back. Both use one provider-neutral shape (Anthropic's content
blocks), which the OpenAI adapter translates to ``tool_calls`` / ``role: "tool"`` messages.

An output schema (``output=SomeModel`` or a JSON schema) is sent as each provider's native
schema mode (Anthropic's ``output_config.format``, OpenAI's ``response_format`` of type
``json_schema``) and the reply is validated here: a reply that does not validate is
:class:`InvalidOutput`, not retried, carrying the text.
"""

from __future__ import annotations

import inspect
import json as jsonlib
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pydantic

from flowstone_dagster.errors import ConfigurationError, DecodeError, truncate

__all__ = [
    "InvalidOutput",
    "OutputSpec",
    "ToolCall",
    "ToolLoopExceeded",
    "ToolSpec",
    "output_spec",
    "tool_result",
    "tool_spec",
    "tool_specs",
]

_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


@dataclass(frozen=True)
class ToolSpec:
    """A tool as both providers need it; ``function`` runs it in :meth:`LLMClient.run_tools
    <flowstone_dagster.llm.client.LLMClient.run_tools>` (``None`` for a schema-only tool)."""

    name: str
    description: str
    input_schema: dict[str, Any]
    function: Callable[..., Any] | None = field(default=None, compare=False, repr=False)
    model: type[pydantic.BaseModel] | None = field(default=None, compare=False, repr=False)

    def anthropic(self) -> dict[str, Any]:
        tool: dict[str, Any] = {"name": self.name, "input_schema": self.input_schema}
        if self.description:
            tool["description"] = self.description
        return tool

    def openai(self) -> dict[str, Any]:
        function: dict[str, Any] = {"name": self.name, "parameters": self.input_schema}
        if self.description:
            function["description"] = self.description
        return {"type": "function", "function": function}


@dataclass(frozen=True)
class ToolCall:
    """The model asks to call ``name`` with ``arguments``; answer with ``id``."""

    id: str
    name: str
    arguments: dict[str, Any]


class InvalidOutput(DecodeError):
    """A reply requested with ``output=`` does not validate against it. Not retried.

    ``text`` is the whole reply; ``errors`` what did not validate.
    """

    def __init__(
        self, message: str, *, text: str, errors: str = "", service: str | None = None
    ) -> None:
        super().__init__(message, fmt="json", service=service)
        self.text = text
        self.errors = errors


class ToolLoopExceeded(DecodeError):
    """``run_tools`` reached ``max_rounds`` and the model still asked for tools. Not retried.

    ``response`` is the last reply (with its ``tool_calls``), ``rounds`` the requests made.
    """

    def __init__(self, message: str, *, response: Any, rounds: int) -> None:
        super().__init__(message, fmt="tool calls")
        self.response = response
        self.rounds = rounds


def _check_name(name: str, where: str) -> str:
    if not _NAME.match(name):
        raise ConfigurationError(
            f"tool name {name!r} must be 1-64 letters, digits, '_' or '-'", field=where
        )
    return name


def _function_schema(function: Callable[..., Any]) -> dict[str, Any]:
    """The JSON schema of ``function``'s keyword arguments (through a pydantic model)."""
    fields: dict[str, Any] = {}
    for name, parameter in inspect.signature(function).parameters.items():
        if parameter.kind in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
            continue
        annotation = Any if parameter.annotation is parameter.empty else parameter.annotation
        default = ... if parameter.default is parameter.empty else parameter.default
        fields[name] = (annotation, default)
    model = pydantic.create_model(f"{function.__name__}_arguments", **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for value in schema.get("properties", {}).values():
        if isinstance(value, dict):
            value.pop("title", None)
    return schema


def tool_spec(tool: Any, *, where: str = "tools") -> ToolSpec:
    """``tool`` (a function, a pydantic model or a mapping) as a :class:`ToolSpec`."""
    if isinstance(tool, ToolSpec):
        return tool
    if isinstance(tool, type) and issubclass(tool, pydantic.BaseModel):
        model_schema = tool.model_json_schema()
        model_schema.pop("title", None)
        return ToolSpec(
            _check_name(tool.__name__, where),
            inspect.getdoc(tool) or "",
            model_schema,
            model=tool,
        )
    if isinstance(tool, Mapping):
        if tool.get("type") == "function" and isinstance(tool.get("function"), Mapping):
            function = tool["function"]
            name, description = function.get("name"), function.get("description", "")
            schema: Any = function.get("parameters") or {"type": "object", "properties": {}}
        else:
            name, description = tool.get("name"), tool.get("description", "")
            schema = tool.get("input_schema")
        if not isinstance(name, str) or not isinstance(schema, Mapping):
            raise ConfigurationError(
                "a tool mapping needs 'name' and 'input_schema' (or OpenAI's "
                "{'type': 'function', 'function': {'name', 'parameters'}})",
                field=where,
            )
        return ToolSpec(_check_name(name, where), str(description or ""), dict(schema))
    if callable(tool) and hasattr(tool, "__name__"):
        return ToolSpec(
            _check_name(tool.__name__, where),
            inspect.getdoc(tool) or "",
            _function_schema(tool),
            function=tool,
        )
    raise ConfigurationError(
        f"must be a function, a pydantic model or a tool mapping, got {type(tool).__name__}",
        field=where,
    )


def tool_specs(tools: Sequence[Any] | None) -> tuple[ToolSpec, ...]:
    """Every tool of ``tools`` as a :class:`ToolSpec`; names must be unique."""
    if not tools:
        return ()
    if isinstance(tools, (str, Mapping)) or not isinstance(tools, Sequence):
        raise ConfigurationError("must be a list of tools", field="tools")
    specs = tuple(tool_spec(tool, where=f"tools[{index}]") for index, tool in enumerate(tools))
    names = [spec.name for spec in specs]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigurationError(f"tool names must be unique: {duplicates}", field="tools")
    return specs


def tool_result(call: ToolCall | str, content: Any, *, is_error: bool = False) -> dict[str, Any]:
    """The message sending a tool's result back (``content``: text, or anything JSON)."""
    call_id = call.id if isinstance(call, ToolCall) else call
    text = content if isinstance(content, str) else jsonlib.dumps(content, default=str)
    block: dict[str, Any] = {"type": "tool_result", "tool_use_id": call_id, "content": text}
    if is_error:
        block["is_error"] = True
    return {"role": "user", "content": [block]}


@dataclass(frozen=True)
class OutputSpec:
    """The schema a reply must follow, and how to validate it."""

    name: str
    schema: dict[str, Any]
    model: type[pydantic.BaseModel] | None = field(default=None, compare=False)

    def validate(self, text: str, *, service: str | None = None) -> Any:
        """The reply as an instance of ``model`` (or the parsed JSON for a plain schema)."""
        from flowstone_dagster.llm.messages import InvalidJSON, parse_json_reply

        try:
            value = parse_json_reply(text)
        except InvalidJSON as exc:
            raise InvalidOutput(
                f"the model's reply is not JSON for {self.name}: {truncate(text, 200)!r}",
                text=text,
                errors=str(exc),
                service=service,
            ) from None
        if self.model is not None:
            try:
                return self.model.model_validate(value)
            except pydantic.ValidationError as exc:
                raise InvalidOutput(
                    f"the model's reply does not validate as {self.name} "
                    f"({exc.error_count()} error(s): {truncate(str(exc), 300)}): "
                    f"{truncate(text, 200)!r}",
                    text=text,
                    errors=str(exc),
                    service=service,
                ) from None
        problem = _schema_problem(value, self.schema)
        if problem is not None:
            raise InvalidOutput(
                f"the model's reply does not follow the {self.name} schema ({problem}): "
                f"{truncate(text, 200)!r}",
                text=text,
                errors=problem,
                service=service,
            )
        return value


def _schema_problem(value: Any, schema: Mapping[str, Any]) -> str | None:
    """A light check of a plain JSON schema: top-level type and required properties."""
    kind = schema.get("type")
    python = {"object": dict, "array": list, "string": str, "boolean": bool}.get(str(kind))
    if python is not None and not isinstance(value, python):
        return f"expected a JSON {kind}, got {type(value).__name__}"
    if isinstance(value, dict):
        missing = [name for name in schema.get("required", ()) if name not in value]
        if missing:
            return f"missing required properties {missing}"
    return None


def output_spec(output: Any) -> OutputSpec | None:
    """``output=`` (a pydantic model or a JSON schema mapping) as an :class:`OutputSpec`."""
    if output is None:
        return None
    if isinstance(output, type) and issubclass(output, pydantic.BaseModel):
        return OutputSpec(_check_name(output.__name__, "output"), _strict(output), output)
    if isinstance(output, Mapping):
        schema = dict(output)
        name = str(schema.get("title") or "output")
        name = re.sub(r"[^a-zA-Z0-9_-]", "_", name)[:64] or "output"
        return OutputSpec(name, schema)
    raise ConfigurationError(
        f"must be a pydantic model class or a JSON schema, got {type(output).__name__}",
        field="output",
    )


def _strict(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``model``'s schema as the providers' strict schema modes want it: every object closed
    (``additionalProperties: false``)."""
    schema = model.model_json_schema()

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "object" and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    return schema
