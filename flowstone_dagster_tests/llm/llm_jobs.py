"""Dagster jobs the LLM tests run through `execute_job` (reconstructable: imported by name)."""

from __future__ import annotations

import os
from typing import Literal

import dagster as dg

from flowstone_dagster.llm import LLMResource
from flowstone_dagster.resilience import ResilienceResource

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


# -- a batch job, re-executed from failure by the batch tests --------------------------------

API_KEY_ENV = "FLOWSTONE_TEST_LLM_API_KEY"
ROWS_ENV = "FLOWSTONE_TEST_BATCH_ROWS"  # rows separated by "|"


@dg.asset(retry_policy=dg.RetryPolicy(max_retries=0))
def labelled_rows(llm: LLMResource) -> list[str | None]:
    # The rows are read from outside the run, as from a warehouse table: a re-execution sees
    # them as they are then.
    rows = os.environ[ROWS_ENV].split("|")
    results = llm.batch(
        [f"Label: {row}" for row in rows],
        job="labels",
        poll_interval=0.05,
        max_poll_interval=0.05,
        max_wait=0.01,  # one status poll per attempt
    )
    return [result.response.text if result.response else None for result in results]


def _batch_job(provider: Literal["anthropic", "openai"]) -> dg.JobDefinition:
    defs = dg.Definitions(
        assets=[labelled_rows],
        jobs=[dg.define_asset_job("batch_job", selection=[labelled_rows])],
        resources={
            "llm": LLMResource(
                provider=provider,
                model="claude-sonnet-5-5" if provider == "anthropic" else "gpt-4o-mini",
                api_key=dg.EnvVar(API_KEY_ENV),
                base_url=dg.EnvVar(BASE_URL_ENV),
                # A batch not done in time fails the step at once (no step retry): only a
                # re-execution of the run can collect it.
                resilience=ResilienceResource(step_max_retries=0),
            )
        },
    )
    return defs.resolve_job_def("batch_job")


def get_anthropic_batch_job() -> dg.JobDefinition:
    return _batch_job("anthropic")


def get_openai_batch_job() -> dg.JobDefinition:
    return _batch_job("openai")
