"""Anthropic- and OpenAI-shaped API servers on loopback, for tests and benches.

Each server is a real HTTP server (pytest-httpserver, threaded, HTTP/1.1) that speaks the
provider's documented wire format and checks every request field by field, the way the real
API does, answering a bad request with the provider's own error body and status:

- ``AnthropicServer``: ``POST /v1/messages`` (Messages API): ``anthropic-version``, the key as
  ``x-api-key`` or ``Authorization: Bearer`` (what the ``anthropic`` 2.x SDK sends),
  ``model``, required ``max_tokens``, ``messages`` with ``user``/``assistant`` roles only,
  ``system`` as the top-level field, ``stop_sequences``, ``stream``, and no unknown field (the
  API of anthropic 2.14 has no ``temperature``). Replies: a ``message`` object, or the SSE
  events ``message_start``, ``content_block_start``, ``ping``, ``content_block_delta``,
  ``content_block_stop``, ``message_delta``, ``message_stop`` (and ``error``).
- ``OpenAIServer``: ``POST /v1/chat/completions``: ``Authorization: Bearer``, ``model``,
  ``messages`` (``system``/``developer``/``user``/``assistant``/``tool``), ``max_tokens`` or
  ``max_completion_tokens``, ``temperature`` in [0, 2], ``stop`` (at most 4),
  ``stream_options`` only with ``stream``, ``response_format`` (``json_object`` needs the word
  "json" in the messages), no unknown field. Replies: a ``chat.completion``, or
  ``chat.completion.chunk`` events ending with a usage chunk and ``data: [DONE]``.

Replies are scripted in order (:meth:`LLMServer.reply`, :meth:`~LLMServer.fail`,
:meth:`~LLMServer.stall`); once the script is used up the server answers ``default_text``.
A scripted reply is served as JSON or as a stream, as the request asks, optionally a few bytes
at a time (``chunk_size``), cut off (``drop_after``: the connection closes mid-stream), ending
without its final event (``end_early``) or with an in-stream ``error`` event.
``rpm_limit`` makes the server enforce a requests-per-minute limit over ``rpm_window``-second
windows, as providers do, answering 429 with ``retry-after`` and rate-limit headers.

::

    with llm_server("anthropic", api_key="sk-test") as server:
        server.reply("Test response")
        ...  # point a client at server.base_url
        assert server.requests[0].body["messages"] == [{"role": "user", "content": "Hi"}]
"""

from __future__ import annotations

import gc
import itertools
import json
import multiprocessing
import re
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

#: anthropic-version values the Messages API accepts here: the documented one, and the one
#: the installed anthropic 2.14 SDK sends (measured).
ANTHROPIC_VERSIONS = frozenset({"2023-06-01", "2026-10-21"})


class DropConnection(Exception):
    """Raised inside a streamed body to close the connection mid-response."""


@dataclass
class Scripted:
    """One scripted answer."""

    status: int = 200
    text: str = ""
    stop_reason: str | None = None
    input_tokens: int | None = None
    output_tokens: int | None = None
    model: str | None = None
    error_type: str | None = None
    error_message: str | None = None
    headers: dict[str, str] = field(default_factory=dict)
    deltas: list[str] | None = None
    chunk_size: int | None = None
    drop_after: int | None = None
    end_early: bool = False
    stream_error: tuple[int, str, str] | None = None  # after N deltas: (N, type, message)
    stall: threading.Event | None = None
    raw_body: str | None = None
    trickle: float | None = None  # seconds between chunks of chunk_size (default 8) bytes
    tool_calls: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # (name, input)
    cache_read: int = 0  # input tokens read from the prompt cache
    cache_write: int = 0  # input tokens written to it (Anthropic only)


