"""A Dagster job the LLM tests run with the multiprocess executor (imported by name there)."""

from __future__ import annotations

import os

import dagster as dg

from flowstone_dagster.llm import LLMResource

BASE_URL_ENV = "FLOWSTONE_TEST_LLM_BASE_URL"
KEY = "sk-ant-test-5ecr3t-0123456789"


@dg.asset
def extract_rows(llm: LLMResource) -> str:
    return llm.call("Extract the names from this row.")


@dg.asset(deps=[extract_rows])
def classify_rows(llm: LLMResource) -> str:
    return llm.call("Classify this row.")


def _llm() -> LLMResource:
    # No resilience resource: the default shared store ($FLOWSTONE_RESILIENCE_STORE), which
    # every step process of the run opens.
    return LLMResource(
        provider="anthropic",
        model="claude-sonnet-5-5",
        api_key=KEY,
        base_url=os.environ.get(BASE_URL_ENV, "http://127.0.0.1:9"),
        run_token_budget=100,
    )


defs = dg.Definitions(
    assets=[extract_rows, classify_rows],
    jobs=[dg.define_asset_job("budget_job", selection=[extract_rows, classify_rows])],
    resources={"llm": _llm()},
)


def get_budget_job() -> dg.JobDefinition:
    return defs.resolve_job_def("budget_job")
