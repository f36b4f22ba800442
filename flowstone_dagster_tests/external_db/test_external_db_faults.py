"""ExternalDB when PostgreSQL fails: refused and dropped connections, a server restart, and a
password that must never show."""

import logging
import os
import subprocess
import threading
from collections.abc import Iterator

import psycopg2
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import MaxAttemptsExceeded, TransportError, is_retryable
from flowstone_dagster.external_db import ExternalDB
from flowstone_dagster.external_db.errors import DatabaseError
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.postgres import PostgresCluster, postgres_bindir

pytestmark = pytest.mark.postgres

SECRET = "pw-5ecr3t-value-9876"


def resilience(name: str, attempts: int = 3) -> ResilienceResource:
    # Every service: the default one names the database server (db:postgresql://host:port/db).
    return ResilienceResource(
        store_url=f"memory://{name}",
        default_policy=ServicePolicy(
            retry=RetryConfig(max_attempts=attempts, base_delay=0.05, jitter=0),
            circuit_breaker=None,
        ),
    )


def connect(pg: PostgresCluster, **options: object) -> ExternalDB:
    return ExternalDB.postgres(
        host=pg.host,
        port=pg.port,
        database=pg.database,
        user=pg.user,
        password=pg.password,
        **options,  # type: ignore[arg-type]
    )


def events_of(name: str) -> tuple[list[telemetry.TelemetryEvent], object]:
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(lambda e: events.append(e) if e.name == name else None)
    return events, remove


def test_connection_refused_is_retryable_and_retried_through_resilience() -> None:
    port = free_port()
    plain = ExternalDB.postgres(
        host="127.0.0.1", port=port, database="x", user="u", password=SECRET
    )
    with pytest.raises(TransportError) as raised:
        plain.load_table("t")
    assert is_retryable(raised.value)
    assert f"127.0.0.1:{port}" in str(raised.value)

    events, remove = events_of("flowstone.db.load")
    try:
        retried = ExternalDB.postgres(
            host="127.0.0.1",
            port=port,
            database="x",
            user="u",
            password=SECRET,
            resilience=resilience("refused"),
        )
        with pytest.raises(MaxAttemptsExceeded) as exhausted:
            retried.load_table("t")
    finally:
        remove()  # type: ignore[operator]
    assert isinstance(exhausted.value.last_error, TransportError)
    assert exhausted.value.attempts == 3
    assert [e.attempts for e in events] == [3]
    assert SECRET not in str(exhausted.value) + repr(retried)


def test_a_connection_dropped_inside_a_store_is_retried_on_a_new_connection(
    pg_database: PostgresCluster,
) -> None:
    db = connect(pg_database, resilience=resilience("dropped"))
    db.store_table("orders", [{"id": 1}])
    admin = psycopg2.connect(pg_database.dsn)
    admin.autocommit = True
    blocker = psycopg2.connect(pg_database.dsn)
    cursor = blocker.cursor()
    cursor.execute("LOCK TABLE orders IN ACCESS EXCLUSIVE MODE")  # the store will wait on it
    outcome: list[object] = []
    events, remove = events_of("flowstone.db.store")
    worker = threading.Thread(
        target=lambda: outcome.append(_try(lambda: db.store_table("orders", [{"id": 2}])))
    )
    worker.start()
    try:
        with admin.cursor() as query:
            backend = None
            for _ in range(500):  # until the store is waiting for the lock
                query.execute(
                    "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                    "AND datname = current_database() AND pid <> pg_backend_pid()"
                )
                row = query.fetchone()
                if row:
                    backend = row[0]
                    break
                query.execute("SELECT pg_sleep(0.02)")
            assert backend is not None
            query.execute("SELECT pg_terminate_backend(%s)", (backend,))
        blocker.rollback()  # release the lock: the retry goes through
        worker.join(30)
    finally:
        remove()  # type: ignore[operator]
        blocker.close()
        admin.close()
    assert outcome == [None]
    assert [e.attempts for e in events] == [2]
    assert db.load_table("orders") == [{"id": 2}]
    db.close()


def _try(call: object) -> object:
    try:
        call()  # type: ignore[operator]
    except Exception as exc:
        return exc
    return None


def _pg_ctl(cluster: PostgresCluster, *args: str) -> None:
    command = [str(postgres_bindir() / "pg_ctl"), "-D", str(cluster.data_dir), *args]
    if os.geteuid() == 0:
        command = ["runuser", "-u", "postgres", "--", *command]
    subprocess.run(command, check=True, capture_output=True, timeout=120)


@pytest.fixture
def own_cluster() -> Iterator[PostgresCluster]:
    """A cluster of its own, since this test restarts it."""
    with PostgresCluster.start() as cluster:
        yield cluster


def test_a_server_restart_between_two_stores(own_cluster: PostgresCluster) -> None:
    db = connect(own_cluster)
    db.store_table("orders", [{"id": 1}], partition={"day": "2025-01-14"})
    log = own_cluster.data_dir.parent / "server.log"
    _pg_ctl(own_cluster, "-l", str(log), "-m", "fast", "-w", "restart")

    events, remove = events_of("flowstone.db.store")
    try:
        db.store_table("orders", [{"id": 2}], partition={"day": "2025-01-15"})
    finally:
        remove()  # type: ignore[operator]
    assert [(e.ok, e.attempts) for e in events] == [(True, 1)]
    assert db.load_table("orders") == [
        {"id": 1, "day": "2025-01-14"},
        {"id": 2, "day": "2025-01-15"},
    ]

    _pg_ctl(own_cluster, "-m", "fast", "-w", "stop")  # down: a retryable TransportError
    with pytest.raises(TransportError):
        db.load_table("orders")
    base = own_cluster.data_dir.parent
    options = f"-p {own_cluster.port} -k {base} -h 127.0.0.1 -c fsync=off"
    _pg_ctl(own_cluster, "-o", options, "-l", str(log), "-w", "start")
    assert len(db.load_table("orders")) == 2  # and back, on a new connection
    db.close()


def test_the_password_shows_nowhere(
    pg_database: PostgresCluster, caplog: pytest.LogCaptureFixture
) -> None:
    db = ExternalDB.postgres(
        host=pg_database.host,
        port=pg_database.port,
        database=pg_database.database,
        user=pg_database.user,
        password=SECRET,
    )
    with caplog.at_level(logging.DEBUG), pytest.raises(DatabaseError) as raised:
        db.load_table("anything")
    assert raised.value.sqlstate == "28P01"
    assert not is_retryable(raised.value)
    assert "check `user` and the password" in str(raised.value)
    assert raised.value.__cause__ is None
    visible = "\n".join([str(raised.value), repr(raised.value), repr(db), caplog.text])
    assert SECRET not in visible
