"""Concurrent stores on PostgreSQL: first stores into a new schema from two real processes,
and stores of different partitions of one table that do not wait for each other."""

import datetime as dt
import multiprocessing
import traceback
from typing import Any

import pytest

from flowstone_dagster.errors import CallTimeout
from flowstone_dagster.external_db import ExternalDB
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = pytest.mark.postgres

ROUNDS = 15


def _dsn(pg: PostgresCluster) -> dict[str, Any]:
    return {
        "host": pg.host,
        "port": pg.port,
        "database": pg.database,
        "user": pg.user,
        "password": pg.password,
    }


def _first_stores(dsn: dict[str, Any], name: str, barrier: Any, results: Any) -> None:
    """One process: in each round, wait for the other, then store into a new schema."""
    try:
        with ExternalDB.postgres(**dsn) as db:
            for round_ in range(ROUNDS):
                barrier.wait(timeout=60)
                db.store_table(name, [{"round": round_}], schema=f"fresh_{round_}")
                db.store_table(
                    "shared", [{"by": name}], schema=f"fresh_{round_}", partition={"p": name}
                )
        results.put((name, None))
    except BaseException:
        results.put((name, traceback.format_exc()))


@pytest.mark.multiprocess
def test_first_stores_into_a_new_schema_from_two_processes_never_race(
    pg_database: PostgresCluster,
) -> None:
    dsn = _dsn(pg_database)
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    results = context.Queue()
    workers = [
        context.Process(target=_first_stores, args=(dsn, name, barrier, results))
        for name in ("a", "b")
    ]
    for worker in workers:
        worker.start()
    outcomes = dict(results.get(timeout=300) for _ in workers)
    for worker in workers:
        worker.join(timeout=60)
    assert outcomes == {"a": None, "b": None}
    with ExternalDB.postgres(**dsn) as db:
        for round_ in range(ROUNDS):
            assert db.load_table("a", schema=f"fresh_{round_}") == [{"round": round_}]
            shared = db.load_table("shared", schema=f"fresh_{round_}")
            assert sorted(row["by"] for row in shared) == ["a", "b"]


def test_different_partitions_of_one_table_store_while_one_is_held(
    pg_database: PostgresCluster,
) -> None:
    """A transaction holding partition 15's lock (as a long store of it would) leaves the store
    of partition 16 free, and makes another store of partition 15 wait (here: past its
    statement_timeout of 1 s)."""
    dsn = _dsn(pg_database)
    day15, day16 = {"day": dt.date(2025, 1, 15)}, {"day": dt.date(2025, 1, 16)}
    with ExternalDB.postgres(**dsn, statement_timeout=1) as db:
        db.store_table("events", [{"n": 1}], partition=day15)
        adapter = db.adapter
        holder = adapter.connect()
        try:
            adapter.begin(holder, None)
            from flowstone_dagster.external_db.partitions import PartitionSelection

            adapter.lock_rows(holder, "public", "events", PartitionSelection.of(day15).describe())
            db.store_table("events", [{"n": 2}], partition=day16)  # not blocked
            with pytest.raises(CallTimeout):
                db.store_table("events", [{"n": 3}], partition=day15)
            with pytest.raises(CallTimeout):  # the whole table waits for the partition's store
                db.store_table("events", [{"n": 4, **day16}])
        finally:
            adapter.rollback(holder)
            adapter.close(holder)
        rows = db.load_table("events")
        assert sorted((row["day"], row["n"]) for row in rows) == [
            (dt.date(2025, 1, 15), 1),
            (dt.date(2025, 1, 16), 2),
        ]