@dataclass(frozen=True)
class Recorded:
    """A request as the server received it."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float


def _token_count(text: str) -> int:
    return max(len(text) // 4, 1)


class LLMServer:
    """The common machinery; see :class:`AnthropicServer` and :class:`OpenAIServer`."""

    path = ""
    default_model = "model"

    def __init__(
        self,
        server: HTTPServer,
        *,
        api_key: str | None = "sk-test-key",
        default_text: str = "ok",
        rpm_limit: float | None = None,
        rpm_window: float = 1.0,
        echo_credentials: bool = False,
    ) -> None:
        self.server = server
        self.api_key = api_key
        # A 401 that quotes the credentials it was sent, as some gateways do: what must never
        # reach an error message, a log or Dagster's event log.
        self.echo_credentials = echo_credentials
        self.default_text = default_text
        self.requests: list[Recorded] = []
        self.rejected: list[Recorded] = []  # answered 429 by the server's own rate limit
        self.script: deque[Scripted] = deque()
        self.lock = threading.Lock()
        self.rpm_limit = rpm_limit
        self.rpm_window = rpm_window
        self._admitted: deque[float] = deque()
        self._ids = itertools.count(1)
        server.expect_request(self.path, method="POST").respond_with_handler(self.handle)
        #: Batches by id: {"requests": [(custom_id, body)], "polls": int, "results": [...]}
        self.batches: dict[str, dict[str, Any]] = {}
        #: Status polls a batch answers "in progress" before it ends.
        self.batch_polls = 1
        self.register_batch_endpoints()

    @property
    def base_url(self) -> str:
        raise NotImplementedError

    # -- scripting ----------------------------------------------------------------------------

    def reply(self, text: str, **options: Any) -> None:
        """Answer the next request with ``text`` (JSON or a stream, as it asks)."""
        self.script.append(Scripted(text=text, **options))

    def fail(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        raw_body: str | None = None,
    ) -> None:
        """Answer the next request with the provider's error body."""
        self.script.append(
            Scripted(
                status=status,
                error_type=error_type,
                error_message=message,
                headers=dict(headers or {}),
                raw_body=raw_body,
            )
        )

    def stall(self, until: threading.Event, text: str = "too late") -> None:
        """Hold the next request until ``until`` is set (or 30 s pass), then answer ``text``."""
        self.script.append(Scripted(text=text, stall=until))

    # -- serving ------------------------------------------------------------------------------

    def handle(self, request: Request) -> Response:
        raw = request.get_data(as_text=True)
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw
        recorded = Recorded(
            request.method, request.path, dict(request.headers.items()), body, time.time()
        )
        limited = self._over_limit(recorded)
        if limited is not None:
            return limited
        with self.lock:
            self.requests.append(recorded)
        problem = self.validate(request, body)
        if problem is not None:
            return problem
        with self.lock:
            scripted = self.script.popleft() if self.script else Scripted(text=self.default_text)
        if scripted.stall is not None:
            scripted.stall.wait(30)
        if scripted.status >= 400:
            return self.error(
                scripted.status,
                scripted.error_type or "api_error",
                scripted.error_message or "error",
                headers=scripted.headers,
                raw_body=scripted.raw_body,
            )
        if isinstance(body, dict) and body.get("stream"):
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            return self._stream_response(scripted, body, include_usage)
        response = self.success(scripted, body)
        if scripted.trickle is None:
            return response
        return self._trickled(response, scripted)

    @staticmethod
    def _trickled(response: Response, scripted: Scripted) -> Response:
        """``response`` with its body sent ``chunk_size`` bytes at a time, ``trickle`` seconds
        apart: each gap far below a read timeout, the whole far above it."""
        data = response.get_data()
        step, pause = scripted.chunk_size or 8, scripted.trickle or 0.0

        def generate() -> Iterator[bytes]:
            for start in range(0, len(data), step):
                time.sleep(pause)
                yield data[start : start + step]

        headers = dict(response.headers.items())
        headers["Content-Length"] = str(len(data))
        return Response(
            generate(), status=response.status, headers=headers, direct_passthrough=True
        )

    def window_state(self) -> tuple[int, float] | None:
        """What the rate-limit headers say of the enforced window: the requests remaining in
        it and the seconds until it is empty again (``None`` without ``rpm_limit``). Like a
        provider enforcing a per-minute limit in one-second quanta, they describe the window
        enforced, while the ``limit`` header states the limit per minute."""
        if self.rpm_limit is None:
            return None
        budget = int(self.rpm_limit * self.rpm_window / 60.0)
        with self.lock:
            now = time.monotonic()
            live = [at for at in self._admitted if at > now - self.rpm_window]
        reset = live[-1] + self.rpm_window - now if live else 0.0
        return max(budget - len(live), 0), reset

    def _over_limit(self, recorded: Recorded) -> Response | None:
        if self.rpm_limit is None:
            return None
        budget = self.rpm_limit * self.rpm_window / 60.0
        with self.lock:
            now = time.monotonic()
            while self._admitted and self._admitted[0] <= now - self.rpm_window:
                self._admitted.popleft()
            if len(self._admitted) + 1 <= budget:
                self._admitted.append(now)
                return None
            self.rejected.append(recorded)
            wait = self._admitted[0] + self.rpm_window - now
        return self.error(
            429,
            "rate_limit_error",
            f"Number of requests has exceeded your per-minute rate limit ({self.rpm_limit:g})",
            headers={"retry-after": str(max(int(wait + 0.999), 1))},
        )

    def _stream_response(
        self, scripted: Scripted, body: dict[str, Any], include_usage: bool
    ) -> Response:
        events = list(self.stream_events(scripted, body, include_usage))

        def generate() -> Iterator[bytes]:
            sent_deltas = 0
            for event in events:
                is_delta = isinstance(event, TextDelta)
                if (
                    is_delta
                    and scripted.drop_after is not None
                    and sent_deltas >= scripted.drop_after
                ):
                    raise DropConnection("connection dropped by the test server")
                data = event.encode()
                step = scripted.chunk_size or len(data)
                for start in range(0, len(data), step):
                    if scripted.trickle is not None:
                        time.sleep(scripted.trickle)
                    yield data[start : start + step]
                sent_deltas += is_delta

        return Response(
            generate(),
            status=200,
            headers={"cache-control": "no-cache", **self.limit_headers(), **scripted.headers},
            mimetype="text/event-stream",
            direct_passthrough=True,
        )

    def deltas_of(self, scripted: Scripted) -> list[str]:
        if scripted.deltas is not None:
            return scripted.deltas
        words = scripted.text.split(" ")
        return [word + (" " if i < len(words) - 1 else "") for i, word in enumerate(words)]

    def usage_of(self, scripted: Scripted, body: Any) -> tuple[int, int]:
        prompt = json.dumps(body.get("messages", "")) if isinstance(body, dict) else ""
        return (
            scripted.input_tokens if scripted.input_tokens is not None else _token_count(prompt),
            scripted.output_tokens
            if scripted.output_tokens is not None
            else _token_count(scripted.text),
        )

    # -- batches ------------------------------------------------------------------------------

    def register_batch_endpoints(self) -> None:
        """The provider's batch API (see the subclasses)."""

    def process_item(self, request: Request, body: Any) -> tuple[int, Any]:
        """One batch item answered as a single request would be: ``(status, JSON body)``."""
        with self.lock:
            self.requests.append(
                Recorded("BATCH", self.path, dict(request.headers.items()), body, time.time())
            )
        problem = self.validate(request, body)
        if problem is not None:
            return problem.status_code, json.loads(problem.get_data())
        with self.lock:
            scripted = self.script.popleft() if self.script else Scripted(text=self.default_text)
        if scripted.status >= 400:
            error = self.error(
                scripted.status,
                scripted.error_type or "api_error",
                scripted.error_message or "error",
            )
            return scripted.status, json.loads(error.get_data())
        return 200, json.loads(self.success(scripted, body).get_data())

    def batch_finished(self, batch: dict[str, Any], request: Request) -> bool:
        """Count one status poll; after ``batch_polls`` of them, answer every item (once)."""
        batch["polls"] += 1
        if batch["polls"] > self.batch_polls and batch["results"] is None:
            # Each item is checked as if sent with the creating request's headers.
            created = batch["created_by"]
            batch["results"] = [
                (custom_id, *self.process_item(created, body))
                for custom_id, body in batch["requests"]
            ]
        return batch["results"] is not None

    def _json(self, data: Any, status: int = 200) -> Response:
        return Response(json.dumps(data), status=status, content_type="application/json")

    # -- provider specifics ------------------------------------------------------------------

    def validate(self, request: Request, body: Any) -> Response | None:
        raise NotImplementedError

    def error(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        raw_body: str | None = None,
    ) -> Response:
        raise NotImplementedError

    def success(self, scripted: Scripted, body: dict[str, Any]) -> Response:
        raise NotImplementedError

    def stream_events(
        self, scripted: Scripted, body: dict[str, Any], include_usage: bool
    ) -> Iterable[str]:
        raise NotImplementedError

    def limit_headers(self) -> dict[str, str]:
        return {}


