"""The example project loads, validates and runs its job."""

import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest

from example_project import defs

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.dagster
def test_demo_job_materializes_with_flowstone_metadata(
    dagster_instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLOWSTONE_DEMO_API_URL", raising=False)
    result = defs.resolve_job_def("demo_job").execute_in_process(instance=dagster_instance)
    assert result.success
    readings = result.asset_materializations_for_node("sensor_readings")[0].metadata
    assert readings["rows"].value == 7
    assert readings["flowstone/http.request/calls"].value == 2
    assert readings["flowstone/http.request/errors"].value == 0
    assert result.output_for_node("daily_temperature") == {"2025-01-14": 49.03, "2025-01-15": 38.85}


@pytest.mark.dagster
def test_demo_job_fails_clearly_when_the_source_api_is_unreachable(
    dagster_instance: dg.DagsterInstance, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLOWSTONE_DEMO_API_URL", "http://127.0.0.1:9/")
    result = defs.resolve_job_def("demo_job").execute_in_process(
        instance=dagster_instance, raise_on_error=False
    )
    assert not result.success
    failure = result.failure_data_for_node("sensor_readings")
    assert failure is not None
    assert failure.error is not None
    cause = failure.error.cause
    assert cause is not None
    assert cause.cls_name == "TransportError"
    assert "GET http://127.0.0.1:9/readings/2025-01-14" in cause.message
    assert "refused" in cause.message.lower()


@pytest.mark.dagster
def test_definitions_validate_from_the_cli() -> None:
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dagster"), "definitions", "validate"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "All code locations passed validation" in result.stderr + result.stdout
