"""Language models for Dagster assets: Anthropic, OpenAI and local OpenAI-compatible servers.

::

    from flowstone_dagster.llm import LLMResource

    llm = LLMResource(provider="anthropic", model="claude-sonnet-5-5",
                      api_key=dg.EnvVar("ANTHROPIC_API_KEY"), rpm_limit=50)

- :mod:`.resource`: :class:`LLMResource`, the Dagster resource;
- :mod:`.client`: :class:`LLMClient` (each request through
  :class:`~flowstone_dagster.resilience.ResilienceResource`, with per-model rpm/tpm limits;
  telemetry) and :class:`LLMStream`;
- :mod:`.providers`: one adapter per provider over the official SDKs;
- :mod:`.messages`: prompts, :class:`LLMResponse`, :class:`Usage`, token estimates,
  :class:`InvalidJSON`;
- :mod:`.failures`: SDK errors to the error taxonomy, rate-limit headers,
  :class:`StreamInterrupted`;
- :mod:`.tools`: tool definitions, :class:`ToolCall`, :func:`tool_result`, output schemas,
  :class:`InvalidOutput`, :class:`ToolLoopExceeded`;
- :mod:`.batches`: Anthropic Message Batches and OpenAI's Batch API, resumable;
- :mod:`.budgets`: token budgets per run and per asset, :class:`BudgetExceeded`;
- :mod:`.usage`: token totals on the step's materialization without ``telemetry.observe``;
- :mod:`.deadlines`: the whole-request deadline (a watchdog cutting trickling answers).

The guide is ``docs/llm.md``.
"""

from flowstone_dagster.llm.batches import BatchPending, BatchResult
from flowstone_dagster.llm.budgets import BudgetExceeded
from flowstone_dagster.llm.client import LLMClient, LLMStream, ToolRun
from flowstone_dagster.llm.failures import StreamInterrupted, rate_limit_wait
from flowstone_dagster.llm.messages import InvalidJSON, LLMResponse, Usage
from flowstone_dagster.llm.resource import LLMFallback, LLMResource
from flowstone_dagster.llm.tools import InvalidOutput, ToolCall, ToolLoopExceeded, tool_result

__all__ = [
    "BatchPending",
    "BatchResult",
    "BudgetExceeded",
    "InvalidJSON",
    "InvalidOutput",
    "LLMClient",
    "LLMFallback",
    "LLMResource",
    "LLMResponse",
    "LLMStream",
    "StreamInterrupted",
    "ToolCall",
    "ToolLoopExceeded",
    "ToolRun",
    "Usage",
    "rate_limit_wait",
    "tool_result",
]
