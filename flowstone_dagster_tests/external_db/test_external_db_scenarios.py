"""Dagster's database I/O manager scenarios (those dagster-duckdb's and friends' tests cover),
on SQLite and PostgreSQL, with dagster.materialize: key prefixes, time zones, partition
patterns."""

import datetime as dt
import sqlite3
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg2
import pytest

from flowstone_dagster.external_db import ExternalDBIOManager, PostgresConfig, SQLiteConfig
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.dagster


@dataclass
class Backend:
    kind: str
    manager: ExternalDBIOManager
    raw: Callable[[], Any]
    instance: dg.DagsterInstance

    def sql(self, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        connection = self.raw()
        try:
            cursor = connection.cursor()
            cursor.execute(
                statement.replace("?", "%s") if self.kind == "postgres" else statement, params
            )
            rows = cursor.fetchall() if cursor.description else []
            connection.commit()
            return rows
        finally:
            connection.close()

    def materialize(self, assets: list[Any], **kwargs: Any) -> dg.ExecuteInProcessResult:
        result = dg.materialize(
            assets, resources={"db": self.manager}, instance=self.instance, **kwargs
        )
        assert result.success
        return result


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, dagster_instance: dg.DagsterInstance
) -> Backend:
    if request.param == "postgres":
        pg: PostgresCluster = request.getfixturevalue("pg_database")
        database: PostgresConfig | SQLiteConfig = PostgresConfig(
            host=pg.host, port=pg.port, database=pg.database, user=pg.user, password=pg.password
        )
        raw: Callable[[], Any] = lambda: psycopg2.connect(pg.dsn)  # noqa: E731
    else:
        path = tmp_path / "scenarios.sqlite3"
        database = SQLiteConfig(path=str(path))
        raw = lambda: sqlite3.connect(path)  # noqa: E731
    manager = ExternalDBIOManager(database=database)
    return Backend(request.param, manager, raw, dagster_instance)


# -- time zones ----------------------------------------------------------------------------------

hourly_ny = dg.HourlyPartitionsDefinition(
    start_date="2025-03-01-00:00", timezone="America/New_York"
)


def _hour(context: dg.AssetExecutionContext, aware: bool) -> list[dict[str, Any]]:
    start = context.partition_time_window.start  # aware, in America/New_York
    value = start if aware else start.replace(tzinfo=None)
    return [{"at": value + dt.timedelta(minutes=m), "n": m} for m in (0, 30)]


@dg.asset(partitions_def=hourly_ny, io_manager_key="db", metadata={"partition_expr": "at"})
def hours_naive(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
    return _hour(context, aware=False)


@dg.asset(partitions_def=hourly_ny, io_manager_key="db", metadata={"partition_expr": "at"})
def hours_aware(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
    return _hour(context, aware=True)


@dg.asset(partitions_def=hourly_ny, io_manager_key="db", metadata={"partition_expr": "at"})
def hours_naive_read(hours_naive: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"rows": len(hours_naive)}]


@dg.asset(partitions_def=hourly_ny, io_manager_key="db", metadata={"partition_expr": "at"})
def hours_aware_read(hours_aware: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"rows": len(hours_aware)}]


@pytest.mark.parametrize("aware", [False, True], ids=["naive", "aware"])
def test_hourly_partitions_in_new_york_replace_their_rows_and_read_back(
    backend: Backend, aware: bool
) -> None:
    upstream, downstream = (
        (hours_aware, hours_aware_read) if aware else (hours_naive, hours_naive_read)
    )
    for key in ("2025-03-01-10:00", "2025-03-01-10:00", "2025-03-01-11:00"):
        result = backend.materialize([upstream, downstream], partition_key=key)
        assert result.output_for_node(downstream.key.path[-1]) == [{"rows": 2}]
    table = upstream.key.path[-1]
    assert backend.sql(f'SELECT count(*) FROM "{table}"') == [(4,)]
    # Stored as the wall-clock time of the asset (naive) or as the instant (aware).
    stored = sorted(row[0] for row in backend.sql(f'SELECT at FROM "{table}"'))
    if backend.kind == "postgres" and not aware:
        assert stored[0] == dt.datetime(2025, 3, 1, 10, 0)


