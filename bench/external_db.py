"""The external DB I/O manager against bare COPY and pandas, same server, same run.

    .venv/bin/python bench/external_db.py [--rows 100000 1000000] [--rounds 3]

A DataFrame of (int64, float64, text, timestamp) columns, per size, in interleaved rounds (each
side's median round reported):

PostgreSQL (a throwaway cluster started here):

- store: ``ExternalDBIOManager``'s ``handle_output`` (one transaction: DELETE of the previous
  rows, COPY) against ``psql -c BEGIN -c "DELETE ..." -c "\\copy ... from <file>" -c COMMIT``
  of the same rows from a file, and against a bare psycopg2 ``copy_expert`` of the same frame
  (``to_csv`` into a buffer, DELETE and COPY in one transaction, on an open connection);
- load: ``load_input`` as a DataFrame against ``psql -c "\\copy (select ...) to <file>"`` and a
  bare ``COPY ... TO STDOUT`` with ``copy_expert`` read back by ``pandas.read_csv``.

SQLite: ``handle_output``/``load_input`` against pandas ``to_sql`` (after a DELETE, in one
transaction) and ``read_sql``.

``psql`` starts a process and a connection per run; the I/O manager and the psycopg2 baseline
reuse theirs, as the I/O manager does across the outputs of a step. Aims: store <= 1.2x and load
<= 1.5x ``copy_expert`` on PostgreSQL; SQLite <= 1.2x ``to_sql``/``read_sql``.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

# The repository root instead of bench/ first on sys.path: bench/http.py would shadow the
# standard library's http package, and the tests' support modules live at the root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import dagster as dg  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import psycopg2  # noqa: E402

from flowstone_dagster.external_db import (  # noqa: E402
    ExternalDBIOManager,
    PostgresConfig,
    SQLiteConfig,
)
from flowstone_dagster_tests.support.postgres import PostgresCluster  # noqa: E402

PSQL = "/usr/bin/psql"
COLUMNS = "id, score, name, at"


def _frame(n: int) -> pd.DataFrame:
    ids = np.arange(n, dtype="int64")
    return pd.DataFrame(
        {
            "id": ids,
            "score": ids * 0.25,
            "name": [f"customer-{i}" for i in range(n)],
            "at": pd.Timestamp("2024-01-01") + pd.to_timedelta(ids % 100_000, unit="s"),
        }
    )


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


class Manager:
    """An ``ExternalDBIOManager``'s I/O manager, called as Dagster calls it. The contexts are
    built before the clock starts (Dagster builds them whatever the I/O manager)."""

    def __init__(self, config: ExternalDBIOManager, table: str) -> None:
        self.config = config
        self.io = config.create_io_manager(dg.build_init_resource_context())
        self.key = dg.AssetKey(table)

    def store(self, frame: pd.DataFrame) -> Callable[[], None]:
        context = dg.build_output_context(asset_key=self.key)
        return lambda: self.io.handle_output(context, frame)

    def load(self) -> Callable[[], pd.DataFrame]:
        context = dg.build_input_context(
            asset_key=self.key,
            upstream_output=dg.build_output_context(asset_key=self.key),
            dagster_type=dg.PythonObjectDagsterType(pd.DataFrame),
        )
        return lambda: self.io.load_input(context)


def _postgres(frame: pd.DataFrame, rounds: int, workdir: Path) -> dict[str, list[float]]:
    source = workdir / "rows.tsv"
    frame.to_csv(source, sep="\t", header=False, index=False)
    target = workdir / "out.tsv"
    results: dict[str, list[float]] = {
        k: [] for k in ("io_store", "psql_store", "copy_store", "io_load", "psql_load", "copy_load")
    }
    with PostgresCluster.start() as pg:
        env = {**os.environ, "PGPASSWORD": pg.password}
        connection = ["-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-d", pg.database, "-q"]

        def psql(*commands: str) -> None:
            argv = [PSQL, *connection, "-v", "ON_ERROR_STOP=1"]
            for command in commands:
                argv += ["-c", command]
            subprocess.run(argv, env=env, check=True, capture_output=True)

        definition = "(id bigint, score double precision, name text, at timestamp)"
        psql(f"CREATE TABLE via_psql {definition}", f"CREATE TABLE via_copy {definition}")
        raw = psycopg2.connect(pg.dsn)

        def copy_store() -> None:
            buffer = io.StringIO()
            frame.to_csv(buffer, sep="\t", header=False, index=False)
            buffer.seek(0)
            with raw, raw.cursor() as cursor:
                cursor.execute("DELETE FROM via_copy")
                cursor.copy_expert(f"COPY via_copy ({COLUMNS}) FROM STDIN", buffer)

        def copy_load() -> pd.DataFrame:
            buffer = io.StringIO()
            with raw, raw.cursor() as cursor:
                cursor.copy_expert(f"COPY (SELECT {COLUMNS} FROM via_copy) TO STDOUT", buffer)
            buffer.seek(0)
            return pd.read_csv(
                buffer,
                sep="\t",
                names=["id", "score", "name", "at"],
                parse_dates=["at"],
                na_values=["\\N"],
                keep_default_na=False,
            )

        config = ExternalDBIOManager(
            database=PostgresConfig(
                host=pg.host,
                port=pg.port,
                database=pg.database,
                user=pg.user,
                password=pg.password,
            )
        )
        manager = Manager(config, "via_io_manager")
        manager.store(frame)()  # create the table, open the connection
        loaded = manager.load()()
        assert len(loaded) == len(frame)
        assert loaded["id"].tolist()[:3] == [0, 1, 2]
        copy_store()
        assert len(copy_load()) == len(frame)

        for _ in range(rounds):
            results["io_store"].append(_timed(manager.store(frame)))
            results["psql_store"].append(
                _timed(
                    lambda: psql(
                        "BEGIN",
                        "DELETE FROM via_psql",
                        f"\\copy via_psql ({COLUMNS}) from '{source}'",
                        "COMMIT",
                    )
                )
            )
            results["copy_store"].append(_timed(copy_store))
            results["io_load"].append(_timed(manager.load()))
            results["psql_load"].append(
                _timed(lambda: psql(f"\\copy (SELECT {COLUMNS} FROM via_psql) to '{target}'"))
            )
            results["copy_load"].append(_timed(copy_load))
        assert len(target.read_text().splitlines()) == len(frame)
        raw.close()
        config.db.close()
    return results


def _sqlite(frame: pd.DataFrame, rounds: int, workdir: Path) -> dict[str, list[float]]:
    results: dict[str, list[float]] = {
        k: [] for k in ("io_store", "pd_store", "io_load", "pd_load")
    }
    path = workdir / f"bench-{len(frame)}.sqlite3"
    config = ExternalDBIOManager(database=SQLiteConfig(path=str(path)))
    manager = Manager(config, "via_io_manager")
    manager.store(frame)()
    assert len(manager.load()()) == len(frame)
    raw = sqlite3.connect(path)
    frame.to_sql("via_pandas", raw, index=False)

    def pandas_store() -> None:
        with raw:
            raw.execute("DELETE FROM via_pandas")
            frame.to_sql("via_pandas", raw, index=False, if_exists="append")

    for _ in range(rounds):
        results["io_store"].append(_timed(manager.store(frame)))
        results["pd_store"].append(_timed(pandas_store))
        results["io_load"].append(_timed(manager.load()))
        results["pd_load"].append(
            _timed(lambda: pd.read_sql("SELECT * FROM via_pandas", raw, parse_dates=["at"]))
        )
    raw.close()
    config.db.close()
    return results


def _report(title: str, results: dict[str, list[float]], baselines: list[str]) -> None:
    median = {name: statistics.median(times) for name, times in results.items()}
    print(title)
    for what in ("store", "load"):
        ours = median[f"io_{what}"]
        line = f"  {what:5}  I/O manager {ours * 1000:9.1f} ms"
        for baseline in baselines:
            theirs = median[f"{baseline}_{what}"]
            line += f"   {baseline} {theirs * 1000:9.1f} ms ({ours / theirs:.2f}x)"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--only", choices=["postgres", "sqlite"], default=None)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.WARNING)
    workdir = Path(tempfile.mkdtemp(prefix="flowstone-bench-db-"))
    workdir.chmod(0o777)  # psql may write its output file here
    for rows in args.rows:
        frame = _frame(rows)
        what = f"{rows} rows of (int64, float64, text, timestamp), {args.rounds} rounds, median"
        if args.only in (None, "postgres"):
            results = _postgres(frame, args.rounds, workdir)
            _report(f"PostgreSQL, {what}", results, ["copy", "psql"])
        if args.only in (None, "sqlite"):
            _report(f"SQLite, {what}", _sqlite(frame, args.rounds, workdir), ["pd"])


if __name__ == "__main__":
    main()
