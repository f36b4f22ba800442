"""Token budgets: per run and per asset, kept in the resilience store, enforced before sending."""

import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import pytest

from flowstone_dagster.llm import BudgetExceeded, LLMResource
from flowstone_dagster.llm.budgets import spent
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.llm import llm_jobs
from flowstone_dagster_tests.llm.test_llm import KEY
from flowstone_dagster_tests.support.llm_servers import AnthropicServer, llm_server

pytestmark = pytest.mark.dagster


@pytest.fixture
def anthropic_api() -> Iterator[AnthropicServer]:
    with llm_server("anthropic", api_key=KEY) as server:
        yield server


def budgeted(server: AnthropicServer, store_url: str, **budgets: float) -> LLMResource:
    return LLMResource(
        provider="anthropic",
        model="claude-sonnet-5-5",
        api_key=KEY,
        base_url=server.base_url,
        resilience=ResilienceResource(
            store_url=store_url, default_policy=ServicePolicy(retry=RetryConfig(max_attempts=2))
        ),
        **budgets,
    )


@dg.asset
def extract(llm: LLMResource) -> str:
    return llm.call("Extract the names from this row.")


@dg.asset(deps=[extract])
def classify(llm: LLMResource) -> str:
    return llm.call("Classify this row.")


def test_a_run_budget_spent_by_one_step_stops_the_next(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    store_url = f"memory://budget-{uuid.uuid4().hex[:8]}"
    anthropic_api.reply("Ada, Grace", input_tokens=60, output_tokens=50)  # 110 of 100
    result = dg.materialize(
        [extract, classify],
        resources={"llm": budgeted(anthropic_api, store_url, run_token_budget=100)},
        instance=dagster_instance,
        raise_on_error=False,
    )
    assert not result.success
    assert result.output_for_node("extract") == "Ada, Grace"
    [failure] = [event for event in result.all_events if event.event_type_value == "STEP_FAILURE"]
    assert failure.step_key == "classify"
    error = failure.step_failure_data.error
    assert error is not None
    assert "run token budget" in error.message
    assert "110 of 100 tokens used" in error.message
    assert (
        failure.step_failure_data.user_failure_data.metadata["flowstone/retryable"].value is False
    )
    assert len(anthropic_api.requests) == 1  # nothing sent for classify
    store = ResilienceResource(store_url=store_url).store
    assert spent(store, f"llm:budget:run:{result.run_id}") == 110


def test_an_asset_budget_is_per_asset(
    anthropic_api: AnthropicServer, dagster_instance: dg.DagsterInstance
) -> None:
    store_url = f"memory://budget-{uuid.uuid4().hex[:8]}"
    anthropic_api.reply("a", input_tokens=30, output_tokens=60)  # extract: 90 of 100
    anthropic_api.reply("b", input_tokens=30, output_tokens=60)  # classify: its own 100
    result = dg.materialize(
        [extract, classify],
        resources={"llm": budgeted(anthropic_api, store_url, asset_token_budget=100)},
        instance=dagster_instance,
    )
    assert result.success
    store = ResilienceResource(store_url=store_url).store
    assert spent(store, f"llm:budget:asset:{result.run_id}:extract") == 90
    assert spent(store, f"llm:budget:asset:{result.run_id}:classify") == 90


def test_outside_a_run_no_budget_applies(anthropic_api: AnthropicServer) -> None:
    llm = budgeted(anthropic_api, "memory://budget-outside", run_token_budget=1)
    assert llm.call("Hi") == "ok"


def test_budget_exceeded_says_what_to_do() -> None:
    error = BudgetExceeded("run", key="llm:budget:run:abc", limit=1000, spent=990, requested=50)
    assert "990 of 1,000" in str(error)
    assert "run_token_budget" in str(error)
    assert not error.retryable


@pytest.mark.multiprocess
def test_the_run_budget_is_shared_by_step_processes(
    anthropic_api: AnthropicServer,
    dagster_home_instance: dg.DagsterInstance,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Each step runs in its own process (the multiprocess executor); the budget lives in the
    # SQLite store both open.
    store_url = f"sqlite://{tmp_path / 'state.sqlite3'}"
    monkeypatch.setenv("FLOWSTONE_RESILIENCE_STORE", store_url)
    monkeypatch.setenv(llm_jobs.BASE_URL_ENV, anthropic_api.base_url)
    anthropic_api.reply("Ada, Grace", input_tokens=60, output_tokens=50)
    result = dg.execute_job(
        dg.reconstructable(llm_jobs.get_budget_job), instance=dagster_home_instance
    )
    assert not result.success
    failed = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE]
    assert [e.step_key for e in failed] == ["classify_rows"]
    assert "BudgetExceeded" in str(failed[0].event_specific_data.error)
    assert len(anthropic_api.requests) == 1
    pids = {e.pid for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_START}
    assert len(pids) == 2  # two processes
    store = ResilienceResource(store_url=store_url).store
    assert spent(store, f"llm:budget:run:{result.run_id}") == 110