# -- key prefixes --------------------------------------------------------------------------------


@dg.asset(key_prefix=["sales"], io_manager_key="db")
def orders() -> list[dict[str, Any]]:
    return [{"team": "sales", "n": 1}]


@dg.asset(key=dg.AssetKey(["marketing", "orders"]), io_manager_key="db")
def marketing_orders() -> list[dict[str, Any]]:
    return [{"team": "marketing", "n": 2}, {"team": "marketing", "n": 3}]


@dg.asset(
    io_manager_key="db",
    ins={
        "sales": dg.AssetIn(key=dg.AssetKey(["sales", "orders"])),
        "marketing": dg.AssetIn(key=dg.AssetKey(["marketing", "orders"])),
    },
)
def both_orders(
    sales: list[dict[str, Any]], marketing: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    return [{"sales": len(sales), "marketing": len(marketing)}]


def test_key_prefixes_are_distinct_tables(backend: Backend) -> None:
    result = backend.materialize([orders, marketing_orders, both_orders])
    assert result.output_for_node("both_orders") == [{"sales": 1, "marketing": 2}]
    # Re-running one leaves the other.
    result = backend.materialize(
        [orders, marketing_orders, both_orders], selection=[orders, both_orders]
    )
    assert result.output_for_node("both_orders") == [{"sales": 1, "marketing": 2}]


# -- schema precedence ---------------------------------------------------------------------------


@dg.asset(key_prefix=["prefix"], io_manager_key="db", metadata={"schema": "from_metadata"})
def placed_by_metadata() -> list[dict[str, Any]]:
    return [{"a": 1}]


@dg.asset(key_prefix=["prefix"], io_manager_key="db")
def placed_by_config() -> list[dict[str, Any]]:
    return [{"a": 2}]


def test_schema_from_metadata_then_config_then_key_prefix(backend: Backend) -> None:
    backend.materialize([placed_by_metadata])
    configured = ExternalDBIOManager(database=backend.manager.database, schema="from_config")
    result = dg.materialize(
        [placed_by_config], resources={"db": configured}, instance=backend.instance
    )
    assert result.success
    if backend.kind == "postgres":
        tables = {"from_metadata.placed_by_metadata", "from_config.placed_by_config"}
        rows = backend.sql(
            "SELECT table_schema || '.' || table_name FROM information_schema.tables "
            "WHERE table_schema IN ('from_metadata', 'from_config')"
        )
    else:
        tables = {"from_metadata__placed_by_metadata", "from_config__placed_by_config"}
        rows = backend.sql("SELECT name FROM sqlite_master WHERE type = 'table'")
    assert {row[0] for row in rows} == tables
    event = backend.instance.get_latest_materialization_event(placed_by_config.key)
    assert event is not None
    assert event.asset_materialization is not None
    table_name = event.asset_materialization.metadata["dagster/table_name"].value
    assert table_name == (
        "from_config.placed_by_config"
        if backend.kind == "postgres"
        else "from_config__placed_by_config"
    )


# -- static, dynamic and multi-partitions; partitioned to unpartitioned ---------------------------

colors = dg.StaticPartitionsDefinition(["red", "yellow", "blue"])
dynamic_colors = dg.DynamicPartitionsDefinition(name="colors")
days_by_color = dg.MultiPartitionsDefinition(
    {
        "day": dg.DailyPartitionsDefinition(start_date="2015-01-01"),
        "color": colors,
    }
)


@dg.asset(partitions_def=colors, io_manager_key="db", metadata={"partition_expr": "color"})
def paint(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"n": [1, 2], "color": [context.partition_key] * 2})


@dg.asset(partitions_def=dynamic_colors, io_manager_key="db", metadata={"partition_expr": "color"})
def dynamic_paint(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
    return [{"n": 1}]  # the partition column is filled in


@dg.asset(
    partitions_def=days_by_color,
    io_manager_key="db",
    metadata={"partition_expr": {"day": "day", "color": "color"}},
)
def daily_paint(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
    key = context.partition_key
    assert isinstance(key, dg.MultiPartitionKey)
    return [{"n": len(key.keys_by_dimension["color"])}]


@dg.asset(io_manager_key="db")
def all_paint(paint: pd.DataFrame, dynamic_paint: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"paint": len(paint), "dynamic": len(dynamic_paint)}]


@dg.asset(io_manager_key="db")
def all_daily_paint(daily_paint: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"rows": len(daily_paint), "n": int(daily_paint["n"].sum())}]


