"""Token and request totals on the step's materialization, without ``telemetry.observe``.

Inside an asset or op, every ``flowstone.llm.call`` event (a call of :class:`~.client.LLMClient`
or of the SDK client :meth:`~.resource.LLMResource.get_client` hands out) is summed for the
step it runs in, and the totals are set with ``context.add_output_metadata`` after each call
(Dagster keeps the last value of a key), as ``dagster-openai``'s ``get_client(context)`` does::

    flowstone/llm/calls              requests answered or failed (dagster-openai: openai.calls)
    flowstone/llm/prompt_tokens      input tokens, cached ones included (openai.prompt_tokens)
    flowstone/llm/completion_tokens  output tokens (openai.completion_tokens)
    flowstone/llm/total_tokens       both (openai.total_tokens)
    flowstone/llm/cache_read_tokens  input tokens read from the provider's prompt cache
    flowstone/llm/cache_write_tokens input tokens written to it (Anthropic)
    flowstone/llm/errors, /attempts  failed calls, requests sent
    flowstone/llm/models             the models that answered (with fallbacks: which did)

The step is found through Dagster's public ``OpExecutionContext.get()``, which is set in the
thread running the asset's body (and in threads started with ``contextvars.copy_context()``):
calls made from a plain worker thread are not attributed (wrap them in
``telemetry.observe(context)``, or run them in a copied context). An op with several outputs
gets no automatic metadata (Dagster needs the output's name): a DEBUG log line says so.
"""

from __future__ import annotations

import logging
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from flowstone_dagster import telemetry

__all__ = [
    "METADATA_PREFIX",
    "UsageTotals",
    "attach_usage",
    "attributed_to",
    "bound_context",
    "current_step_context",
]

logger = logging.getLogger(__name__)

METADATA_PREFIX = "flowstone/llm/"
EVENT = "flowstone.llm.call"


@dataclass
class UsageTotals:
    """One step's LLM totals."""

    calls: int = 0
    errors: int = 0
    attempts: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    models: list[str] = field(default_factory=list)

    def add(self, event: telemetry.TelemetryEvent) -> None:
        measures = event.measures
        self.calls += 1
        self.errors += 0 if event.ok else 1
        self.attempts += event.attempts
        self.prompt_tokens += int(measures.get("input_tokens") or 0)
        self.completion_tokens += int(measures.get("output_tokens") or 0)
        self.cache_read_tokens += int(measures.get("cache_read_tokens") or 0)
        self.cache_write_tokens += int(measures.get("cache_write_tokens") or 0)
        model = measures.get("model")
        if event.ok and isinstance(model, str) and model and model not in self.models:
            self.models.append(model)

    def metadata(self) -> dict[str, Any]:
        values: dict[str, Any] = {
            "calls": self.calls,
            "errors": self.errors,
            "attempts": self.attempts,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "cache_read_tokens": self.cache_read_tokens,
            "cache_write_tokens": self.cache_write_tokens,
        }
        if self.models:
            values["models"] = ", ".join(self.models)
        return {METADATA_PREFIX + key: value for key, value in values.items()}


_totals: weakref.WeakKeyDictionary[Any, UsageTotals] = weakref.WeakKeyDictionary()
_unattachable: weakref.WeakSet[Any] = weakref.WeakSet()
_lock = threading.Lock()


def current_step_context() -> dg.OpExecutionContext | None:
    """The op/asset context of the step running in this thread, if any (Dagster's public
    ``OpExecutionContext.get()``)."""
    try:
        return dg.OpExecutionContext.get()
    except dg.DagsterInvariantViolationError:
        return None


_explicit = threading.local()


@contextmanager
def attributed_to(context: Any) -> Iterator[None]:
    """Events emitted in the block (in this thread) count for ``context``'s step (``None``:
    the step running in this thread, if any): for a governed SDK client made with a context
    and used from a worker thread."""
    previous = getattr(_explicit, "context", None)
    _explicit.context = context
    try:
        yield
    finally:
        _explicit.context = previous


def bound_context() -> Any:
    """The context bound by :func:`attributed_to` in this thread, if any."""
    return getattr(_explicit, "context", None)


def attach_usage(event: telemetry.TelemetryEvent) -> None:
    """The telemetry listener: add an LLM call to its step's output metadata."""
    if event.name != EVENT:
        return
    context = getattr(_explicit, "context", None) or current_step_context()
    if isinstance(context, dg.AssetExecutionContext):
        context = context.op_execution_context
    if context is None:
        return
    with _lock:
        if context in _unattachable:
            return
        totals = _totals.setdefault(context, UsageTotals())
        totals.add(event)
        metadata = totals.metadata()
        try:
            context.add_output_metadata(metadata)
        except dg.DagsterInvariantViolationError as exc:  # several outputs: which one?
            _unattachable.add(context)
            logger.debug("LLM usage not attached to %s: %s", context.op_def.name, exc)


telemetry.add_listener(attach_usage)
