"""``DbtResource`` with dbt-postgres against the tests' throwaway PostgreSQL cluster.

A warehouse that refuses connections is real here: dbt connects to a loopback port where
nothing listens until the retry starts a TCP forwarder to PostgreSQL there.
"""

import contextlib
import shutil
import socket
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import orjson
import psycopg2
import pytest
from dagster_dbt import dbt_assets

from flowstone_dagster import telemetry
from flowstone_dagster.dbt import DbtResource
from flowstone_dagster.dbt.errors import DbtWarehouseRejected, DbtWarehouseUnreachable
from flowstone_dagster.errors import MaxAttemptsExceeded, is_retryable
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.postgres import PostgresCluster

pytestmark = [pytest.mark.dbt, pytest.mark.postgres]

FIXTURE_PROJECT = Path(__file__).parent / "dbt_project"


class Forwarder:
    """A TCP forwarder from a loopback port to PostgreSQL, started on demand."""

    def __init__(self, port: int, upstream: tuple[str, int]) -> None:
        self.port = port
        self.upstream = upstream
        self.listener: socket.socket | None = None
        self.connections = 0
        self._stop = threading.Event()

    def start(self) -> None:
        listener = socket.create_server(("127.0.0.1", self.port))
        listener.settimeout(0.2)
        self.listener = listener
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        assert self.listener is not None
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self.upstream)
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while chunk := source.recv(65536):
                sink.sendall(chunk)
        except OSError:
            pass
        finally:
            for sock in (source, sink):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        self._stop.set()
        if self.listener is not None:
            self.listener.close()


@pytest.fixture
def project(tmp_path: Path) -> Path:
    destination = tmp_path / "project"
    shutil.copytree(FIXTURE_PROJECT, destination, ignore=shutil.ignore_patterns("target", "logs"))
    return destination


@pytest.fixture
def warehouse_port(
    pg_database: PostgresCluster, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Forwarder]:
    """The profile's `postgres` target pointed at a port where nothing listens yet."""
    forwarder = Forwarder(free_port(), (pg_database.host, pg_database.port))
    for name, value in {
        "FLOWSTONE_DBT_PG_HOST": "127.0.0.1",
        "FLOWSTONE_DBT_PG_PORT": str(forwarder.port),
        "FLOWSTONE_DBT_PG_USER": pg_database.user,
        "FLOWSTONE_DBT_PG_PASSWORD": pg_database.password,
        "FLOWSTONE_DBT_PG_DATABASE": pg_database.database,
    }.items():
        monkeypatch.setenv(name, value)
    yield forwarder
    forwarder.stop()


def test_refused_connection_is_retried_through_resilience(
    project: Path, warehouse_port: Forwarder, pg_database: PostgresCluster
) -> None:
    events: list[telemetry.TelemetryEvent] = []

    def on_event(event: telemetry.TelemetryEvent) -> None:
        events.append(event)
        # The warehouse comes back while the retry waits.
        if event.name == "flowstone.retry" and warehouse_port.listener is None:
            warehouse_port.start()

    dbt = DbtResource(
        service="dbt",  # the policies below are keyed by it
        project_dir=str(project),
        target="postgres",
        resilience=ResilienceResource(
            store_url="memory://dbt-postgres",
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.1))},
        ),
    )
    remove = telemetry.add_listener(on_event)
    try:
        result = dbt.build()
    finally:
        remove()

    assert result.success
    assert result.attempts == 2
    assert warehouse_port.connections > 0
    # dbt failed before running any node (no results to retry from): the command ran again.
    assert result.previous is None
    by_name = {node.name: node for node in result.nodes}
    assert by_name["raw_orders"].rows_affected == 5
    assert by_name["customer_revenue"].rows_affected == 3  # PostgreSQL reports SELECT 3
    [retry] = [e for e in events if e.name == "flowstone.retry"]
    assert retry.error_type == "DbtWarehouseUnreachable"
    [command] = [e for e in events if e.name == "flowstone.dbt.command"]
    assert (command.outcome, command.attempts) == ("ok", 2)
    assert pg_database.password not in result.output

    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("select name, revenue from flowstone.customer_revenue order by name")
        assert [(name, float(revenue)) for name, revenue in cursor.fetchall()] == [
            ("Ada", 24.75),
            ("Grace", 55.1),
            ("Linus", 0.0),
        ]


