"""ExternalDBIOManager inside Dagster: partitioned assets stored to PostgreSQL and SQLite tables
and read by downstream assets, with dagster.materialize."""

import datetime as dt
import logging
from pathlib import Path

import dagster as dg
import pandas as pd
import psycopg2
import pytest

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.external_db import ExternalDBIOManager
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.dagster

daily = dg.DailyPartitionsDefinition(start_date="2025-01-01")


@dg.asset(partitions_def=daily, io_manager_key="db", metadata={"partition_expr": "day"})
def readings(context: dg.AssetExecutionContext) -> list[dict]:
    day = dt.date.fromisoformat(context.partition_key)
    return [{"sensor": name, "value": day.day * 10 + i} for i, name in enumerate(["a", "b"])]


@dg.asset(partitions_def=daily, io_manager_key="db", metadata={"partition_expr": "day"})
def readings_total(readings: list[dict]) -> list[dict]:
    return [{"total": sum(row["value"] for row in readings), "rows": len(readings)}]


@dg.asset(io_manager_key="db")
def all_readings(readings: pd.DataFrame) -> list[dict]:  # every partition: one time window
    return [{"rows": len(readings), "days": readings["day"].nunique()}]


def _rows(pg: PostgresCluster, statement: str) -> list[tuple]:
    with psycopg2.connect(pg.dsn) as connection, connection.cursor() as cursor:
        cursor.execute(statement)
        return cursor.fetchall()


@pytest.mark.postgres
def test_daily_partitions_stored_to_postgres_and_read_downstream(
    pg_database: PostgresCluster,
    dagster_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("WAREHOUSE_PASSWORD", pg_database.password)
    manager = ExternalDBIOManager(
        adapter="postgres",
        host=pg_database.host,
        port=pg_database.port,
        database=pg_database.database,
        user=pg_database.user,
        password=dg.EnvVar("WAREHOUSE_PASSWORD"),
    )
    runs = []
    with caplog.at_level(logging.DEBUG):
        for day in ("2025-01-14", "2025-01-15", "2025-01-15"):  # the second 15th: a re-run
            result = dg.materialize(
                [readings, readings_total],
                partition_key=day,
                resources={"db": manager},
                instance=dagster_instance,
            )
            assert result.success
            runs.append(result)

    assert _rows(pg_database, "SELECT day, sensor, value FROM readings ORDER BY day, sensor") == [
        (dt.date(2025, 1, 14), "a", 140),
        (dt.date(2025, 1, 14), "b", 141),
        (dt.date(2025, 1, 15), "a", 150),
        (dt.date(2025, 1, 15), "b", 151),
    ]
    assert _rows(pg_database, "SELECT day, total, rows FROM readings_total ORDER BY day") == [
        (dt.date(2025, 1, 14), 281, 2),
        (dt.date(2025, 1, 15), 301, 2),
    ]
    event = dagster_instance.get_latest_materialization_event(dg.AssetKey("readings"))
    assert event is not None
    assert event.asset_materialization is not None
    metadata = {k: v.value for k, v in event.asset_materialization.metadata.items()}
    assert metadata["dagster/partition_row_count"] == 2
    assert metadata["db/rows_replaced"] == 2  # the re-run replaced the first run's rows
    assert metadata["db/partition"] == "day >= 2025-01-15 AND day < 2025-01-16"
    assert metadata["dagster/table_name"] == "public.readings"
    assert metadata["flowstone/db.store/calls"] == 1
    assert metadata["flowstone/db.store/rows"] == 2
    columns = {c.name: c.type for c in metadata["dagster/column_schema"].columns}
    assert columns == {"sensor": "text", "value": "bigint", "day": "date"}

    result = dg.materialize(
        [all_readings, readings],
        selection=[all_readings],
        resources={"db": manager},
        instance=dagster_instance,
    )
    assert result.output_for_node("all_readings") == [{"rows": 4, "days": 2}]

    visible = [repr(manager), caplog.text]
    for run in runs:
        for entry in dagster_instance.all_logs(run.run_id):
            visible.append(entry.user_message)
            if entry.dagster_event is not None:
                visible.append(repr(entry.dagster_event.event_specific_data))
    assert pg_database.password not in "\n".join(visible)


regions = dg.StaticPartitionsDefinition(["north", "south'; DROP TABLE region_sales; --"])
by_day_and_region = dg.MultiPartitionsDefinition(
    {
        "date": dg.DailyPartitionsDefinition(start_date="2025-01-01"),
        "region": dg.StaticPartitionsDefinition(["eu", "us"]),
    }
)


@dg.asset(partitions_def=regions, io_manager_key="db", metadata={"partition_expr": "region"})
def region_sales(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"sku": ["x", "y"], "qty": [len(context.partition_key), 1]})


@dg.asset(partitions_def=regions, io_manager_key="db", metadata={"partition_expr": "region"})
def region_qty(region_sales: pd.DataFrame) -> list[dict]:
    return [{"qty": int(region_sales["qty"].sum())}]