class TextDelta(str):
    """An SSE event that carries text (what ``drop_after`` counts)."""


def _sse(event: str | None, data: Any) -> str:
    text = data if isinstance(data, str) else json.dumps(data)
    return (f"event: {event}\n" if event else "") + f"data: {text}\n\n"


class AnthropicServer(LLMServer):
    """The Anthropic Messages API (``POST /v1/messages``)."""

    path = "/v1/messages"
    default_model = "claude-sonnet-5-5"
    #: The Messages API's fields, as the installed SDK (anthropic 2.14) documents them: it has
    #: no temperature, top_p or top_k any more.
    FIELDS = frozenset(
        {
            "model",
            "max_tokens",
            "messages",
            "system",
            "stop_sequences",
            "stream",
            "metadata",
            "tools",
            "tool_choice",
            "thinking",
            "service_tier",
            "output_config",
            "cache_control",
            "container",
            "inference_geo",
            "speed",
            "diagnostics",
            "user_profile_id",
            "workspace_id",
        }
    )

    @property
    def base_url(self) -> str:
        return self.server.url_for("/").rstrip("/")

    def error(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        raw_body: str | None = None,
    ) -> Response:
        body = raw_body or json.dumps(
            {
                "type": "error",
                "error": {"type": error_type, "message": message},
                "request_id": f"req_{next(self._ids):08d}",
            }
        )
        return Response(
            body,
            status=status,
            headers={"request-id": f"req_{next(self._ids):08d}", **(headers or {})},
            content_type="application/json",
        )

    def _invalid(self, message: str) -> Response:
        return self.error(400, "invalid_request_error", message)

    def register_batch_endpoints(self) -> None:
        base = "/v1/messages/batches"
        self.server.expect_request(base, method="POST").respond_with_handler(self.create_batch)
        self.server.expect_request(
            re.compile(r"^/v1/messages/batches/[^/]+$"), method="GET"
        ).respond_with_handler(self.retrieve_batch)
        self.server.expect_request(
            re.compile(r"^/v1/messages/batches/[^/]+/results$"), method="GET"
        ).respond_with_handler(self.batch_results)

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        ended = batch["results"] is not None
        results = batch["results"] or []
        succeeded = sum(1 for _, status, _ in results if status == 200)
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        return {
            "id": batch_id,
            "type": "message_batch",
            "processing_status": "ended" if ended else "in_progress",
            "request_counts": {
                "processing": 0 if ended else len(batch["requests"]),
                "succeeded": succeeded,
                "errored": len(results) - succeeded,
                "canceled": 0,
                "expired": 0,
            },
            "created_at": now,
            "expires_at": now,
            "ended_at": now if ended else None,
            "archived_at": None,
            "cancel_initiated_at": None,
            "results_url": f"{self.base_url}/v1/messages/batches/{batch_id}/results"
            if ended
            else None,
        }

    def create_batch(self, request: Request) -> Response:
        body = json.loads(request.get_data(as_text=True) or "null")
        if not isinstance(body, dict) or set(body) != {"requests"}:
            return self._invalid("requests: Field required; no other field is permitted")
        items = body["requests"]
        if not isinstance(items, list) or not items:
            return self._invalid("requests: at least one request is required")
        seen: set[str] = set()
        for index, item in enumerate(items):
            if not isinstance(item, dict) or set(item) != {"custom_id", "params"}:
                return self._invalid(f"requests.{index}: 'custom_id' and 'params' are required")
            custom_id = item["custom_id"]
            if not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", str(custom_id)) or custom_id in seen:
                return self._invalid(f"requests.{index}.custom_id: must be unique, 1-64 chars")
            if "stream" in item["params"]:
                return self._invalid(f"requests.{index}.params.stream: not permitted in batches")
            seen.add(custom_id)
        batch_id = f"msgbatch_{next(self._ids):08d}"
        with self.lock:
            self.batches[batch_id] = {
                "requests": [(item["custom_id"], item["params"]) for item in items],
                "polls": 0,
                "results": None,
                "created_by": request,
            }
        return self._json(self._batch_object(batch_id))

    def retrieve_batch(self, request: Request) -> Response:
        batch_id = request.path.rsplit("/", 1)[1]
        if batch_id not in self.batches:
            return self.error(404, "not_found_error", f"batch {batch_id} not found")
        self.batch_finished(self.batches[batch_id], request)
        return self._json(self._batch_object(batch_id))

    def batch_results(self, request: Request) -> Response:
        batch_id = request.path.split("/")[-2]
        batch = self.batches.get(batch_id)
        if batch is None or batch["results"] is None:
            return self.error(404, "not_found_error", "results are not available yet")
        lines = []
        for custom_id, status, data in reversed(batch["results"]):  # order not guaranteed
            result = (
                {"type": "succeeded", "message": data}
                if status == 200
                else {"type": "errored", "error": data}
            )
            lines.append(json.dumps({"custom_id": custom_id, "result": result}))
        return Response("\n".join(lines) + "\n", content_type="application/binary")

    def validate(self, request: Request, body: Any) -> Response | None:
        if self.api_key is not None:
            given = request.headers.get("x-api-key")
            bearer = request.headers.get("authorization", "")
            if given != self.api_key and bearer != f"Bearer {self.api_key}":
                message = "invalid x-api-key"
                if self.echo_credentials:
                    message += f": {bearer or given}"
                return self.error(401, "authentication_error", message)
        version = request.headers.get("anthropic-version")
        if version is None:
            return self._invalid("anthropic-version: header is required")
        if version not in ANTHROPIC_VERSIONS:
            return self._invalid(f"anthropic-version: invalid version {version!r}")
        if request.mimetype != "application/json":
            return self._invalid("Content-Type must be application/json")
        if not isinstance(body, dict):
            return self._invalid("request body must be a JSON object")
        for name in sorted(set(body) - self.FIELDS):
            return self._invalid(f"{name}: Extra inputs are not permitted")
        for name in ("model", "max_tokens", "messages"):
            if name not in body:
                return self._invalid(f"{name}: Field required")
        if not isinstance(body["model"], str) or not body["model"]:
            return self._invalid("model: Input should be a valid string")
        max_tokens = body["max_tokens"]
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            return self._invalid("max_tokens: Input should be greater than or equal to 1")
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return self._invalid("messages: at least one message is required")
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or set(message) - {"role", "content"}:
                return self._invalid(f"messages.{index}: Extra inputs are not permitted")
            if message.get("role") not in ("user", "assistant"):
                return self._invalid(
                    f"messages.{index}.role: Input should be 'user' or 'assistant'"
                )
            if not isinstance(message.get("content"), (str, list)):
                return self._invalid(f"messages.{index}.content: Field required")
        if "system" in body:
            system = body["system"]
            blocks_ok = isinstance(system, list) and all(
                isinstance(b, dict) and b.get("type") == "text" and isinstance(b.get("text"), str)
                for b in system
            )
            if not isinstance(system, str) and not blocks_ok:
                return self._invalid("system: Input should be a valid string or text blocks")
        if "stop_sequences" in body:
            stops = body["stop_sequences"]
            if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
                return self._invalid("stop_sequences: Input should be a valid list of strings")
        if "stream" in body and not isinstance(body["stream"], bool):
            return self._invalid("stream: Input should be a valid boolean")
        return (
            self._check_system_blocks(body)
            or self._check_content_blocks(messages)
            or self._check_tools(body)
            or self._check_output_config(body)
        )

    #: The content blocks this server understands, with their fields (the Messages API's).
    BLOCK_FIELDS: Mapping[str, frozenset[str]] = {
        "text": frozenset({"type", "text", "cache_control", "citations"}),
        "tool_use": frozenset({"type", "id", "name", "input", "cache_control"}),
        "tool_result": frozenset({"type", "tool_use_id", "content", "is_error", "cache_control"}),
    }

    def _check_cache_control(self, where: str, block: Mapping[str, Any]) -> Response | None:
        if "cache_control" not in block or block["cache_control"] is None:
            return None
        control = block["cache_control"]
        if (
            not isinstance(control, dict)
            or control.get("type") != "ephemeral"
            or set(control) - {"type", "ttl"}
            or control.get("ttl", "5m") not in ("5m", "1h")
        ):
            return self._invalid(f"{where}.cache_control: Input should be {{'type': 'ephemeral'}}")
        return None

    def _check_system_blocks(self, body: dict[str, Any]) -> Response | None:
        system = body.get("system")
        if not isinstance(system, list):
            return None
        for index, block in enumerate(system):
            extra = set(block) - self.BLOCK_FIELDS["text"]
            if extra:
                return self._invalid(
                    f"system.{index}.{sorted(extra)[0]}: Extra inputs are not permitted"
                )
            problem = self._check_cache_control(f"system.{index}", block)
            if problem is not None:
                return problem
        return None

    def _check_content_blocks(self, messages: list[Any]) -> Response | None:
        previous_tool_ids: set[str] = set()
        for index, message in enumerate(messages):
            content = message["content"]
            tool_ids: set[str] = set()
            for number, block in enumerate(content if isinstance(content, list) else []):
                where = f"messages.{index}.content.{number}"
                kind = block.get("type") if isinstance(block, dict) else None
                if kind not in self.BLOCK_FIELDS:
                    return self._invalid(f"{where}.type: Input tag {kind!r} is not a block type")
                extra = set(block) - self.BLOCK_FIELDS[kind]
                if extra:
                    return self._invalid(
                        f"{where}.{sorted(extra)[0]}: Extra inputs are not permitted"
                    )
                problem = self._check_cache_control(where, block)
                if problem is not None:
                    return problem
                if kind == "tool_use":
                    if message["role"] != "assistant" or not isinstance(block.get("input"), dict):
                        return self._invalid(f"{where}: tool_use blocks belong to the assistant")
                    tool_ids.add(str(block.get("id")))
                if kind == "tool_result" and block.get("tool_use_id") not in previous_tool_ids:
                    return self._invalid(
                        f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                        f"{block.get('tool_use_id')}. Each `tool_result` block must have a "
                        "corresponding `tool_use` block in the previous message."
                    )
            previous_tool_ids = tool_ids
        return None

    def _check_tools(self, body: dict[str, Any]) -> Response | None:
        names: set[str] = set()
        tools = body.get("tools", [])
        if not isinstance(tools, list):
            return self._invalid("tools: Input should be a valid list")
        for index, tool in enumerate(tools):
            if not isinstance(tool, dict):
                return self._invalid(f"tools.{index}: Input should be an object")
            extra = set(tool) - {
                "name",
                "description",
                "input_schema",
                "cache_control",
                "type",
                "strict",
            }
            if extra:
                return self._invalid(
                    f"tools.{index}.{sorted(extra)[0]}: Extra inputs are not permitted"
                )
            name = tool.get("name")
            if not isinstance(name, str) or not re.fullmatch(r"[a-zA-Z0-9_-]{1,128}", name):
                return self._invalid(f"tools.{index}.name: String should match pattern")
            schema = tool.get("input_schema")
            if not isinstance(schema, dict) or schema.get("type") != "object":
                return self._invalid(f"tools.{index}.input_schema.type: Input should be 'object'")
            names.add(name)
        if "tool_choice" in body:
            choice = body["tool_choice"]
            if not isinstance(choice, dict) or choice.get("type") not in (
                "auto",
                "any",
                "tool",
                "none",
            ):
                return self._invalid(
                    "tool_choice: Input tag does not match any of the expected tags"
                )
            if choice["type"] == "tool" and choice.get("name") not in names:
                return self._invalid(
                    f"tool_choice.name: tool {choice.get('name')!r} not found in tools"
                )
        return None

    def _check_output_config(self, body: dict[str, Any]) -> Response | None:
        if "output_config" not in body:
            return None
        config = body["output_config"]
        if not isinstance(config, dict) or set(config) - {"effort", "format"}:
            return self._invalid("output_config: Extra inputs are not permitted")
        fmt = config.get("format")
        if fmt is not None and (
            not isinstance(fmt, dict)
            or fmt.get("type") != "json_schema"
            or set(fmt) != {"type", "schema"}
            or not isinstance(fmt["schema"], dict)
        ):
            return self._invalid(
                "output_config.format: Input should be {'type': 'json_schema', 'schema': {...}}"
            )
        return None

    def limit_headers(self) -> dict[str, str]:
        window = self.window_state()
        if window is None:
            return {}
        remaining, reset = window
        at = datetime.fromtimestamp(time.time() + reset, UTC)
        return {
            "anthropic-ratelimit-requests-limit": f"{self.rpm_limit:g}",
            "anthropic-ratelimit-requests-remaining": str(remaining),
            "anthropic-ratelimit-requests-reset": at.isoformat().replace("+00:00", "Z"),
        }

    @staticmethod
    def _usage(scripted: Scripted, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        """Anthropic's usage: ``input_tokens`` excludes the cache's reads and writes."""
        return {
            "input_tokens": input_tokens,
            "cache_creation_input_tokens": scripted.cache_write,
            "cache_read_input_tokens": scripted.cache_read,
            "output_tokens": output_tokens,
        }

    def success(self, scripted: Scripted, body: dict[str, Any]) -> Response:
        input_tokens, output_tokens = self.usage_of(scripted, body)
        content: list[dict[str, Any]] = (
            [{"type": "text", "text": scripted.text}]
            if scripted.text or not scripted.tool_calls
            else []
        )
        content.extend(
            {
                "type": "tool_use",
                "id": f"toolu_{next(self._ids):08d}",
                "name": name,
                "input": arguments,
            }
            for name, arguments in scripted.tool_calls
        )
        message = {
            "id": f"msg_{next(self._ids):08d}",
            "type": "message",
            "role": "assistant",
            "model": scripted.model or body["model"],
            "content": content,
            "stop_reason": scripted.stop_reason
            or ("tool_use" if scripted.tool_calls else "end_turn"),
            "stop_sequence": None,
            "usage": self._usage(scripted, input_tokens, output_tokens),
        }
        return Response(
            json.dumps(message),
            status=200,
            headers={
                "request-id": f"req_{next(self._ids):08d}",
                **self.limit_headers(),
                **scripted.headers,
            },
            content_type="application/json",
        )

    def stream_events(
        self, scripted: Scripted, body: dict[str, Any], include_usage: bool
    ) -> Iterable[str]:
        input_tokens, output_tokens = self.usage_of(scripted, body)
        yield _sse(
            "message_start",
            {
                "type": "message_start",
                "message": {
                    "id": f"msg_{next(self._ids):08d}",
                    "type": "message",
                    "role": "assistant",
                    "model": scripted.model or body["model"],
                    "content": [],
                    "stop_reason": None,
                    "stop_sequence": None,
                    "usage": self._usage(scripted, input_tokens, 1),
                },
            },
        )
        yield _sse(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        )
        yield _sse("ping", {"type": "ping"})
        for number, delta in enumerate(self.deltas_of(scripted)):
            if scripted.stream_error is not None and number == scripted.stream_error[0]:
                _, kind, message = scripted.stream_error
                yield _sse("error", {"type": "error", "error": {"type": kind, "message": message}})
                return
            yield TextDelta(
                _sse(
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": delta},
                    },
                )
            )
        if scripted.end_early:
            return
        yield _sse("content_block_stop", {"type": "content_block_stop", "index": 0})
        yield _sse(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": scripted.stop_reason or "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": output_tokens},
            },
        )
        yield _sse("message_stop", {"type": "message_stop"})


