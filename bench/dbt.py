"""What DbtResource costs over running dbt directly, and over plain dagster-dbt in @dbt_assets.

Times, interleaved (one of each per round, the order rotating), on a copy of the fixture
project (DuckDB):

- the call API: ``dbt build`` as a subprocess (bare, what a shell script does), against
  ``DbtResource(...).build()`` and dagster-dbt's ``DbtCliResource(...).cli(["build"]).wait()``;
- ``@dbt_assets``: ``materialize`` of the healthy assets with
  ``dbt.stream(["build"], context=context).fetch_row_counts()`` (DbtResource) against plain
  dagster-dbt's ``dbt.cli(["build"], context=context).stream().fetch_row_counts()``, each with a
  new resource per materialization (as each Dagster step builds its own).

Every variant starts from the same partial-parse file. Prints medians and the ratios against
the baseline of each group, in wall time and in CPU time (this process and its children: the
steadier figure on a shared machine). Aims: the call API within 1.03x of bare dbt;
@dbt_assets with row counts no slower than plain dagster-dbt with row counts.

    .venv/bin/python bench/dbt.py [--rounds 3]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from typing import Any  # noqa: E402

import dagster as dg  # noqa: E402
from dagster_dbt import DbtCliResource, dbt_assets  # noqa: E402

from flowstone_dagster.dbt import DbtResource  # noqa: E402

FIXTURE = ROOT / "flowstone_dagster_tests" / "dbt" / "dbt_project"
HEALTHY = "tag:deliberately_failing tag:deliberately_slow"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    rounds = parser.parse_args().rounds
    logging.getLogger("dagster").setLevel(logging.ERROR)

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        shutil.copytree(FIXTURE, project, ignore=shutil.ignore_patterns("target", "logs"))
        dbt_path = shutil.which("dbt") or str(Path(sys.executable).parent / "dbt")
        env = {
            **os.environ,
            "DBT_PROFILES_DIR": str(project),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for the whole run
        # Warm-up: build the tables, leave a partial-parse file and a manifest in target/.
        subprocess.run([dbt_path, "build"], cwd=project, env=env, check=True, stdout=devnull)
        manifest = project / "target" / "manifest.json"

        def resource() -> DbtResource:
            return DbtResource(project_dir=str(project), profiles_dir=str(project))

        def plain_cli() -> DbtCliResource:
            return DbtCliResource(
                project_dir=str(project), profiles_dir=str(project), dbt_executable=dbt_path
            )

        def bare() -> None:
            subprocess.run(
                [dbt_path, "build"], cwd=project, env=env, check=True, stdout=subprocess.DEVNULL
            )

        def call_api() -> None:
            resource().build()

        def dagster_dbt_wait() -> None:
            plain_cli().cli(["build"]).wait()

        @dbt_assets(manifest=manifest, exclude=HEALTHY)
        def ours(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
            yield from dbt.stream(["build"], context=context).fetch_row_counts()

        @dbt_assets(manifest=manifest, exclude=HEALTHY)
        def plain(context: dg.AssetExecutionContext, dbt: DbtCliResource) -> Iterator[Any]:
            yield from dbt.cli(["build"], context=context).stream().fetch_row_counts()

        def materialize(assets: Any, make: Callable[[], Any]) -> None:
            # A database file per materialization: DuckDB's in-process adapter of
            # fetch_row_counts keeps the file it read open (see docs/dbt.md).
            # (The same file name: DuckDB names the catalog after it, and the manifest has it.)
            database = Path(tmp) / f"assets-{time.perf_counter_ns()}" / "fixture.duckdb"
            database.parent.mkdir()
            shutil.copyfile(project / "target" / "fixture.duckdb", database)
            os.environ["FLOWSTONE_DBT_DUCKDB_PATH"] = str(database)
            try:
                result = dg.materialize([assets], resources={"dbt": make()})
            finally:
                del os.environ["FLOWSTONE_DBT_DUCKDB_PATH"]
            assert result.success
            counted = [
                event
                for event in result.get_asset_materialization_events()
                if "dagster/row_count" in event.materialization.metadata
            ]
            assert counted, "no row counts"

        groups: dict[str, dict[str, Callable[[], None]]] = {
            "call API: dbt build": {
                "bare dbt build": bare,
                "DbtResource.build()": call_api,
                "DbtCliResource.cli().wait()": dagster_dbt_wait,
            },
            "@dbt_assets build with fetch_row_counts()": {
                "plain dagster-dbt stream()": lambda: materialize(plain, plain_cli),
                "DbtResource.stream()": lambda: materialize(ours, resource),
            },
        }
        times: dict[str, list[float]] = {name: [] for group in groups.values() for name in group}
        cpu: dict[str, list[float]] = {name: [] for name in times}
        with contextlib.redirect_stdout(devnull):  # dbt's log lines, forwarded by dagster-dbt
            for group in groups.values():  # one untimed call each (imports, caches)
                for warm_up in group.values():
                    warm_up()
            for round_number in range(rounds):
                for group in groups.values():
                    # The order rotates each round: no variant always runs after the same one.
                    order = list(group.items())
                    shift = round_number % len(order)
                    for name, fn in order[shift:] + order[:shift]:
                        started, cpu_started = time.perf_counter(), cpu_seconds()
                        fn()
                        times[name].append(time.perf_counter() - started)
                        cpu[name].append(cpu_seconds() - cpu_started)
        devnull.close()

    report(groups, times, cpu, rounds)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children: steadier than wall time on a
    machine shared with other work (the dbt subprocesses are children)."""
    own, children = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def report(
    groups: dict[str, dict[str, Callable[[], None]]],
    times: dict[str, list[float]],
    cpu: dict[str, list[float]],
    rounds: int,
) -> None:
    load = os.getloadavg()[0]
    print(f"fixture project on DuckDB, {rounds} interleaved rounds, load average {load:.1f}")
    for title, group in groups.items():
        names = list(group)
        baseline = statistics.median(times[names[0]])
        cpu_baseline = statistics.median(cpu[names[0]])
        print(f"\n{title}")
        print(f"{'variant':<30} {'wall s':>8} {'ratio':>6} {'cpu s':>7} {'ratio':>6}   wall (s)")
        for name in names:
            median, cpu_median = statistics.median(times[name]), statistics.median(cpu[name])
            every = " ".join(f"{value:.2f}" for value in times[name])
            print(
                f"{name:<30} {median:>8.3f} {median / baseline:>6.3f} {cpu_median:>7.3f} "
                f"{cpu_median / cpu_baseline:>6.3f}   {every}"
            )


if __name__ == "__main__":
    main()