@dg.asset(
    partitions_def=by_day_and_region,
    io_manager_key="db",
    metadata={"partition_expr": {"date": "day", "region": "region"}, "table": "sales_by_region"},
)
def multi_sales(context: dg.AssetExecutionContext) -> list[dict]:
    keys = context.partition_key.keys_by_dimension  # type: ignore[attr-defined]
    return [{"amount": 1.5, "note": f"{keys['region']} {keys['date']}"}]


@dg.asset(
    partitions_def=by_day_and_region,
    io_manager_key="db",
    metadata={"partition_expr": {"date": "day", "region": "region"}},
)
def multi_notes(multi_sales: list[dict]) -> list[dict]:
    return [{"notes": ";".join(row["note"] for row in multi_sales)}]


def test_static_and_multi_partitions_on_sqlite(
    tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    manager = ExternalDBIOManager(adapter="sqlite", path=str(tmp_path / "dagster.sqlite3"))
    for region in regions.get_partition_keys():
        result = dg.materialize(
            [region_sales, region_qty],
            partition_key=region,
            resources={"db": manager},
            instance=dagster_instance,
        )
        assert result.output_for_node("region_qty") == [{"qty": len(region) + 1}]
    for key in ("2025-01-15|eu", "2025-01-15|us", "2025-01-16|eu", "2025-01-15|eu"):
        result = dg.materialize(
            [multi_sales, multi_notes],
            partition_key=key,
            resources={"db": manager},
            instance=dagster_instance,
        )
        assert result.success
    assert result.output_for_node("multi_notes") == [{"notes": "eu 2025-01-15"}]

    db = manager.db
    assert len(db.load_table("region_sales")) == 4  # the hostile key is only a value
    rows = db.load_table("sales_by_region")
    assert sorted((row["day"], row["region"]) for row in rows) == [
        (dt.date(2025, 1, 15), "eu"),
        (dt.date(2025, 1, 15), "us"),
        (dt.date(2025, 1, 16), "eu"),
    ]


@pytest.mark.parametrize(
    ("manager", "field"),
    [
        (ExternalDBIOManager(adapter="sqlite"), "path"),
        (ExternalDBIOManager(adapter="postgres", user="u"), "database"),
        (ExternalDBIOManager(adapter="sqlite", path="x.db", schema="raw"), "schema"),
    ],
)
def test_bad_configuration_fails_at_setup_naming_the_field(
    manager: ExternalDBIOManager, field: str
) -> None:
    @dg.asset(io_manager_key="db")
    def anything() -> list[dict]:
        return [{"a": 1}]

    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        dg.materialize([anything], resources={"db": manager})
    assert isinstance(raised.value.__cause__, ConfigurationError)
    assert raised.value.__cause__.field == field


def test_partitioned_asset_without_partition_expr_is_a_clear_error(tmp_path: Path) -> None:
    @dg.asset(partitions_def=daily, io_manager_key="db")
    def unmarked() -> list[dict]:
        return [{"a": 1}]

    result = dg.materialize(
        [unmarked],
        partition_key="2025-01-15",
        resources={"db": ExternalDBIOManager(path=str(tmp_path / "x.sqlite3"))},
        raise_on_error=False,
    )
    assert not result.success
    error = result.failure_data_for_node("unmarked").error  # type: ignore[union-attr]
    messages = []
    while error is not None:
        messages.append(error.message)
        error = error.cause
    assert any("set its metadata partition_expr" in m for m in messages)


def test_default_service_of_the_io_manager_is_the_database(tmp_path: Path) -> None:
    path = tmp_path / "x.sqlite3"
    assert ExternalDBIOManager(path=str(path)).db.service == f"db:sqlite:{path}"
    manager = ExternalDBIOManager(
        adapter="postgres", host="db.internal", database="analytics", user="etl", password="pw"
    )
    assert manager.db.service == "db:postgresql://db.internal:5432/analytics"
    assert ExternalDBIOManager(path=str(path), service="warehouse").db.service == "warehouse"


def test_a_missing_table_fails_the_step_once_with_the_asset_named(tmp_path: Path) -> None:
    """The one mapping, also with no resilience: Failure(allow_retries=False), caused by the
    DatabaseError that names the asset."""

    @dg.asset(io_manager_key="db", ins={"never": dg.AssetIn(key="never_written")})
    def consumer(never: list[dict]) -> list[dict]:
        return never

    @dg.asset(name="never_written", io_manager_key="db")
    def never_written() -> list[dict]:
        return []

    result = dg.materialize(
        [consumer, never_written.to_source_asset()],
        resources={"db": ExternalDBIOManager(path=str(tmp_path / "x.sqlite3"))},
        raise_on_error=False,
        selection=[consumer],
    )
    assert not result.success
    [failure] = result.get_step_failure_events()
    data = failure.step_failure_data
    assert data.user_failure_data is not None
    metadata = data.user_failure_data.metadata
    assert metadata["flowstone/error_type"].value == "DatabaseError"
    assert metadata["flowstone/retryable"].value is False
    assert metadata["flowstone/service"].value == f"db:sqlite:{tmp_path / 'x.sqlite3'}"
    assert "no table for asset never_written" in (data.user_failure_data.description or "")
