"""``make demo-cluster``: the example on Celery workers, a backfill of its five days, a report.

::

    python -m example_project.cluster [--workers 2] [--postgres-url URL] [--redis-url URL]

Without URLs it starts a throwaway PostgreSQL cluster and ``redis-server`` (Debian's, which
``bin/setup`` installs) on loopback ports; with them it uses yours. It then starts the
source API, the Celery workers and the daemon (:mod:`example_project.cluster.deployment`),
submits a backfill of every day, waits for its runs, prints per run which Celery worker ran
each step, and stops everything it started, also on Ctrl-C or an error.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

from example_project.cluster.deployment import CeleryDeployment
from example_project.cluster.report import step_workers
from example_project.source_api import DAYS


@contextmanager
def _throwaway_services(stack: ExitStack) -> Iterator[tuple[str, str]]:
    # The test suite's throwaway servers (development tooling beside the example).
    from flowstone_dagster_tests.support.postgres import PostgresCluster
    from flowstone_dagster_tests.support.redis import RedisServer

    postgres = stack.enter_context(PostgresCluster.start())
    redis = stack.enter_context(RedisServer.start())
    yield postgres.url, redis.url


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--postgres-url", help="use this PostgreSQL instead of a throwaway one")
    parser.add_argument("--redis-url", help="use this Redis instead of a throwaway one")
    parser.add_argument("--directory", type=Path, help="the nodes' directories (temporary)")
    arguments = parser.parse_args(argv)
    with ExitStack() as stack:
        if arguments.postgres_url and arguments.redis_url:
            postgres_url, redis_url = arguments.postgres_url, arguments.redis_url
        else:
            print("starting a throwaway PostgreSQL and Redis on loopback ...", flush=True)
            postgres_url, redis_url = stack.enter_context(_throwaway_services(stack))
        root = arguments.directory or Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="flowstone-cluster-"))
        )
        deployment = CeleryDeployment(root, postgres_url, redis_url, workers=arguments.workers)
        print(f"starting the source API, {arguments.workers} Celery workers and the daemon ...")
        stack.enter_context(deployment.running())
        started = time.monotonic()
        backfill_id = deployment.backfill(DAYS)
        print(f"backfill {backfill_id} of {', '.join(DAYS)} submitted; waiting for its runs ...")
        runs = deployment.wait(backfill_id, runs=len(DAYS))
        elapsed = time.monotonic() - started
        ok = True
        with deployment.instance() as instance:
            for run in sorted(runs, key=lambda r: r.tags.get("dagster/partition", "")):
                ok = ok and run.status.value == "SUCCESS"
                print(f"\n{run.tags.get('dagster/partition')}  {run.status.value}  {run.run_id}")
                for step, worker in sorted(step_workers(instance, run.run_id).items()):
                    print(f"    {step:<16} on {worker}")
        print(f"\n{len(runs)} runs in {elapsed:.1f} s on {arguments.workers} Celery workers")
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