def test_static_dynamic_and_multi_partitions_read_whole_downstream(backend: Backend) -> None:
    for color in ("red", "blue", "red"):
        backend.materialize([paint], partition_key=color)
    backend.instance.add_dynamic_partitions("colors", ["green", "it's"])
    for color in ("green", "it's"):
        backend.materialize([dynamic_paint], partition_key=color)
    result = backend.materialize([paint, dynamic_paint, all_paint], selection=[all_paint])
    assert result.output_for_node("all_paint") == [{"paint": 4, "dynamic": 2}]

    for key in ("red|2025-01-02", "blue|2025-01-02", "yellow|2026-11-30", "red|2025-01-02"):
        backend.materialize([daily_paint], partition_key=key)
    # Thousands of days x 3 colors upstream: one range per dimension, not one condition per key.
    result = backend.materialize([daily_paint, all_daily_paint], selection=[all_daily_paint])
    assert result.output_for_node("all_daily_paint") == [{"rows": 3, "n": 3 + 4 + 6}]


# -- partition mappings with and without upstream partitions -------------------------------------

daily = dg.DailyPartitionsDefinition(start_date="2025-01-01")


@dg.asset(
    partitions_def=daily,
    io_manager_key="db",
    metadata={"partition_expr": "day"},
    ins={
        "previous": dg.AssetIn(
            key=dg.AssetKey("running_total"),
            partition_mapping=dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1),
        )
    },
)
def running_total(
    context: dg.AssetExecutionContext, previous: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    before = previous[0]["total"] if previous else 0
    return [{"total": before + 1}]


multi_daily = dg.MultiPartitionsDefinition(
    {"day": daily, "color": dg.StaticPartitionsDefinition(["red"])}
)  # keys: "red|2025-01-01" (dimensions in name order)


@dg.asset(
    partitions_def=multi_daily,
    io_manager_key="db",
    metadata={"partition_expr": {"day": "day", "color": "color"}},
)
def multi_source(context: dg.AssetExecutionContext) -> pd.DataFrame:
    return pd.DataFrame({"n": [1]})


with warnings.catch_warnings():  # Dagster marks MultiPartitionMapping as beta
    warnings.simplefilter("ignore", dg.BetaWarning)
    previous_day = dg.MultiPartitionMapping(
        {
            "day": dg.DimensionPartitionMapping(
                "day", dg.TimeWindowPartitionMapping(start_offset=-1, end_offset=-1)
            ),
            "color": dg.DimensionPartitionMapping("color", dg.IdentityPartitionMapping()),
        }
    )


@dg.asset(
    partitions_def=multi_daily,
    io_manager_key="db",
    metadata={"partition_expr": {"day": "day", "color": "color"}},
    ins={
        "before": dg.AssetIn(
            key=multi_source.key,
            partition_mapping=previous_day,
        )
    },
)
def multi_previous(context: dg.AssetExecutionContext, before: pd.DataFrame) -> pd.DataFrame:
    return pd.DataFrame({"seen": [len(before)], "columns": [",".join(before.columns)]})


def test_self_dependent_asset_and_mappings_without_upstream_partitions(backend: Backend) -> None:
    for day in ("2025-01-01", "2025-01-02", "2025-01-03"):
        backend.materialize([running_total], partition_key=day)
    result = backend.materialize([running_total], partition_key="2025-01-04")
    assert result.output_for_node("running_total") == [{"total": 4}]

    backend.materialize([multi_source], partition_key="red|2025-01-01")
    result = backend.materialize(
        [multi_source, multi_previous], partition_key="red|2025-01-01", selection=[multi_previous]
    )  # the day before the first day: no upstream partition, an empty frame with the columns
    frame = result.output_for_node("multi_previous")
    assert frame.to_dict("records") == [{"seen": 0, "columns": "n,color,day"}]
    backend.materialize([multi_source], partition_key="red|2025-01-02")
    result = backend.materialize(
        [multi_source, multi_previous], partition_key="red|2025-01-02", selection=[multi_previous]
    )
    assert result.output_for_node("multi_previous")["seen"].tolist() == [1]


# -- columns, op outputs, None outputs, annotations ---------------------------------------------


@dg.asset(io_manager_key="db")
def wide() -> pd.DataFrame:
    return pd.DataFrame({"a": [1, 2], "b": ["x", "y"], "c": [1.5, 2.5]})


@dg.asset(io_manager_key="db", ins={"wide": dg.AssetIn(metadata={"columns": ["c", "a"]})})
def narrow(wide: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"columns": ",".join(wide.columns), "rows": len(wide)}]