class OpenAIServer(LLMServer):
    """The OpenAI Chat Completions API (``POST /v1/chat/completions``)."""

    path = "/v1/chat/completions"
    default_model = "gpt-4o-mini"
    FIELDS = frozenset(
        {
            "model",
            "messages",
            "max_tokens",
            "max_completion_tokens",
            "temperature",
            "top_p",
            "n",
            "stop",
            "stream",
            "stream_options",
            "response_format",
            "seed",
            "tools",
            "tool_choice",
            "user",
            "presence_penalty",
            "frequency_penalty",
            "logit_bias",
            "logprobs",
            "top_logprobs",
            "prompt_cache_key",
            "prompt_cache_retention",
            "parallel_tool_calls",
        }
    )
    ROLES = frozenset({"system", "developer", "user", "assistant", "tool"})
    MESSAGE_FIELDS = frozenset({"role", "content", "name", "tool_calls", "tool_call_id", "refusal"})

    @property
    def base_url(self) -> str:
        return self.server.url_for("/v1")

    def error(
        self,
        status: int,
        error_type: str,
        message: str,
        *,
        headers: Mapping[str, str] | None = None,
        raw_body: str | None = None,
    ) -> Response:
        code = {429: "rate_limit_exceeded", 401: "invalid_api_key"}.get(status)
        body = raw_body or json.dumps(
            {"error": {"message": message, "type": error_type, "param": None, "code": code}}
        )
        return Response(
            body,
            status=status,
            headers={"x-request-id": f"req_{next(self._ids):08d}", **(headers or {})},
            content_type="application/json",
        )

    def register_batch_endpoints(self) -> None:
        self.files: dict[str, tuple[str, bytes]] = {}
        self.server.expect_request("/v1/files", method="POST").respond_with_handler(
            self.upload_file
        )
        self.server.expect_request(
            re.compile(r"^/v1/files/[^/]+/content$"), method="GET"
        ).respond_with_handler(self.file_content)
        self.server.expect_request("/v1/batches", method="POST").respond_with_handler(
            self.create_batch
        )
        self.server.expect_request(
            re.compile(r"^/v1/batches/[^/]+$"), method="GET"
        ).respond_with_handler(self.retrieve_batch)

    def upload_file(self, request: Request) -> Response:
        if request.form.get("purpose") != "batch" or "file" not in request.files:
            return self._invalid("'purpose' must be 'batch' and 'file' is required.", "file")
        upload = request.files["file"]
        data = upload.read()
        file_id = f"file-{next(self._ids):08d}"
        self.files[file_id] = (upload.filename or "batch.jsonl", data)
        return self._json(
            {
                "id": file_id,
                "object": "file",
                "bytes": len(data),
                "created_at": int(time.time()),
                "filename": upload.filename,
                "purpose": "batch",
                "status": "processed",
            }
        )

    def file_content(self, request: Request) -> Response:
        file_id = request.path.split("/")[-2]
        if file_id not in self.files:
            return self._invalid(f"No such File object: {file_id}", "id")
        return Response(self.files[file_id][1], content_type="application/octet-stream")

    def _batch_object(self, batch_id: str) -> dict[str, Any]:
        batch = self.batches[batch_id]
        done = batch["results"] is not None
        return {
            "id": batch_id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "input_file_id": batch["input_file_id"],
            "completion_window": "24h",
            "status": batch.get("status") or ("completed" if done else "in_progress"),
            "output_file_id": batch.get("output_file_id"),
            "error_file_id": batch.get("error_file_id"),
            "created_at": int(time.time()),
            "metadata": batch["metadata"],
            "request_counts": {
                "total": len(batch["requests"]),
                "completed": len(batch["requests"]) - batch.get("failed", 0) if done else 0,
                "failed": batch.get("failed", 0),
            },
        }

    def create_batch(self, request: Request) -> Response:
        body = json.loads(request.get_data(as_text=True) or "null")
        if not isinstance(body, dict):
            return self._invalid("We could not parse the JSON body of your request.")
        for name in sorted(
            set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        ):
            return self._invalid(f"Unrecognized request argument supplied: {name}")
        if body.get("endpoint") != "/v1/chat/completions" or body.get("completion_window") != "24h":
            return self._invalid("Invalid 'endpoint' or 'completion_window'.", "endpoint")
        stored = self.files.get(str(body.get("input_file_id")))
        if stored is None:
            return self._invalid("Invalid 'input_file_id'.", "input_file_id")
        requests: list[tuple[str, Any]] = []
        for number, line in enumerate(stored[1].decode().splitlines(), 1):
            item = json.loads(line)
            if (
                set(item) != {"custom_id", "method", "url", "body"}
                or item["method"] != "POST"
                or (item["url"] != "/v1/chat/completions")
            ):
                return self._invalid(f"Line {number}: invalid batch request.", "input_file_id")
            requests.append((item["custom_id"], item["body"]))
        batch_id = f"batch_{next(self._ids):08d}"
        with self.lock:
            self.batches[batch_id] = {
                "requests": requests,
                "polls": 0,
                "results": None,
                "created_by": request,
                "input_file_id": body["input_file_id"],
                "metadata": body.get("metadata"),
            }
        return self._json(self._batch_object(batch_id))

    def retrieve_batch(self, request: Request) -> Response:
        batch_id = request.path.rsplit("/", 1)[1]
        batch = self.batches.get(batch_id)
        if batch is None:
            return self._invalid(f"No batch found with id '{batch_id}'.", "batch_id")
        if batch.get("status") is not None:  # ended by end_batch: no results
            return self._json(self._batch_object(batch_id))
        if self.batch_finished(batch, request) and "output_file_id" not in batch:
            # As OpenAI does: the answered items in the output file, the failed ones in the
            # error file; a file id is null when it would be empty.
            lines: dict[bool, list[str]] = {True: [], False: []}
            for n, (custom_id, status, data) in enumerate(reversed(batch["results"])):
                lines[status == 200].append(
                    json.dumps(
                        {
                            "id": f"batch_req_{n}",
                            "custom_id": custom_id,
                            "response": {
                                "status_code": status,
                                "request_id": f"req_{n}",
                                "body": data,
                            },
                            "error": None,
                        }
                    )
                )
            for key, ok, name in (
                ("output_file_id", True, "output"),
                ("error_file_id", False, "errors"),
            ):
                batch[key] = None
                if lines[ok]:
                    batch[key] = f"file-{next(self._ids):08d}"
                    self.files[batch[key]] = (
                        f"{name}.jsonl",
                        ("\n".join(lines[ok]) + "\n").encode(),
                    )
            batch["failed"] = len(lines[False])
        return self._json(self._batch_object(batch_id))

    def end_batch(self, batch_id: str, status: str) -> None:
        """End a batch without results, as the provider does: ``expired`` (not done within its
        completion window), ``failed`` or ``cancelled``."""
        with self.lock:
            self.batches[batch_id]["status"] = status

    def _invalid(self, message: str, param: str | None = None) -> Response:
        return Response(
            json.dumps(
                {
                    "error": {
                        "message": message,
                        "type": "invalid_request_error",
                        "param": param,
                        "code": None,
                    }
                }
            ),
            status=400,
            content_type="application/json",
        )

    def validate(self, request: Request, body: Any) -> Response | None:
        bearer = request.headers.get("authorization")
        if self.api_key is not None and bearer != f"Bearer {self.api_key}":
            return self.error(
                401,
                "invalid_request_error",
                "Incorrect API key provided"
                + (f": {bearer}" if self.echo_credentials else "")
                + ". You can find your API key at https://platform.openai.com/account/api-keys.",
            )
        if request.mimetype != "application/json":
            return self._invalid("Content-Type must be application/json")
        if not isinstance(body, dict):
            return self._invalid("We could not parse the JSON body of your request.")
        for name in sorted(set(body) - self.FIELDS):
            return self._invalid(f"Unrecognized request argument supplied: {name}")
        for name in ("model", "messages"):
            if name not in body:
                return self._invalid(f"Missing required parameter: '{name}'.", name)
        messages = body["messages"]
        if not isinstance(messages, list) or not messages:
            return self._invalid("'messages' must be a non-empty array.", "messages")
        open_calls: set[str] = set()
        for index, message in enumerate(messages):
            if not isinstance(message, dict) or message.get("role") not in self.ROLES:
                return self._invalid(
                    f"Invalid value for 'messages[{index}].role'.", f"messages[{index}].role"
                )
            extra = set(message) - self.MESSAGE_FIELDS
            if extra:
                return self._invalid(
                    f"Unrecognized request argument supplied: messages[{index}].{sorted(extra)[0]}"
                )
            calls = message.get("tool_calls")
            if calls is not None:
                if message["role"] != "assistant" or not isinstance(calls, list):
                    return self._invalid(f"Invalid 'messages[{index}].tool_calls'.")
                for call in calls:
                    function = call.get("function") if isinstance(call, dict) else None
                    if (
                        not isinstance(function, dict)
                        or call.get("type") != "function"
                        or set(call) != {"id", "type", "function"}
                        or set(function) != {"name", "arguments"}
                        or not isinstance(function["arguments"], str)
                    ):
                        return self._invalid(f"Invalid 'messages[{index}].tool_calls'.")
                    open_calls.add(call["id"])
            if message["role"] == "tool" and message.get("tool_call_id") not in open_calls:
                return self._invalid(
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    "preceeding message with 'tool_calls'.",
                    f"messages.[{index}].role",
                )
            content = message.get("content")
            if not (isinstance(content, (str, list)) or (content is None and calls)):
                return self._invalid(
                    f"Missing required parameter: 'messages[{index}].content'.",
                    f"messages[{index}].content",
                )
            for part in content if isinstance(content, list) else []:
                if (
                    not isinstance(part, dict)
                    or part.get("type") != "text"
                    or set(part) != {"type", "text"}
                ):
                    return self._invalid(
                        f"Invalid 'messages[{index}].content': unknown content part {part!r}."
                    )
        for name in ("max_tokens", "max_completion_tokens"):
            if name in body:
                value = body[name]
                if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                    return self._invalid(f"Invalid '{name}': integer below minimum value.", name)
        if "temperature" in body:
            temperature = body["temperature"]
            if not isinstance(temperature, (int, float)) or not 0 <= temperature <= 2:
                return self._invalid(
                    "Invalid 'temperature': must be between 0 and 2.", "temperature"
                )
        if "stop" in body:
            stop = body["stop"]
            stops = [stop] if isinstance(stop, str) else stop
            if not isinstance(stops, list) or len(stops) > 4:
                return self._invalid("Invalid 'stop': at most 4 sequences.", "stop")
        if "stream_options" in body and not body.get("stream"):
            return self._invalid(
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                "stream_options",
            )
        if "prompt_cache_key" in body and not isinstance(body["prompt_cache_key"], str):
            return self._invalid("Invalid type for 'prompt_cache_key'.", "prompt_cache_key")
        problem = self._check_tools(body)
        if problem is not None:
            return problem
        if "response_format" in body:
            kind = (body["response_format"] or {}).get("type")
            if kind not in ("text", "json_object", "json_schema"):
                return self._invalid("Invalid 'response_format.type'.", "response_format.type")
            if kind == "json_schema":
                problem = self._check_json_schema(body["response_format"])
                if problem is not None:
                    return problem
            if kind == "json_object" and "json" not in json.dumps(messages).lower():
                return self._invalid(
                    "'messages' must contain the word 'json' in some form, to use "
                    "'response_format' of type 'json_object'.",
                    "messages",
                )
        return None

    def _check_tools(self, body: dict[str, Any]) -> Response | None:
        names: set[str] = set()
        for index, tool in enumerate(body.get("tools") or []):
            function = tool.get("function") if isinstance(tool, dict) else None
            if (
                not isinstance(function, dict)
                or tool.get("type") != "function"
                or set(tool) != {"type", "function"}
                or set(function) - {"name", "description", "parameters", "strict"}
                or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", str(function.get("name")))
            ):
                return self._invalid(f"Invalid 'tools[{index}]'.", f"tools[{index}]")
            names.add(function["name"])
        if "tool_choice" in body:
            choice = body["tool_choice"]
            if not names:
                return self._invalid(
                    "Invalid value for 'tool_choice': 'tool_choice' is only allowed when "
                    "'tools' are specified.",
                    "tool_choice",
                )
            named = (
                isinstance(choice, dict)
                and choice.get("type") == "function"
                and choice.get("function", {}).get("name") in names
            )
            if choice not in ("auto", "none", "required") and not named:
                return self._invalid("Invalid value for 'tool_choice'.", "tool_choice")
        return None

    def _check_json_schema(self, response_format: dict[str, Any]) -> Response | None:
        spec = response_format.get("json_schema")
        if (
            set(response_format) != {"type", "json_schema"}
            or not isinstance(spec, dict)
            or set(spec) - {"name", "description", "schema", "strict"}
            or not re.fullmatch(r"[a-zA-Z0-9_-]{1,64}", str(spec.get("name")))
        ):
            return self._invalid(
                "Invalid 'response_format.json_schema'.", "response_format.json_schema"
            )
        if spec.get("strict"):

            def problem(node: Any) -> str | None:
                if isinstance(node, dict):
                    if node.get("type") == "object":
                        if node.get("additionalProperties") is not False:
                            return (
                                "'additionalProperties' is required to be supplied and to be false"
                            )
                        if set(node.get("properties", {})) != set(node.get("required", [])):
                            return (
                                "'required' is required to be supplied and to be an array "
                                "including every key in properties"
                            )
                    return next(filter(None, (problem(value) for value in node.values())), None)
                if isinstance(node, list):
                    return next(filter(None, (problem(value) for value in node)), None)
                return None

            found = problem(spec.get("schema", {}))
            if found is not None:
                return self._invalid(
                    f"Invalid schema for response_format '{spec['name']}': {found}.",
                    "response_format",
                )
        return None

    def limit_headers(self) -> dict[str, str]:
        window = self.window_state()
        if window is None:
            return {}
        remaining, reset = window
        return {
            "x-ratelimit-limit-requests": f"{self.rpm_limit:g}",
            "x-ratelimit-remaining-requests": str(remaining),
            "x-ratelimit-reset-requests": f"{max(round(reset * 1000), 1)}ms",
        }

    @staticmethod
    def _usage(scripted: Scripted, input_tokens: int, output_tokens: int) -> dict[str, Any]:
        """OpenAI's usage: ``prompt_tokens`` includes the cached ones."""
        prompt = input_tokens + scripted.cache_read
        return {
            "prompt_tokens": prompt,
            "completion_tokens": output_tokens,
            "total_tokens": prompt + output_tokens,
            "prompt_tokens_details": {"cached_tokens": scripted.cache_read, "audio_tokens": 0},
            "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
        }

    def success(self, scripted: Scripted, body: dict[str, Any]) -> Response:
        input_tokens, output_tokens = self.usage_of(scripted, body)
        message: dict[str, Any] = {
            "role": "assistant",
            "content": scripted.text if scripted.text or not scripted.tool_calls else None,
            "refusal": None,
        }
        if scripted.tool_calls:
            message["tool_calls"] = [
                {
                    "id": f"call_{next(self._ids):08d}",
                    "type": "function",
                    "function": {"name": name, "arguments": json.dumps(arguments)},
                }
                for name, arguments in scripted.tool_calls
            ]
        completion = {
            "id": f"chatcmpl-{next(self._ids):08d}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": scripted.model or body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "logprobs": None,
                    "finish_reason": scripted.stop_reason
                    or ("tool_calls" if scripted.tool_calls else "stop"),
                }
            ],
            "usage": self._usage(scripted, input_tokens, output_tokens),
        }
        return Response(
            json.dumps(completion),
            status=200,
            headers={
                "x-request-id": f"req_{next(self._ids):08d}",
                **self.limit_headers(),
                **scripted.headers,
            },
            content_type="application/json",
        )

    def stream_events(
        self, scripted: Scripted, body: dict[str, Any], include_usage: bool
    ) -> Iterable[str]:
        input_tokens, output_tokens = self.usage_of(scripted, body)
        base = {
            "id": f"chatcmpl-{next(self._ids):08d}",
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": scripted.model or body["model"],
        }

        def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            extra = {"usage": None} if include_usage else {}
            return _sse(None, {**base, "choices": [choice], **extra})

        yield chunk({"role": "assistant", "content": ""})
        for number, delta in enumerate(self.deltas_of(scripted)):
            if scripted.stream_error is not None and number == scripted.stream_error[0]:
                _, kind, message = scripted.stream_error
                yield _sse(None, {"error": {"message": message, "type": kind, "code": None}})
                return
            yield TextDelta(chunk({"content": delta}))
        if scripted.end_early:
            return
        yield chunk({}, scripted.stop_reason or "stop")
        if include_usage:
            usage = self._usage(scripted, input_tokens, output_tokens)
            yield _sse(None, {**base, "choices": [], "usage": usage})
        yield _sse(None, "[DONE]")


