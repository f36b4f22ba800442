"""Tools, schema-constrained output and prompt caching, on both wire formats."""

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import openai
import pydantic
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.llm import LLMClient
from flowstone_dagster.llm.tools import InvalidOutput, ToolCall, ToolLoopExceeded, tool_spec
from flowstone_dagster_tests.llm.test_llm import KEY, OPENAI_KEY, resilience
from flowstone_dagster_tests.support.llm_servers import LLMServer, llm_server


@pytest.fixture(params=["anthropic", "openai"])
def api(request: pytest.FixtureRequest) -> Iterator[LLMServer]:
    key = KEY if request.param == "anthropic" else OPENAI_KEY
    with llm_server(request.param, api_key=key) as server:
        yield server


def is_anthropic(server: LLMServer) -> bool:
    return server.path == "/v1/messages"


def client_for(server: LLMServer, **options: Any) -> LLMClient:
    anthropic = is_anthropic(server)
    return LLMClient(
        "anthropic" if anthropic else "openai",
        model="claude-sonnet-5-5" if anthropic else "gpt-4o-mini",
        api_key=KEY if anthropic else OPENAI_KEY,
        base_url=server.base_url,
        resilience=resilience(attempts=2),
        **options,
    )


def order_status(order_id: str, verbose: bool = False) -> str:
    """The shipping status of one order."""
    return f"order {order_id}: shipped" + (" (by sea)" if verbose else "")


class Ticket(pydantic.BaseModel):
    """A support ticket, classified."""

    label: str
    priority: int


# -- tool definitions ------------------------------------------------------------------------


def test_a_function_becomes_a_tool_schema() -> None:
    spec = tool_spec(order_status)
    assert spec.name == "order_status"
    assert spec.description == "The shipping status of one order."
    assert spec.input_schema == {
        "type": "object",
        "properties": {
            "order_id": {"type": "string"},
            "verbose": {"type": "boolean", "default": False},
        },
        "required": ["order_id"],
    }


def test_tools_are_sent_in_each_wire_format(api: LLMServer) -> None:
    api.reply("", tool_calls=[("order_status", {"order_id": "42"})])
    response = client_for(api).chat(
        "Where is order 42?", tools=[order_status, Ticket], tool_choice="order_status"
    )
    body = api.requests[0].body
    if is_anthropic(api):
        assert body["tools"][0] == {
            "name": "order_status",
            "description": "The shipping status of one order.",
            "input_schema": tool_spec(order_status).input_schema,
        }
        assert body["tools"][1]["name"] == "Ticket"
        assert body["tool_choice"] == {"type": "tool", "name": "order_status"}
        assert response.stop_reason == "tool_use"
    else:
        assert body["tools"][0] == {
            "type": "function",
            "function": {
                "name": "order_status",
                "description": "The shipping status of one order.",
                "parameters": tool_spec(order_status).input_schema,
            },
        }
        assert body["tool_choice"] == {"type": "function", "function": {"name": "order_status"}}
        assert response.stop_reason == "tool_calls"
    [call] = response.tool_calls
    assert call.name == "order_status"
    assert call.arguments == {"order_id": "42"}
    assert call.id


def test_a_tool_choice_naming_no_tool_fails_before_sending(api: LLMServer) -> None:
    with pytest.raises(ConfigurationError, match="tool_choice"):
        client_for(api).chat("Hi", tools=[order_status], tool_choice="missing")
    with pytest.raises(ConfigurationError, match="tools"):
        client_for(api).chat("Hi", tools=[42])
    assert api.requests == []


def test_the_tool_loop_runs_functions_and_sends_results_back(api: LLMServer) -> None:
    api.reply("", tool_calls=[("order_status", {"order_id": "42", "verbose": True})])
    api.reply("", tool_calls=[("order_status", {"order_id": "43"}), ("nope", {})])
    api.reply("Order 42 shipped by sea; 43 shipped.")
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        run = client_for(api).run_tools("Where are 42 and 43?", tools=[order_status])
    finally:
        remove()
    assert run.response.text == "Order 42 shipped by sea; 43 shipped."
    assert run.rounds == 3
    assert run.tool_calls == 3
    assert len([e for e in events if e.name == "flowstone.llm.call"]) == 3
    second, third = api.requests[1].body, api.requests[2].body
    if is_anthropic(api):
        assistant, result = second["messages"][1], second["messages"][2]
        assert assistant["content"][0]["type"] == "tool_use"
        assert result["content"] == [
            {
                "type": "tool_result",
                "tool_use_id": assistant["content"][0]["id"],
                "content": "order 42: shipped (by sea)",
            }
        ]
        failed = third["messages"][4]["content"][1]
        assert failed["is_error"] is True
        assert "unknown tool 'nope'" in failed["content"]
    else:
        assistant, result = second["messages"][1], second["messages"][2]
        assert assistant["content"] is None
        assert assistant["tool_calls"][0]["function"] == {
            "name": "order_status",
            "arguments": json.dumps({"order_id": "42", "verbose": True}),
        }
        assert result == {
            "role": "tool",
            "tool_call_id": assistant["tool_calls"][0]["id"],
            "content": "order 42: shipped (by sea)",
        }
        assert [m["role"] for m in third["messages"]] == [
            "user",
            "assistant",
            "tool",
            "assistant",
            "tool",
            "tool",
        ]


