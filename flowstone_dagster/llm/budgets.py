"""Token budgets per run and per asset, shared by every process of the run.

::

    llm = LLMResource(..., run_token_budget=2_000_000, asset_token_budget=500_000)

Inside a Dagster step, before each request the prompt's estimated input tokens are taken from
the run's budget (and the asset's) in the resilience store, in one atomic update per budget, as
the rate limits are: two step processes of one run cannot both take the last tokens. A request
that does not fit raises :class:`BudgetExceeded` (not retried; in Dagster a
``Failure(allow_retries=False)``) before anything is sent. After the reply, the tokens the
provider counted beyond the estimate (the output, mostly) are recorded too, so the next call
sees the whole spend. A run may therefore overrun its budget by the output of the calls in
flight when it is reached, never by a call started after.

Budgets are named ``llm:budget:run:<run_id>`` and ``llm:budget:asset:<run_id>:<asset key>``;
a budget applies to the calls of every ``LLMResource`` configured with it. Outside a run
(no Dagster context in the calling thread) no budget applies.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from flowstone_dagster.errors import FlowstoneError
from flowstone_dagster.llm import usage as usage_module
from flowstone_dagster.resilience.stores import StateStore

__all__ = ["BUDGET_PERIOD", "Budget", "BudgetExceeded", "budgets_for", "record", "take"]

#: How long a budget's spend is remembered: longer than any run.
BUDGET_PERIOD = 30 * 24 * 3600.0


class BudgetExceeded(FlowstoneError):
    """A call would go past a token budget; nothing was sent. Not retryable.

    ``budget`` is its name (``run`` or ``asset``), ``key`` its store name, ``limit`` the budget,
    ``spent`` the tokens spent so far and ``requested`` the call's estimate.
    """

    retryable = False

    def __init__(
        self, budget: str, *, key: str, limit: float, spent: float, requested: float
    ) -> None:
        super().__init__(
            f"the {budget} token budget {key!r} is spent: {spent:,.0f} of {limit:,.0f} tokens "
            f"used, this call needs about {requested:,.0f} more; raise {budget}_token_budget "
            "or make fewer calls"
        )
        self.budget = budget
        self.key = key
        self.limit = limit
        self.spent = spent
        self.requested = requested


@dataclass(frozen=True)
class Budget:
    """One budget in force for a call."""

    kind: str  # "run" or "asset"
    key: str
    limit: float


def budgets_for(run_limit: float | None, asset_limit: float | None) -> list[Budget]:
    """The budgets in force for a call made now, in this thread's Dagster step."""
    if run_limit is None and asset_limit is None:
        return []
    context: Any = usage_module.bound_context() or usage_module.current_step_context()
    if context is None:
        return []
    run_id = context.run_id
    budgets = []
    if run_limit is not None:
        budgets.append(Budget("run", f"llm:budget:run:{run_id}", run_limit))
    if asset_limit is not None:
        try:
            asset = context.asset_key.to_user_string()
        except Exception:  # an op, or a multi-asset: the step's name instead
            asset = context.op_def.name
        budgets.append(Budget("asset", f"llm:budget:asset:{run_id}:{asset}", asset_limit))
    return budgets


def take(store: StateStore, budgets: list[Budget], tokens: float) -> None:
    """Take ``tokens`` from every budget, or raise :class:`BudgetExceeded` (nothing taken
    from the budgets after the one refused; those before keep the estimate)."""
    tokens = max(tokens, 1.0)
    for budget in budgets:
        reservation = store.reserve(budget.key, tokens, budget.limit, BUDGET_PERIOD)
        if not reservation.admitted:
            spent = store.limiter_usage(budget.key, BUDGET_PERIOD)
            raise BudgetExceeded(
                budget.kind, key=budget.key, limit=budget.limit, spent=spent, requested=tokens
            )


def record(store: StateStore, budgets: list[Budget], tokens: float) -> None:
    """Record ``tokens`` spent beyond what :func:`take` took (never refused)."""
    if tokens <= 0:
        return
    for budget in budgets:
        store.reserve(budget.key, tokens, math.inf, BUDGET_PERIOD)


def spent(store: StateStore, key: str) -> float:
    """Tokens spent against the budget named ``key``."""
    return store.limiter_usage(key, BUDGET_PERIOD)