SERVERS: dict[str, type[LLMServer]] = {"anthropic": AnthropicServer, "openai": OpenAIServer}


@contextmanager
def llm_server(kind: str, **options: Any) -> Iterator[Any]:
    """A threaded HTTP/1.1 server speaking ``kind``'s API (``anthropic`` or ``openai``)."""
    server = HTTPServer(host="127.0.0.1", threaded=True)
    server.no_handler_status_code = 404
    server.start()
    try:
        yield SERVERS[kind](server, **options)
    finally:
        server.clear()
        if server.is_running():
            server.stop()


# -- a server in its own process (benches, and tests with several client processes) ----------


def _serve(kind: str, options: dict[str, Any], conn: Any) -> None:
    with llm_server(kind, **options) as server:
        # The fake provider stamps a request's arrival in Python, after its own queue: a full
        # garbage collection of this process's heap (about 180 ms, measured) would stamp the
        # requests that arrived meanwhile all at once, bunched into one window, which is a
        # stall of the fake, not of the client under test (a provider counts at its edge).
        # Objects alive after start-up are frozen out of the collector's scans.
        gc.collect()
        gc.freeze()
        conn.send(server.base_url)
        conn.recv()  # any message: report and stop
        conn.send(
            {
                "requests": len(server.requests),
                "rejected": len(server.rejected),
                "times": [r.at for r in server.requests],
                "rejected_times": [r.at for r in server.rejected],
            }
        )


@contextmanager
def llm_server_process(kind: str, **options: Any) -> Iterator[tuple[str, Any]]:
    """``kind``'s server in a separate process (no shared GIL with the measured client).

    Yields ``(base_url, report)``; ``report()`` stops the server and returns
    ``{"requests", "rejected", "times"}`` (arrival times of the served requests).
    """
    context = multiprocessing.get_context("spawn")
    parent, child = context.Pipe()
    process = context.Process(target=_serve, args=(kind, options, child), daemon=True)
    process.start()
    base_url = parent.recv()
    result: dict[str, Any] = {}

    def report() -> dict[str, Any]:
        if not result:
            parent.send("stop")
            result.update(parent.recv())
        return result

    try:
        yield base_url, report
    finally:
        report()
        process.join(10)
