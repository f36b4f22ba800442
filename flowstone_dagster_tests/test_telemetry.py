"""Telemetry events reach every listener and become materialization metadata."""

import logging
import threading

import dagster as dg
import pytest

from flowstone_dagster import telemetry


def test_emit_reaches_a_registered_callback(events: list[telemetry.TelemetryEvent]) -> None:
    event = telemetry.emit("flowstone.test.call", duration_s=0.25, attempts=2, rows=10)
    assert events == [event]
    assert event.outcome == "ok"
    assert event.ok
    assert event.measures == {"rows": 10}
    assert event.attempts == 2


def test_removed_listener_hears_nothing() -> None:
    seen: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(seen.append)
    remove()
    remove()  # removing twice is harmless
    telemetry.emit("flowstone.test.call")
    assert seen == []


def test_a_failing_listener_never_breaks_the_call(
    events: list[telemetry.TelemetryEvent], caplog: pytest.LogCaptureFixture
) -> None:
    def broken(event: telemetry.TelemetryEvent) -> None:
        raise RuntimeError("listener bug")

    remove = telemetry.add_listener(broken)
    try:
        with caplog.at_level(logging.ERROR, logger="flowstone_dagster.telemetry"):
            telemetry.emit("flowstone.test.call")
    finally:
        remove()
    assert len(events) == 1
    assert "listener bug" in caplog.text


def test_python_logging_listener(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="flowstone_dagster.telemetry"):
        telemetry.emit("flowstone.test.call", duration_s=0.0123, status=200)
        telemetry.emit("flowstone.test.call", error=ValueError("x"))
    ok, failed = [r for r in caplog.records if r.name == "flowstone_dagster.telemetry"]
    assert ok.levelno == logging.DEBUG
    assert ok.getMessage() == (
        "flowstone.test.call outcome=ok duration_ms=12.3 attempts=1 status=200"
    )
    assert ok.flowstone_event.measures == {"status": 200}  # type: ignore[attr-defined]
    assert failed.levelno == logging.WARNING
    assert "outcome=error" in failed.getMessage()
    assert "error=ValueError" in failed.getMessage()


def test_span_times_the_block_and_records_errors(events: list[telemetry.TelemetryEvent]) -> None:
    with telemetry.span("flowstone.test.call", method="GET") as call:
        call.set(status=200)
        call.attempts = 3
    with pytest.raises(KeyError), telemetry.span("flowstone.test.call"):
        raise KeyError("missing")
    ok, failed = events
    assert ok.outcome == "ok"
    assert ok.attempts == 3
    assert ok.measures == {"method": "GET", "status": 200}
    assert ok.duration_s >= 0
    assert failed.outcome == "error"
    assert failed.error_type == "KeyError"


def test_secret_measures_are_masked(events: list[telemetry.TelemetryEvent]) -> None:
    telemetry.emit("flowstone.test.call", api_key="sk-123", token="t", input_tokens=5)
    assert events[0].measures == {"api_key": "***", "token": "***", "input_tokens": 5}


def test_step_telemetry_sums_events_per_name() -> None:
    with telemetry.observe() as step:
        telemetry.emit("flowstone.llm.call", duration_s=0.5, input_tokens=10, model="m")
        telemetry.emit("flowstone.llm.call", duration_s=0.25, attempts=2, input_tokens=5)
        telemetry.emit("flowstone.db.store", error=OSError("disk"), rows=3, pid=4242, status=500)
        worker = threading.Thread(target=telemetry.emit, args=("flowstone.db.store",))
        worker.start()
        worker.join()
    telemetry.emit("flowstone.llm.call")  # after the block: not counted
    assert step.metadata() == {
        "flowstone/db.store/calls": 2,
        "flowstone/db.store/errors": 1,
        "flowstone/db.store/attempts": 2,
        "flowstone/db.store/duration_ms": 0.0,
        "flowstone/db.store/rows": 3,
        "flowstone/llm.call/calls": 2,
        "flowstone/llm.call/errors": 0,
        "flowstone/llm.call/attempts": 3,
        "flowstone/llm.call/duration_ms": 750.0,
        "flowstone/llm.call/input_tokens": 15,
    }


@pytest.mark.dagster
def test_metadata_and_logs_on_a_materialization(dagster_instance: dg.DagsterInstance) -> None:
    @dg.asset
    def enriched(context: dg.AssetExecutionContext) -> int:
        with telemetry.observe(context):
            with telemetry.span("flowstone.rest.load", status=200) as call:
                call.set(bytes=2048)
            telemetry.emit("flowstone.rest.load", error=TimeoutError("slow"), attempts=3)
            telemetry.emit("flowstone.rest.load", attempts=2, status=200)
        with telemetry.observe(context, log_all=True, attach_metadata=False):
            telemetry.emit("flowstone.db.store", rows=5)
        return 1

    result = dg.materialize([enriched], instance=dagster_instance)
    assert result.success
    materialization = result.asset_materializations_for_node("enriched")[0]
    metadata = {key: value.value for key, value in materialization.metadata.items()}
    assert metadata["flowstone/rest.load/calls"] == 3
    assert metadata["flowstone/rest.load/errors"] == 1
    assert metadata["flowstone/rest.load/attempts"] == 6
    assert metadata["flowstone/rest.load/bytes"] == 2048
    assert "flowstone/db.store/calls" not in metadata
    logs = {
        entry.user_message: entry.level
        for entry in dagster_instance.all_logs(result.run_id)
        if entry.user_message.startswith("flowstone.")
    }
    assert logs == {
        "flowstone.rest.load outcome=error duration_ms=0.0 attempts=3 error=TimeoutError": (
            logging.WARNING
        ),
        "flowstone.rest.load outcome=ok duration_ms=0.0 attempts=2 status=200": logging.INFO,
        "flowstone.db.store outcome=ok duration_ms=0.0 attempts=1 rows=5": logging.DEBUG,
    }


@pytest.mark.dagster
def test_observe_attaches_nothing_when_nothing_happened(
    dagster_instance: dg.DagsterInstance,
) -> None:
    @dg.asset
    def quiet(context: dg.AssetExecutionContext) -> int:
        with telemetry.observe(context):
            pass
        return 1

    result = dg.materialize([quiet], instance=dagster_instance)
    materialization = result.asset_materializations_for_node("quiet")[0]
    assert not any(key.startswith("flowstone/") for key in materialization.metadata)