@dg.asset(io_manager_key="db")
def nothing_stored() -> None:
    return None


def test_columns_input_metadata_loads_only_those_columns(backend: Backend) -> None:
    result = backend.materialize([wide, narrow])
    assert result.output_for_node("narrow") == [{"columns": "c,a", "rows": 2}]


def test_an_asset_returning_none_stores_nothing(backend: Backend) -> None:
    backend.materialize([nothing_stored])
    if backend.kind == "sqlite":
        assert backend.sql("SELECT name FROM sqlite_master WHERE type = 'table'") == []


@dg.op(out=dg.Out(io_manager_key="db", metadata={"schema": "ops"}))
def make_rows() -> list[dict[str, Any]]:
    return [{"x": 1}, {"x": 2}]


@dg.op(ins={"rows": dg.In()}, out=dg.Out(io_manager_key="db"))
def count_rows(rows: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"rows": len(rows)}]


@dg.job
def op_job() -> None:
    count_rows(make_rows())


def test_op_outputs_are_tables_named_after_the_output(backend: Backend) -> None:
    result = op_job.execute_in_process(resources={"db": backend.manager}, instance=backend.instance)
    assert result.success
    assert result.output_for_node("count_rows") == [{"rows": 2}]
    table = '"ops"."result"' if backend.kind == "postgres" else '"ops__result"'
    assert backend.sql(f"SELECT count(*) FROM {table}") == [(2,)]


@dg.asset(io_manager_key="db")
def typed_rows() -> list[dict[str, Any]]:
    return [{"k": "v"}]


