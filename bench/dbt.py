"""What DbtResource.run_model costs over running dbt directly.

Times, in alternating rounds of one run on a copy of the fixture project (DuckDB):

- bare: ``dbt run --select customer_revenue`` as a subprocess (what a shell script does);
- dagster-dbt: ``DbtCliResource(...).cli([...]).wait()``;
- run_model: ``DbtResource(...).run_model("customer_revenue")``.

All three start from the same partial-parse file and write nothing else in common. Prints the
median and mean per variant and the ratios against bare dbt. Aim: run_model within 1.05x.

    .venv/bin/python bench/dbt.py [--rounds 7]
"""

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:] = [str(ROOT)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]

import argparse  # noqa: E402
import contextlib  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

from flowstone_dagster.dbt import DbtResource  # noqa: E402

FIXTURE = ROOT / "flowstone_dagster_tests" / "dbt" / "dbt_project"
MODEL = "customer_revenue"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    rounds = parser.parse_args().rounds

    with tempfile.TemporaryDirectory() as tmp:
        project = Path(tmp) / "project"
        shutil.copytree(FIXTURE, project, ignore=shutil.ignore_patterns("target", "logs"))
        dbt_path = shutil.which("dbt") or str(Path(sys.executable).parent / "dbt")
        env = {
            **os.environ,
            "DBT_PROFILES_DIR": str(project),
            "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        }
        resource = DbtResource(project_dir=str(project), profiles_dir=str(project))
        # dagster-dbt's DbtCliResource with the same settings (its dbt version filled in, so
        # that it does not run `dbt --version`, which asks PyPI for the latest release).
        cli = resource.cli_resource()
        devnull = open(os.devnull, "w")  # noqa: SIM115 - kept open for the whole run

        # Warm-up: build the upstream tables and leave a partial-parse file in target/.
        subprocess.run([dbt_path, "build"], cwd=project, env=env, check=True, stdout=devnull)

        def bare() -> None:
            subprocess.run(
                [dbt_path, "run", "--select", MODEL],
                cwd=project,
                env=env,
                check=True,
                stdout=subprocess.DEVNULL,
            )

        def dagster_dbt() -> None:
            cli.cli(["run", "--select", MODEL]).wait()

        def run_model() -> None:
            resource.run_model(MODEL)

        variants: dict[str, Callable[[], None]] = {
            "bare dbt": bare,
            "DbtCliResource.cli().wait()": dagster_dbt,
            "DbtResource.run_model": run_model,
        }
        times: dict[str, list[float]] = {name: [] for name in variants}
        with contextlib.redirect_stdout(devnull):  # dbt's log lines, forwarded by dagster-dbt
            for warm_up in variants.values():  # one untimed call each (imports, caches)
                warm_up()
            for _ in range(rounds):
                for name, fn in variants.items():
                    started = time.perf_counter()
                    fn()
                    times[name].append(time.perf_counter() - started)
        devnull.close()

    baseline = statistics.median(times["bare dbt"])
    print(f"dbt run --select {MODEL} on DuckDB, {rounds} alternating rounds")
    print(f"{'variant':<30} {'median s':>9} {'mean s':>8} {'ratio (median)':>15}")
    for name, values in times.items():
        median = statistics.median(values)
        print(
            f"{name:<30} {median:>9.3f} {statistics.mean(values):>8.3f} {median / baseline:>15.3f}"
        )


if __name__ == "__main__":
    main()