def test_the_tool_loop_is_bounded(api: LLMServer) -> None:
    for _ in range(3):
        api.reply("", tool_calls=[("order_status", {"order_id": "1"})])
    with pytest.raises(ToolLoopExceeded) as raised:
        client_for(api).run_tools("Loop", tools=[order_status], max_rounds=2)
    assert raised.value.rounds == 2
    assert raised.value.response.tool_calls[0] == ToolCall(
        raised.value.response.tool_calls[0].id, "order_status", {"order_id": "1"}
    )
    assert len(api.requests) == 2


# -- structured output -----------------------------------------------------------------------


def test_output_uses_the_native_schema_mode_and_validates(api: LLMServer) -> None:
    api.reply('{"label": "refund", "priority": 2}')
    ticket = client_for(api).call("Classify: my card was charged twice", output=Ticket)
    assert ticket == Ticket(label="refund", priority=2)
    body = api.requests[0].body
    if is_anthropic(api):
        schema = body["output_config"]["format"]["schema"]
        assert body["output_config"]["format"]["type"] == "json_schema"
    else:
        assert body["response_format"]["type"] == "json_schema"
        assert body["response_format"]["json_schema"]["name"] == "Ticket"
        assert body["response_format"]["json_schema"]["strict"] is True
        schema = body["response_format"]["json_schema"]["schema"]
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["label", "priority"]


def test_a_reply_that_does_not_validate_is_a_clear_error(api: LLMServer) -> None:
    api.reply('{"label": "refund"}')
    with pytest.raises(InvalidOutput) as raised:
        client_for(api).call("Classify", output=Ticket)
    assert raised.value.text == '{"label": "refund"}'
    assert "priority" in raised.value.errors
    assert not raised.value.retryable
    assert len(api.requests) == 1  # never retried as a transient failure


def test_repair_retries_send_the_errors_back(api: LLMServer) -> None:
    api.reply('{"label": "refund", "priority": "high"}')
    api.reply('{"label": "refund", "priority": 1}')
    response = client_for(api).chat("Classify", output=Ticket, output_retries=1)
    assert response.parsed == Ticket(label="refund", priority=1)
    assert response.attempts == 2
    repair = api.requests[1].body["messages"]
    assert repair[-2]["role"] == "assistant"
    assert "priority" in repair[-1]["content"]


def test_a_plain_json_schema_is_checked(api: LLMServer) -> None:
    schema = {
        "title": "labels",
        "type": "object",
        "properties": {"labels": {"type": "array", "items": {"type": "string"}}},
        "required": ["labels"],
        "additionalProperties": False,
    }
    api.reply('{"labels": ["a", "b"]}')
    assert client_for(api).call("Label", output=schema) == {"labels": ["a", "b"]}
    api.reply('{"other": 1}')
    with pytest.raises(InvalidOutput, match="labels"):
        client_for(api).call("Label", output=schema)


