"""The external DB I/O manager against ``psql``'s ``\\copy``, same server, same run.

    .venv/bin/python bench/external_db.py [--rows 100000] [--rounds 5]

Starts a throwaway PostgreSQL cluster, then per round (alternating sides, each side's median
round reported):

- store: ``ExternalDBIOManager.handle_output`` of ``--rows`` rows of (integer, text, float,
  date) as a list of dicts (one transaction: DELETE of the previous rows, COPY) against
  ``psql -c BEGIN -c "DELETE ..." -c "\\copy ... from <file>" -c COMMIT`` of the same rows from
  a file;
- load: ``ExternalDBIOManager.load_input`` (rows back as a list of dicts) against
  ``psql -c "\\copy (select ...) to <file>"``.

``psql`` starts a process and a connection per run; the I/O manager reuses its connection, as it
does across the outputs of a step. Aim: within 1.5x of psql on store and 2x on load.
"""

from __future__ import annotations

import argparse
import datetime as dt
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

# The repository root instead of bench/ first on sys.path: bench/http.py would shadow the
# standard library's http package, and the tests' support modules live at the root.
ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import dagster as dg  # noqa: E402

from flowstone_dagster.external_db import ExternalDBIOManager, PostgresConfig  # noqa: E402
from flowstone_dagster_tests.support.postgres import PostgresCluster  # noqa: E402

PSQL = "/usr/bin/psql"


def _rows(n: int) -> list[dict[str, object]]:
    start = dt.date(2024, 1, 1)
    return [
        {"id": i, "name": f"customer-{i}", "score": i * 0.25, "day": start + dt.timedelta(i % 366)}
        for i in range(n)
    ]


def _timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    logging.getLogger("dagster").setLevel(logging.INFO)

    rows = _rows(args.rows)
    workdir = Path(tempfile.mkdtemp(prefix="flowstone-bench-db-"))
    workdir.chmod(0o777)  # psql may write its output file here
    source = workdir / "rows.tsv"
    source.write_text(
        "".join(f"{r['id']}\t{r['name']}\t{r['score']!r}\t{r['day']}\n" for r in rows)
    )
    target = workdir / "out.tsv"

    with PostgresCluster.start() as pg:
        env = {**os.environ, "PGPASSWORD": pg.password}
        connection = ["-h", pg.host, "-p", str(pg.port), "-U", pg.user, "-d", pg.database, "-q"]

        def psql(*commands: str) -> None:
            argv = [PSQL, *connection, "-v", "ON_ERROR_STOP=1"]
            for command in commands:
                argv += ["-c", command]
            subprocess.run(argv, env=env, check=True, capture_output=True)

        psql("CREATE TABLE via_psql (id bigint, name text, score double precision, day date)")
        manager = ExternalDBIOManager(
            database=PostgresConfig(
                host=pg.host,
                port=pg.port,
                database=pg.database,
                user=pg.user,
                password=pg.password,
            )
        )
        key = dg.AssetKey("via_io_manager")

        def output_context() -> dg.OutputContext:  # one per store: metadata is added once
            return dg.build_output_context(asset_key=key)

        def input_context() -> dg.InputContext:
            return dg.build_input_context(asset_key=key, upstream_output=output_context())

        manager.handle_output(output_context(), rows)  # create the table, open the connection
        assert manager.load_input(input_context()) == rows

        results: dict[str, list[float]] = {
            k: [] for k in ("io_store", "psql_store", "io_load", "psql_load")
        }
        for _ in range(args.rounds):
            storing, loading = output_context(), input_context()
            results["io_store"].append(_timed(partial(manager.handle_output, storing, rows)))
            results["psql_store"].append(
                _timed(
                    lambda: psql(
                        "BEGIN",
                        "DELETE FROM via_psql",
                        f"\\copy via_psql (id, name, score, day) from '{source}'",
                        "COMMIT",
                    )
                )
            )
            results["io_load"].append(_timed(partial(manager.load_input, loading)))
            results["psql_load"].append(
                _timed(
                    lambda: psql(
                        f"\\copy (SELECT id, name, score, day FROM via_psql) to '{target}'"
                    )
                )
            )
        assert len(target.read_text().splitlines()) == args.rows  # every row came back
        manager.db.close()

    median = {name: statistics.median(times) for name, times in results.items()}
    print(f"{args.rows} rows of (integer, text, float, date), {args.rounds} rounds, median round")
    for what in ("store", "load"):
        ours, theirs = median[f"io_{what}"], median[f"psql_{what}"]
        print(
            f"{what:5}  I/O manager {ours * 1000:8.1f} ms   psql \\copy {theirs * 1000:8.1f} ms"
            f"   ratio {ours / theirs:.2f}x"
        )


if __name__ == "__main__":
    main()
