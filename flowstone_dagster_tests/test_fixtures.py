"""The shared fixtures start real servers that answer."""

from __future__ import annotations

import smtplib
from email.message import EmailMessage

import dagster as dg
import psycopg2
import pytest

from flowstone_dagster_tests.support.postgres import PostgresCluster
from flowstone_dagster_tests.support.smtp import SmtpSink


@pytest.mark.postgres
def test_postgres_accepts_a_query(pg_database: PostgresCluster) -> None:
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("CREATE TABLE t (x int); INSERT INTO t VALUES (1), (2);")
        cursor.execute(
            "SELECT sum(x), current_database(), current_setting('server_version') FROM t"
        )
        total, database, version = cursor.fetchone()
    connection.close()
    assert total == 2 + 1
    assert database == pg_database.database
    assert version.startswith("15")


@pytest.mark.postgres
def test_postgres_requires_the_password(postgres: PostgresCluster) -> None:
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        psycopg2.connect(
            host=postgres.host, port=postgres.port, user=postgres.user, password="wrong"
        )


@pytest.mark.smtp
def test_smtp_server_receives_a_message(smtp_server: SmtpSink) -> None:
    message = EmailMessage()
    message["From"] = "flowstone@example.com"
    message["To"] = "data-team@example.com"
    message["Subject"] = "Materialization Failed"
    message.set_content("orders / 2025-01-15 failed")
    with smtplib.SMTP(smtp_server.host, smtp_server.port, timeout=10) as client:
        client.send_message(message)
    (received,) = smtp_server.wait_for(1)
    assert received.rcpt_tos == ["data-team@example.com"]
    assert received.message["Subject"] == "Materialization Failed"
    assert "2025-01-15" in received.message.get_content()


@pytest.mark.dagster
def test_ephemeral_dagster_instance_runs_a_job(dagster_instance: dg.DagsterInstance) -> None:
    @dg.asset
    def one() -> int:
        return 1

    result = dg.materialize([one], instance=dagster_instance)
    assert result.success
    assert dagster_instance.get_latest_materialization_event(dg.AssetKey("one")) is not None
