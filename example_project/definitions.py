"""The example code location: what `make demo` runs and `make ui` shows.

It grows with each integration; for now it shows the shared core: readings fetched through
flowstone-dagster's HTTP session (timeouts, taxonomy errors, no hidden retries) with every call
recorded as telemetry and attached to the materialization as ``flowstone/...`` metadata.
"""

import os
from statistics import mean

import dagster as dg

from example_project.source_api import start_source_api
from flowstone_dagster import create_session, telemetry

DAYS = ["2025-01-14", "2025-01-15"]


def _source_url(context: dg.AssetExecutionContext) -> str:
    url = os.environ.get("FLOWSTONE_DEMO_API_URL")
    if url:
        return url.rstrip("/")
    url = start_source_api()
    context.log.info(f"FLOWSTONE_DEMO_API_URL is not set: serving the bundled sample data at {url}")
    return url


@dg.asset(
    description="Each day's sensor readings, fetched from the source API.",
    metadata={"source": "GET /readings/<day>"},
)
def sensor_readings(context: dg.AssetExecutionContext) -> dict[str, list[dict]]:
    base = _source_url(context)
    session = create_session(timeout=(2.0, 10.0), service="source-api")
    readings: dict[str, list[dict]] = {}
    with telemetry.observe(context):
        for day in DAYS:
            readings[day] = session.get(f"{base}/readings/{day}").json()["readings"]
    context.add_output_metadata({"rows": sum(len(rows) for rows in readings.values())})
    return readings


@dg.asset(description="Mean temperature per day.")
def daily_temperature(
    context: dg.AssetExecutionContext, sensor_readings: dict[str, list[dict]]
) -> dict[str, float]:
    summary = {
        day: round(mean(row["temperature_c"] for row in rows), 2)
        for day, rows in sensor_readings.items()
    }
    context.add_output_metadata({"days": len(summary), "summary": summary})
    return summary


demo_job = dg.define_asset_job("demo_job", selection=[sensor_readings, daily_temperature])

defs = dg.Definitions(assets=[sensor_readings, daily_temperature], jobs=[demo_job])
