"""ExternalDBIOManager inside Dagster: partitioned assets stored to PostgreSQL and SQLite tables
and read by downstream assets, with dagster.materialize."""

import datetime as dt
import logging
from collections.abc import Callable
from pathlib import Path

import dagster as dg
import pandas as pd
import psycopg2
import pytest
from pydantic import ValidationError

from flowstone_dagster.external_db import (
    ExternalDB,
    ExternalDBIOManager,
    PostgresConfig,
    SQLiteConfig,
)
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
        database=PostgresConfig(
            host=pg_database.host,
            port=pg_database.port,
            database=pg_database.database,
            user=pg_database.user,
            password=dg.EnvVar("WAREHOUSE_PASSWORD"),
        )
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
    assert metadata["flowstone/db/rows_replaced"] == 2  # the re-run replaced the first run's
    assert metadata["flowstone/db/partition"] == "day >= 2025-01-15 AND day < 2025-01-16"
    assert metadata["flowstone/db/table_created"] is False
    assert metadata["dagster/table_name"] == "public.readings"
    assert metadata["flowstone/db.store/calls"] == 1
    columns = {c.name: c.type for c in metadata["dagster/column_schema"].columns}
    assert columns == {"sensor": "text", "value": "bigint", "day": "date"}
    assert metadata["Query"] == (
        "SELECT * FROM public.readings WHERE day >= 2025-01-15 AND day < 2025-01-16"
    )
    assert set(metadata) == {  # each fact once
        "Query",  # what Dagster's database I/O managers show
        "dagster/partition_row_count",
        "dagster/table_name",
        "dagster/column_schema",
        "flowstone/db/partition",
        "flowstone/db/rows_replaced",
        "flowstone/db/table_created",
        "flowstone/db.store/calls",
        "flowstone/db.store/errors",
        "flowstone/db.store/attempts",
        "flowstone/db.store/duration_ms",
        "flowstone/db.store/bytes",
    }

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
    metadata={"partition_expr": {"date": "day", "region": "region"}},
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
    manager = ExternalDBIOManager(database=SQLiteConfig(path=str(tmp_path / "dagster.sqlite3")))
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
    rows = db.load_table("multi_sales")
    assert sorted((row["day"], row["region"]) for row in rows) == [
        (dt.date(2025, 1, 15), "eu"),
        (dt.date(2025, 1, 15), "us"),
        (dt.date(2025, 1, 16), "eu"),
    ]


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda: SQLiteConfig(path=""), "path"),
        (lambda: SQLiteConfig(path="x.db", busy_timeout=0), "busy_timeout"),
        (lambda: PostgresConfig(user="u"), "database"),  # type: ignore[call-arg]
        (lambda: PostgresConfig(database="d", user="u", port=0), "port"),
        (lambda: PostgresConfig(database="d", user="u", connect_timeout=-1), "connect_timeout"),
        (
            lambda: ExternalDBIOManager(database=SQLiteConfig(path="x.db"), statement_timeout=0),
            "statement_timeout",
        ),
    ],
)
def test_bad_configuration_fails_when_built_naming_the_field(
    build: Callable[[], object], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        build()


def test_the_database_is_a_discriminated_union_in_run_config(
    tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    """Run config selects the database by kind and takes only that database's fields."""

    @dg.asset(io_manager_key="db")
    def configured() -> list[dict]:
        return [{"a": 1}]

    path = str(tmp_path / "launch.sqlite3")
    resources = {"db": ExternalDBIOManager.configure_at_launch()}
    config = {"database": {"sqlite": {"path": path, "busy_timeout": 5}}, "schema": None}
    result = dg.materialize(
        [configured],
        resources=resources,
        run_config={"resources": {"db": {"config": config}}},
        instance=dagster_instance,
    )
    assert result.success
    assert ExternalDB.sqlite(path).load_table("configured") == [{"a": 1}]

    fields = ExternalDBIOManager.to_config_schema().as_field().config_type.fields  # type: ignore[attr-defined]
    database = fields["database"].config_type
    assert set(database.fields) == {"postgres", "sqlite"}
    assert set(database.fields["sqlite"].config_type.fields) == {"path", "busy_timeout"}
    assert "host" in database.fields["postgres"].config_type.fields

    wrong = {"database": {"sqlite": {"path": path, "host": "db.internal"}}}
    with pytest.raises(dg.DagsterInvalidConfigError, match="host"):
        dg.materialize(
            [configured], resources=resources, run_config={"resources": {"db": {"config": wrong}}}
        )
    negative = {"database": {"sqlite": {"path": path, "busy_timeout": -1}}}
    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        dg.materialize(
            [configured],
            resources=resources,
            run_config={"resources": {"db": {"config": negative}}},
        )
    assert isinstance(raised.value.__cause__, ValidationError)
    assert "busy_timeout" in str(raised.value.__cause__)


def test_partitioned_asset_without_partition_expr_is_a_clear_error(tmp_path: Path) -> None:
    @dg.asset(partitions_def=daily, io_manager_key="db")
    def unmarked() -> list[dict]:
        return [{"a": 1}]

    result = dg.materialize(
        [unmarked],
        partition_key="2025-01-15",
        resources={
            "db": ExternalDBIOManager(database=SQLiteConfig(path=str(tmp_path / "x.sqlite3")))
        },
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
    sqlite = SQLiteConfig(path=str(path))
    assert ExternalDBIOManager(database=sqlite).db.service == f"db:sqlite:{path}"
    manager = ExternalDBIOManager(
        database=PostgresConfig(host="db.internal", database="analytics", user="etl", password="pw")
    )
    assert manager.db.service == "db:postgresql://db.internal:5432/analytics"
    assert "pw" not in repr(manager)
    assert ExternalDBIOManager(database=sqlite, service="warehouse").db.service == "warehouse"


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
        resources={
            "db": ExternalDBIOManager(database=SQLiteConfig(path=str(tmp_path / "x.sqlite3")))
        },
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


def test_unpartitioned_metadata_names_each_fact_once(
    tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> None:
    """A replace reports the table's rows as dagster/row_count; an append, where the table's
    count is not known, reports the rows it wrote as flowstone/db.store/rows."""

    @dg.asset(io_manager_key="db")
    def snapshot() -> list[dict]:
        return [{"a": 1}, {"a": 2}, {"a": 3}]

    @dg.asset(io_manager_key="db", metadata={"write_mode": "append"})
    def journal() -> list[dict]:
        return [{"a": 1}, {"a": 2}]

    manager = ExternalDBIOManager(database=SQLiteConfig(path=str(tmp_path / "x.sqlite3")))
    for _ in range(2):
        result = dg.materialize(
            [snapshot, journal], resources={"db": manager}, instance=dagster_instance
        )
        assert result.success

    def metadata(name: str) -> dict[str, object]:
        event = dagster_instance.get_latest_materialization_event(dg.AssetKey(name))
        assert event is not None
        assert event.asset_materialization is not None
        return {k: v.value for k, v in event.asset_materialization.metadata.items()}

    replaced = metadata("snapshot")
    assert replaced["dagster/row_count"] == 3
    assert replaced["flowstone/db/rows_replaced"] == 3
    assert replaced["dagster/table_name"] == "snapshot"
    assert "flowstone/db.store/rows" not in replaced
    assert not any(key.startswith("db/") or key == "rows" for key in replaced)

    appended = metadata("journal")
    assert "dagster/row_count" not in appended
    assert appended["flowstone/db.store/rows"] == 2
    assert appended["flowstone/db/rows_replaced"] == 0
    assert len(manager.db.load_table("journal")) == 4