@pytest.mark.parametrize("mode", ["json_mode", "prompt"])
def test_a_compatible_server_without_schema_mode_gets_the_schema_in_the_prompt(
    mode: str,
) -> None:
    # A local server that takes no json_schema response_format (older llama.cpp, TGI): the
    # schema goes in the system prompt, JSON mode on or not, and the reply is validated.
    with llm_server("openai", api_key=None) as server:
        client = LLMClient(
            "openai_compatible",
            model="llama3.1",
            base_url=server.base_url,
            resilience=resilience(attempts=1),
            structured_output=mode,  # type: ignore[arg-type]
        )
        server.reply('```json\n{"label": "refund", "priority": 2}\n```')
        ticket = client.call("Classify: charged twice", system="You triage tickets.", output=Ticket)
        assert ticket == Ticket(label="refund", priority=2)
        server.reply('{"label": "refund"}')
        with pytest.raises(InvalidOutput, match="priority"):
            client.call("Classify: charged twice", output=Ticket)
    body = server.requests[0].body
    if mode == "json_mode":
        assert body["response_format"] == {"type": "json_object"}
    else:
        assert "response_format" not in body
    system = body["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("You triage tickets.\n\nReply with one JSON object")
    schema = json.loads(system["content"].rsplit("\n", 1)[1])
    assert schema["required"] == ["label", "priority"]


def test_anthropic_has_no_json_mode() -> None:
    with pytest.raises(ConfigurationError, match="structured_output: Anthropic has no JSON"):
        LLMClient("anthropic", model="m", api_key=KEY, structured_output="json_mode")
    with pytest.raises(ConfigurationError, match="structured_output: must be native"):
        LLMClient("openai", model="m", api_key=OPENAI_KEY, structured_output="xml")  # type: ignore[arg-type]


def test_the_prompt_mode_works_with_anthropic_too(api: LLMServer) -> None:
    api.reply('{"label": "refund", "priority": 2}')
    ticket = client_for(api, structured_output="prompt").call("Classify", output=Ticket)
    assert ticket == Ticket(label="refund", priority=2)
    body = api.requests[0].body
    assert "output_config" not in body
    assert "response_format" not in body


def test_openai_rejects_a_non_strict_schema_sent_as_strict() -> None:
    # The server checks what OpenAI's strict mode checks: a model with a default field is sent
    # with strict false, so it is accepted.
    class Loose(pydantic.BaseModel):
        label: str
        note: str = ""

    with llm_server("openai", api_key=OPENAI_KEY) as server:
        server.reply('{"label": "x"}')
        assert client_for(server).call("Hi", output=Loose) == Loose(label="x")
        assert server.requests[0].body["response_format"]["json_schema"]["strict"] is False


# -- prompt caching --------------------------------------------------------------------------


def test_cache_control_blocks_reach_anthropic_and_cache_usage_is_reported() -> None:
    system = [
        {
            "type": "text",
            "text": "You label tickets. " * 50,
            "cache_control": {"type": "ephemeral"},
        },
    ]
    with llm_server("anthropic", api_key=KEY) as server:
        server.reply("refund", input_tokens=12, output_tokens=1, cache_write=1024)
        server.reply("refund", input_tokens=12, output_tokens=1, cache_read=1024)
        client = client_for(server)
        first = client.chat("Ticket 1", system=system)
        second = client.chat(
            [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "text",
                            "text": "Ticket 2",
                            "cache_control": {"type": "ephemeral", "ttl": "1h"},
                        }
                    ],
                },
            ],
            system=system,
        )
    assert server.requests[0].body["system"] == system
    assert server.requests[1].body["messages"][0]["content"][0]["cache_control"] == {
        "type": "ephemeral",
        "ttl": "1h",
    }
    assert (first.usage.input_tokens, first.usage.cache_write_tokens) == (1036, 1024)
    assert (second.usage.input_tokens, second.usage.cache_read_tokens) == (1036, 1024)


def test_openai_gets_prompt_cache_key_and_reports_cached_tokens() -> None:
    system = [{"type": "text", "text": "Rules", "cache_control": {"type": "ephemeral"}}]
    with llm_server("openai", api_key=OPENAI_KEY) as server:
        server.reply("ok", input_tokens=10, cache_read=2048)
        response = client_for(server).chat("Hi", system=system, prompt_cache_key="tickets-v1")
    body = server.requests[0].body
    assert body["prompt_cache_key"] == "tickets-v1"
    assert body["messages"][0] == {"role": "system", "content": [{"type": "text", "text": "Rules"}]}
    assert response.usage.input_tokens == 2058
    assert response.usage.cache_read_tokens == 2048


def test_cache_tokens_are_in_the_event(api: LLMServer) -> None:
    api.reply("ok", input_tokens=5, cache_read=100)
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        client_for(api).call("Hi")
    finally:
        remove()
    [event] = [e for e in events if e.name == "flowstone.llm.call"]
    assert event.measures["cache_read_tokens"] == 100
    assert event.measures["input_tokens"] == 105


def test_the_servers_refuse_unknown_fields(api: LLMServer) -> None:
    # The strict servers are what makes the field-by-field tests above meaningful.
    sdk: Any = client_for(api)._adapter.client
    if is_anthropic(api):
        bad_tool = {"name": "t", "input_schema": {"type": "object"}, "bogus": 1}

        def send() -> Any:
            return sdk.messages.create(
                model="m",
                max_tokens=5,
                messages=[{"role": "user", "content": "x"}],
                extra_body={"tools": [bad_tool]},
            )
    else:

        def send() -> Any:
            return sdk.chat.completions.create(
                model="m", messages=[{"role": "user", "content": "x"}], extra_body={"bogus": 1}
            )

    with pytest.raises((anthropic.BadRequestError, openai.BadRequestError), match="bogus"):
        send()