def test_refused_connection_without_resilience_is_one_retryable_error(
    project: Path, warehouse_port: Forwarder, pg_database: PostgresCluster
) -> None:
    dbt = DbtResource(project_dir=str(project), target="postgres")
    with pytest.raises(dg.Failure) as raised:
        dbt.run()

    # The one mapping, also with no resilience configured: a retryable Failure caused by it.
    assert raised.value.allow_retries is True
    assert raised.value.metadata["flowstone/error_type"].value == "DbtWarehouseUnreachable"
    error = raised.value.__cause__
    assert isinstance(error, DbtWarehouseUnreachable)
    assert is_retryable(error)
    assert error.exit_code == 2
    assert "could not reach the warehouse" in str(error)
    assert "Connection refused" in str(error)
    assert pg_database.password not in str(error)
    assert pg_database.password not in error.output
    assert warehouse_port.connections == 0


def test_warehouse_that_stays_down_exhausts_the_attempts(
    project: Path, warehouse_port: Forwarder
) -> None:
    dbt = DbtResource(
        service="dbt",  # the policies below are keyed by it
        project_dir=str(project),
        target="postgres",
        resilience=ResilienceResource(
            store_url="memory://dbt-postgres-down",
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=2, base_delay=0.05))},
        ),
    )
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("stg_orders")
    assert raised.value.allow_retries is True  # transient: the step's RetryPolicy may retry
    assert raised.value.metadata["flowstone/attempts"].value == 2
    error = raised.value.__cause__
    assert isinstance(error, MaxAttemptsExceeded)
    assert error.attempts == 2
    assert isinstance(error.last_error, DbtWarehouseUnreachable)


@pytest.mark.dagster
def test_dbt_assets_retry_a_refused_connection_before_any_node(
    project: Path, warehouse_port: Forwarder, dagster_instance: dg.DagsterInstance
) -> None:
    # `dbt parse` does not connect: the manifest comes while the warehouse is still down.
    manifest = DbtResource(project_dir=str(project), target="postgres").invoke("parse")

    @dbt_assets(manifest=manifest.target_path / "manifest.json", select="raw_orders stg_orders")
    def orders(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["build"], context=context)

    def on_event(event: telemetry.TelemetryEvent) -> None:
        if event.name == "flowstone.retry" and warehouse_port.listener is None:
            warehouse_port.start()

    remove = telemetry.add_listener(on_event)
    try:
        result = dg.materialize(
            [orders],
            resources={
                "dbt": DbtResource(
                    service="dbt",  # the policies below are keyed by it
                    project_dir=str(project),
                    target="postgres",
                    resilience=ResilienceResource(
                        store_url="memory://dbt-postgres-assets",
                        policies={
                            "dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.1))
                        },
                    ),
                )
            },
            instance=dagster_instance,
        )
    finally:
        remove()

    assert result.success
    materialized = {
        event.asset_key.path[-1]: event.materialization.metadata
        for event in result.get_asset_materialization_events()
        if event.asset_key is not None
    }
    assert set(materialized) == {"raw_orders", "stg_orders"}
    assert materialized["stg_orders"]["flowstone/dbt.command/attempts"].value == 2
    assert materialized["raw_orders"]["flowstone/dbt.node/message"].value == "INSERT 5"
    assert warehouse_port.connections > 0


# -- permanent refusals: one attempt, said as such -----------------------------------------------


def _auth_failures(cluster: PostgresCluster, user: str) -> int:
    log = (cluster.data_dir.parent / "server.log").read_text(errors="replace")
    return log.count(f'password authentication failed for user "{user}"')


def test_a_wrong_password_is_tried_once_and_reported_as_such(
    project: Path,
    warehouse_port: Forwarder,
    postgres: PostgresCluster,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    warehouse_port.start()
    user = f"nobody_{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("FLOWSTONE_DBT_PG_USER", user)
    dbt = DbtResource(
        service="dbt",
        project_dir=str(project),
        target="postgres",
        resilience=ResilienceResource(
            store_url="memory://dbt-postgres-auth",
            dagster_errors=False,
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.05))},
        ),
    )
    with pytest.raises(DbtWarehouseRejected) as raised:
        dbt.run_model("stg_orders")
    assert raised.value.reason == "authentication"
    assert not is_retryable(raised.value)
    assert "password authentication failed" in str(raised.value)
    assert "not retried" in str(raised.value)
    assert _auth_failures(postgres, user) == 1  # one attempt: no account lock-out by retries


