"""The example's backfill of every day on the Celery deployment against the multiprocess
executor, both on this machine.

Both deployments are the same but for where steps run (example_project.cluster.deployment):
PostgreSQL storage and warehouse, Redis resilience store, the daemon with a queued run
coordinator (two runs at a time), the `warehouse` pool one step at a time. "celery" sends the
steps to two Celery workers (one step at a time each); "multiprocess" runs them in subprocesses
of each run's process. The wall time is from submitting the backfill (``dagster job
backfill``) to its last run's end. The order alternates between rounds.

    .venv/bin/python bench/cluster.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

# Import from the repository, not from bench/ (whose http.py would shadow the standard library's).
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from example_project.cluster.deployment import CeleryDeployment  # noqa: E402
from example_project.source_api import DAYS  # noqa: E402
from flowstone_dagster_tests.support.postgres import PostgresCluster  # noqa: E402
from flowstone_dagster_tests.support.redis import RedisServer  # noqa: E402


def backfill_seconds(executor: str, postgres: PostgresCluster, redis_url: str) -> float:
    url = postgres.url  # one database for every round: each backfill reads only its own runs
    with tempfile.TemporaryDirectory() as root:
        deployment = CeleryDeployment(Path(root), url, redis_url, workers=2, executor=executor)
        with deployment.running():
            started = time.monotonic()
            backfill_id = deployment.backfill(DAYS)
            runs = deployment.wait(backfill_id, runs=len(DAYS))
            elapsed = time.monotonic() - started
    failed = [run.run_id for run in runs if run.status.value != "SUCCESS"]
    if failed:
        raise RuntimeError(f"{executor}: runs failed: {failed}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    rounds = parser.parse_args().rounds
    seconds: dict[str, list[float]] = {"multiprocess": [], "celery": []}
    with PostgresCluster.start() as postgres, RedisServer.start() as redis:
        for round_ in range(rounds):
            order = ["multiprocess", "celery"] if round_ % 2 == 0 else ["celery", "multiprocess"]
            for executor in order:
                seconds[executor].append(backfill_seconds(executor, postgres, redis.url))
                print(f"round {round_ + 1}: {executor:<12} {seconds[executor][-1]:6.1f} s")
    base = statistics.median(seconds["multiprocess"])
    celery = statistics.median(seconds["celery"])
    print(
        f"\nbackfill of {len(DAYS)} days, median of {rounds}: multiprocess {base:.1f} s, "
        f"Celery (2 workers) {celery:.1f} s = {celery / base:.2f}x"
    )


if __name__ == "__main__":
    main()