@dg.asset(io_manager_key="db")
def typed_reader(typed_rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return typed_rows


def test_parameterized_list_annotations(backend: Backend) -> None:
    result = backend.materialize([typed_rows, typed_reader])
    assert result.output_for_node("typed_reader") == [{"k": "v"}]


# -- empty first outputs -------------------------------------------------------------------------


@dg.asset(
    io_manager_key="db",
    metadata={
        "dagster/column_schema": dg.TableSchema(
            columns=[dg.TableColumn("id", "bigint"), dg.TableColumn("name", "text")]
        )
    },
)
def nothing_yet() -> list[dict[str, Any]]:
    return []


@dg.asset(io_manager_key="db")
def empty_frame() -> pd.DataFrame:
    return pd.DataFrame({"n": pd.Series([], dtype="int64"), "x": pd.Series([], dtype="float")})


@dg.asset(io_manager_key="db")
def reads_empty(nothing_yet: pd.DataFrame, empty_frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{"declared": ",".join(nothing_yet.columns), "frame": ",".join(empty_frame.columns)}]


def test_an_empty_first_output_creates_the_table(backend: Backend) -> None:
    result = backend.materialize([nothing_yet, empty_frame, reads_empty])
    assert result.output_for_node("reads_empty") == [{"declared": "id,name", "frame": "n,x"}]
    backend.materialize([nothing_yet, empty_frame, reads_empty])  # and again, on the tables
    if backend.kind == "postgres":
        types = backend.sql(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name IN ('nothing_yet', 'empty_frame') ORDER BY table_name, column_name"
        )
        assert types == [
            ("n", "bigint"),
            ("x", "double precision"),
            ("id", "bigint"),
            ("name", "text"),
        ]


@dg.asset(io_manager_key="db")
def no_rows_no_schema() -> list[dict[str, Any]]:
    return []  # nothing says what its columns would be: no table can be created


@dg.asset
def reads_no_rows(no_rows_no_schema: list[dict[str, Any]]) -> int:
    return len(no_rows_no_schema)


@dg.asset(io_manager_key="db")
def never_stored() -> list[dict[str, Any]]:
    return [{"id": 1}]


def test_an_empty_first_output_without_columns_loads_empty(backend: Backend) -> None:
    """``[]`` and no declared ``dagster/column_schema``: no table, but the materialization
    recorded 0 rows, so the downstream loads an empty value (not 'no table')."""
    result = backend.materialize([no_rows_no_schema, reads_no_rows])
    assert result.output_for_node("reads_no_rows") == 0
    # An upstream that was never materialized still fails clearly: no silent empty value.
    failed = dg.materialize(
        [never_stored.to_source_asset(), reads_never_stored],
        resources={"db": backend.manager},
        instance=backend.instance,
        raise_on_error=False,
    )
    assert not failed.success


@dg.asset
def reads_never_stored(never_stored: list[dict[str, Any]]) -> int:
    return len(never_stored)


# -- partition_expr as a SQL expression ----------------------------------------------------------


def _expression_assets(expression: str) -> list[Any]:
    @dg.asset(
        name="visits",
        partitions_def=daily,
        io_manager_key="db",
        metadata={"partition_expr": expression},
    )
    def visits(context: dg.AssetExecutionContext) -> list[dict[str, Any]]:
        day = dt.datetime.fromisoformat(context.partition_key)
        return [{"at": day + dt.timedelta(hours=h), "n": h} for h in (1, 13)]

    @dg.asset(
        name="visits_read",
        partitions_def=daily,
        io_manager_key="db",
        metadata={"partition_expr": "day"},
    )
    def visits_read(visits: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return [{"rows": len(visits), "columns": ",".join(visits[0])}]

    return [visits, visits_read]


def test_partition_expr_may_be_a_sql_expression(backend: Backend) -> None:
    """As in Dagster's database I/O managers: the expression filters the rows (no column of
    that name is created), and re-running a partition replaces its rows."""
    expression = "CAST(at AS DATE)" if backend.kind == "postgres" else "date(at)"
    assets = _expression_assets(expression)
    for day in ("2025-01-14", "2025-01-15", "2025-01-15"):
        result = backend.materialize(assets, partition_key=day)
        assert result.output_for_node("visits_read") == [{"rows": 2, "columns": "at,n"}]
    assert backend.sql('SELECT count(*) FROM "visits"') == [(4,)]


# -- ExternalDBResource: SQL of your own --------------------------------------------------------


def test_the_resource_runs_your_sql_in_one_transaction(backend: Backend, events: list[Any]) -> None:
    from flowstone_dagster import ConstraintViolation, ExternalDBResource

    mark = "%s" if backend.kind == "postgres" else "?"
    resource = ExternalDBResource(database=backend.manager.database)

    @dg.asset
    def ledger(warehouse: ExternalDBResource) -> None:
        with warehouse.get_connection() as connection:
            cursor = connection.cursor()
            cursor.execute("CREATE TABLE ledger (id integer PRIMARY KEY, amount integer)")
            cursor.execute(f"INSERT INTO ledger VALUES ({mark}, {mark})", (1, 10))

    @dg.asset(deps=[ledger])
    def double_entry(warehouse: ExternalDBResource) -> None:
        with warehouse.get_connection() as connection:
            cursor = connection.cursor()
            cursor.execute(f"INSERT INTO ledger VALUES ({mark}, {mark})", (2, 20))
            cursor.execute(f"INSERT INTO ledger VALUES ({mark}, {mark})", (1, 30))  # duplicate

    result = dg.materialize(
        [ledger, double_entry],
        resources={"warehouse": resource},
        instance=backend.instance,
        raise_on_error=False,
    )
    assert result.is_node_success("ledger")
    assert not result.is_node_success("double_entry")
    error = result.failure_data_for_node("double_entry").error  # type: ignore[union-attr]
    assert error is not None
    assert ConstraintViolation.__name__ in str(error.to_string())
    # The failed block was rolled back as a whole: row 2 is not there either.
    assert backend.sql("SELECT id, amount FROM ledger") == [(1, 10)]
    connections = [e for e in events if e.name == "flowstone.db.connection"]
    assert [e.outcome for e in connections] == ["ok", "error"]
    assert connections[0].measures["adapter"] == backend.kind