def test_a_missing_database_is_not_retried(
    project: Path, warehouse_port: Forwarder, monkeypatch: pytest.MonkeyPatch
) -> None:
    warehouse_port.start()
    monkeypatch.setenv("FLOWSTONE_DBT_PG_DATABASE", "no_such_database")
    dbt = DbtResource(project_dir=str(project), target="postgres")
    with pytest.raises(dg.Failure) as raised:
        dbt.run_model("stg_orders")
    assert raised.value.allow_retries is False
    error = raised.value.__cause__
    assert isinstance(error, DbtWarehouseRejected)
    assert error.reason == "missing object"
    assert 'database "no_such_database" does not exist' in str(error)


# -- a connection lost mid-run: only the failed node runs again --------------------------------

SMALL_PROJECT = Path(__file__).parent / "dbt_small_project"

#: A model whose first run loses its connection: the server terminates its backend (a real
#: "terminating connection due to administrator command"); a sequence, which no rollback
#: undoes, counts the runs.
TERMINATED_ONCE = """
{{ config(pre_hook="select case when nextval('flowstone_small.runs') = 1
                    then pg_terminate_backend(pg_backend_pid()) end") }}
select 1 as id
"""


def test_a_connection_lost_mid_run_reruns_only_the_failed_node(
    tmp_path: Path, warehouse_port: Forwarder, pg_database: PostgresCluster
) -> None:
    warehouse_port.start()
    project = shutil.copytree(
        SMALL_PROJECT, tmp_path / "small", ignore=shutil.ignore_patterns("target", "logs")
    )
    (project / "models" / "terminated_once.sql").write_text(TERMINATED_ONCE)
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("create schema flowstone_small; create sequence flowstone_small.runs")
    dbt = DbtResource(
        service="dbt",
        project_dir=str(project),
        target="postgres",
        threads=1,
        resilience=ResilienceResource(
            store_url="memory://dbt-postgres-mid-run",
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.1))},
        ),
    )
    result = dbt.build(exclude="lock_probe")

    assert result.success
    assert result.attempts == 2
    assert result.previous is not None
    first = {node.name: node.status for node in result.previous.nodes}
    assert first.pop("terminated_once") == "error"
    assert set(first.values()) == {"success"}
    # `dbt retry` ran the failed model alone; the result has every node once.
    retried = orjson.loads((result.target_path / "run_results.json").read_bytes())["results"]
    assert [r["unique_id"] for r in retried] == ["model.flowstone_small.terminated_once"]
    assert sorted(node.name for node in result.nodes) == sorted([*first, "terminated_once"])
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("select last_value from flowstone_small.runs")
        assert cursor.fetchone() == (2,)


@pytest.mark.dagster
def test_dbt_assets_rerun_only_the_node_whose_connection_was_lost(
    tmp_path: Path,
    warehouse_port: Forwarder,
    pg_database: PostgresCluster,
    dagster_instance: dg.DagsterInstance,
) -> None:
    """Inside @dbt_assets the retry is `dbt retry` too, in the same step: the nodes that
    succeeded are materialized once, the failed one after its second run."""
    warehouse_port.start()
    project = shutil.copytree(
        SMALL_PROJECT, tmp_path / "small", ignore=shutil.ignore_patterns("target", "logs")
    )
    (project / "models" / "terminated_once.sql").write_text(TERMINATED_ONCE)
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("create schema flowstone_small; create sequence flowstone_small.runs")
    dbt = DbtResource(
        service="dbt",
        project_dir=str(project),
        target="postgres",
        threads=1,
        resilience=ResilienceResource(
            store_url="memory://dbt-postgres-assets-mid-run",
            policies={"dbt": ServicePolicy(retry=RetryConfig(max_attempts=3, base_delay=0.1))},
        ),
    )
    manifest = dbt.invoke("parse").target_path / "manifest.json"

    @dbt_assets(manifest=manifest, exclude="lock_probe")
    def small(context: dg.AssetExecutionContext, dbt: DbtResource) -> Iterator[Any]:
        yield from dbt.stream(["build"], context=context)

    result = dg.materialize([small], resources={"dbt": dbt}, instance=dagster_instance)

    assert result.success
    attempts = [
        (event.asset_key.path[-1], event.materialization.metadata["flowstone/dbt.command/attempts"])
        for event in result.get_asset_materialization_events()
        if event.asset_key is not None
    ]
    by_name = {name: value.value for name, value in attempts}
    assert len(attempts) == len(by_name)  # each asset materialized once
    assert by_name == {
        "raw_items": 1,
        "items": 1,
        "item_totals": 1,
        "constants": 1,
        "terminated_once": 2,
    }
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("select last_value from flowstone_small.runs")
        assert cursor.fetchone() == (2,)
