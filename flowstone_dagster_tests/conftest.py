"""Fixtures every test module may use: real servers on loopback, started here and stopped here.

- ``httpserver`` (from pytest-httpserver): a plain HTTP server; ``https_server`` and
  ``ca_bundle``: an HTTPS server with a throwaway certificate, and the PEM of the CA that
  signed it (``untrusted_https_server`` is signed by a CA nobody trusts).
- ``postgres``: a PostgreSQL cluster for the whole session (``initdb`` as the ``postgres`` user,
  a free port on 127.0.0.1, password auth); ``pg_database`` a fresh database in it per test.
- ``redis_server``: a ``redis-server`` for the whole session (a free port on 127.0.0.1, no
  persistence); ``redis_url`` its URL with the database flushed per test.
- ``smtp_server``: an aiosmtpd server that keeps what it receives.
- ``events``: the telemetry events emitted during the test; ``store_url``: a resilience store
  URL of each kind (memory, SQLite, PostgreSQL, Redis).
- ``dagster_instance``: an ephemeral Dagster instance; ``dagster_home_instance`` a persistent one
  in a temporary ``DAGSTER_HOME`` (needed by the multiprocess executor).

The default resilience store of the whole session is a SQLite file in a temporary directory
(``$FLOWSTONE_RESILIENCE_STORE``), so that no test reads or leaves breaker state in the user's
own default store.
"""

from __future__ import annotations

import os
import ssl
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg

# hypothesis's pytest plugin imports (and pytest rewrites) these modules at the end of the
# session when no test module imported them; on CPython 3.11.7 that compile failed with
# "SystemError: AST constructor recursion depth mismatch" after the LLM tests ran (measured:
# test_llm.py then test_llm_dagster.py, never in the other order). Importing them first
# avoids the late compile.
import hypothesis.internal.reflection  # noqa: F401
import psycopg2
import pytest
import redis
import trustme
from psycopg2 import sql
from pytest_httpserver import HTTPServer

from flowstone_dagster import telemetry
from flowstone_dagster.resilience.stores import STORE_URL_ENV
from flowstone_dagster_tests.support.postgres import PostgresCluster
from flowstone_dagster_tests.support.redis import RedisServer
from flowstone_dagster_tests.support.smtp import SmtpSink

_SESSION_STORE_DIR = tempfile.mkdtemp(prefix="flowstone-test-store-")
os.environ.setdefault(STORE_URL_ENV, f"sqlite://{_SESSION_STORE_DIR}/resilience.sqlite3")


@pytest.fixture
def events() -> Iterator[list[telemetry.TelemetryEvent]]:
    """Every telemetry event emitted in this process while the test runs."""
    seen: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(seen.append)
    yield seen
    remove()


@pytest.fixture(
    params=[
        "memory",
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A resilience store URL of each kind (the test runs once per kind)."""
    if request.param == "memory":
        return f"memory://{uuid.uuid4().hex}"
    if request.param == "sqlite":
        return f"sqlite://{tmp_path / 'resilience.sqlite3'}"
    if request.param == "redis":
        return str(request.getfixturevalue("redis_url"))
    cluster: PostgresCluster = request.getfixturevalue("postgres")
    return cluster.url


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A throwaway ``redis-server`` on loopback, started once for the session."""
    with RedisServer.start() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session's Redis server, its database emptied before the test."""
    if redis_server.process is None:  # a test stopped it and failed before restarting it
        redis_server.restart()
    flush = redis.Redis.from_url(redis_server.url)
    try:
        flush.flushall()
    finally:
        flush.close()
    return redis_server.url


@pytest.fixture(scope="session")
def tls_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="session")
def ca_bundle(tls_ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Path to the PEM of the CA that signed ``https_server``'s certificate."""
    path = tmp_path_factory.mktemp("tls") / "ca.pem"
    tls_ca.cert_pem.write_to_path(str(path))
    return str(path)


def _start_https(ca: trustme.CA) -> HTTPServer:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(context)
    server = HTTPServer(host="localhost", ssl_context=context)
    server.start()
    return server


@pytest.fixture(scope="session")
def _https_server_session(tls_ca: trustme.CA) -> Iterator[HTTPServer]:
    server = _start_https(tls_ca)
    yield server
    server.stop()


@pytest.fixture
def https_server(_https_server_session: HTTPServer) -> Iterator[HTTPServer]:
    """An HTTPS server on localhost whose certificate ``ca_bundle`` trusts."""
    yield _https_server_session
    _https_server_session.clear()


@pytest.fixture
def untrusted_https_server() -> Iterator[HTTPServer]:
    """An HTTPS server whose certificate is signed by a CA that nothing trusts."""
    server = _start_https(trustme.CA())
    yield server
    server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster, started once for the session."""
    with PostgresCluster.start() as cluster:
        yield cluster


@pytest.fixture
def pg_database(postgres: PostgresCluster) -> Iterator[PostgresCluster]:
    """A fresh, empty database in the session's cluster, dropped after the test."""
    name = f"t_{uuid.uuid4().hex[:12]}"
    admin = psycopg2.connect(postgres.dsn)
    admin.autocommit = True
    with admin.cursor() as cursor:
        cursor.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    try:
        yield PostgresCluster(
            postgres.host, postgres.port, postgres.user, postgres.password, name, postgres.data_dir
        )
    finally:
        with admin.cursor() as cursor:
            cursor.execute(
                sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name))
            )
        admin.close()


@pytest.fixture
def smtp_server() -> Iterator[SmtpSink]:
    """A real SMTP server on 127.0.0.1 that keeps every message it receives."""
    with SmtpSink.start() as sink:
        yield sink


@pytest.fixture
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    """An ephemeral, in-memory Dagster instance."""
    with dg.DagsterInstance.ephemeral() as instance:
        yield instance


@pytest.fixture
def dagster_home_instance(tmp_path: Path) -> Iterator[dg.DagsterInstance]:
    """A persistent Dagster instance in a temporary DAGSTER_HOME (for multiprocess runs)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    with dg.DagsterInstance.local_temp(str(home)) as instance:
        yield instance
