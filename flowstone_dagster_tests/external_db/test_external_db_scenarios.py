"""Dagster's database I/O manager scenarios (those dagster-duckdb's and friends' tests cover),
on SQLite and PostgreSQL, with dagster.materialize: key prefixes, time zones, partition
patterns."""

import datetime as dt
import sqlite3
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
