"""``make demo``: run the main job for two partitions with ``dagster job execute`` and report.

::

    DAGSTER_HOME=$PWD/.dagster_home python -m example_project.demo 2025-01-14 2025-01-15

Each partition is one ``dagster job execute`` run (its full log goes to
``$DAGSTER_HOME/demo-<partition>.log``). Afterwards the runs are read back from the Dagster
instance and a table shows, per asset and partition, the step's status and duration, the rows
stored, and the ``flowstone/...`` metadata the integrations recorded. The exit code is non-zero
when any step failed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import dagster as dg

JOB = "daily_pipeline"
DEFAULT_PARTITIONS = ("2025-01-14", "2025-01-15")
#: Metadata shown in the report, besides ``flowstone/...`` keys.
SHOWN_KEYS = ("dagster/partition_row_count", "summarized_orders", "skipped")


def _execute(partition: str, log_path: Path) -> int:
    """One ``dagster job execute`` run of the job for ``partition``; returns its exit code."""
    dagster = Path(sys.executable).with_name("dagster")
    command = [
        str(dagster),
        "job",
        "execute",
        "-m",
        "example_project",
        "-j",
        JOB,
        "--tags",
        json.dumps({"dagster/partition": partition}),
    ]
    with log_path.open("w") as log:
        return subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, check=False).returncode


def _format_value(value: object) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    text = str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def report(instance: dg.DagsterInstance, partitions: Sequence[str]) -> bool:
    """Print the table of the latest run of each partition; True when every step succeeded."""
    all_ok = True
    for partition in partitions:
        runs = instance.get_runs(
            dg.RunsFilter(job_name=JOB, tags={"dagster/partition": partition}), limit=1
        )
        if not runs:
            print(f"\n{partition}: no run found")
            all_ok = False
            continue
        run = runs[0]
        print(f"\n== partition {partition}: run {run.run_id[:8]} {run.status.value}")
        all_ok &= run.status == dg.DagsterRunStatus.SUCCESS
        stats = {s.step_key: s for s in instance.get_run_step_stats(run.run_id)}
        records = instance.get_records_for_run(
            run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION
        ).records
        materialized: dict[str, dict[str, object]] = {}
        for record in records:
            event = record.event_log_entry.dagster_event
            if event is None or event.step_key is None:
                continue
            materialization = event.event_specific_data.materialization  # type: ignore[union-attr]
            key = materialization.asset_key.to_user_string()
            materialized[key] = {
                name: getattr(value, "value", value)
                for name, value in materialization.metadata.items()
                if name in SHOWN_KEYS or name.startswith("flowstone/")
            }
            materialized[key]["_step"] = event.step_key
        for step_key, step in sorted(stats.items(), key=lambda item: item[1].start_time or 0):
            assets = [k for k, v in materialized.items() if v.get("_step") == step_key] or [
                step_key
            ]
            duration = (
                f"{(step.end_time - step.start_time):6.2f} s"
                if step.end_time and step.start_time
                else "     -  "
            )
            status = step.status.value if step.status else "UNKNOWN"
            all_ok &= status == "SUCCESS"
            for asset in assets:
                metadata = materialized.get(asset, {})
                print(f"  {asset:<28} {status:<8} {duration}")
                for name, value in sorted(metadata.items()):
                    if name != "_step":
                        print(f"      {name:<44} {_format_value(value)}")
    return all_ok


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("partitions", nargs="*", default=list(DEFAULT_PARTITIONS))
    args = parser.parse_args(argv)
    home = os.environ.get("DAGSTER_HOME")
    if not home:
        print("set DAGSTER_HOME (make demo sets it to ./.dagster_home)", file=sys.stderr)
        return 2
    exit_codes = []
    for partition in args.partitions:
        log_path = Path(home) / f"demo-{partition}.log"
        print(f"running {JOB} for {partition} (log: {log_path}) ...", flush=True)
        exit_codes.append(_execute(partition, log_path))
        retries = [
            line.split(" - ")[-1].strip()
            for line in log_path.read_text().splitlines()
            if "flowstone." in line and ("attempts=" in line) and "outcome=" in line
        ]
        for line in retries:
            print(f"  {line}")
    with dg.DagsterInstance.get() as instance:
        ok = report(instance, args.partitions)
    ok &= all(code == 0 for code in exit_codes)
    print("\nall steps succeeded" if ok else "\nsome steps FAILED: see the logs above")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
