"""The adapter-message classifier, table-style, with messages as the adapters print them; the
selection parser; the dbt launcher (no dbt run: the quick tier)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flowstone_dagster.dbt.errors import classify_adapter_message, classify_failure
from flowstone_dagster.dbt.invocation import DbtSelection, first_useful_lines
from flowstone_dagster.dbt.process import dbt_launcher, installed_dbt_core_version

#: (adapter, message, kind)
MESSAGES = [
    # PostgreSQL / Redshift (libpq through psycopg2)
    (
        "postgres",
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  password '
        'authentication failed for user "dbt"',
        "authentication",
    ),
    (
        "postgres",
        'connection to server at "127.0.0.1", port 5432 failed: FATAL:  database "analytics" '
        "does not exist",
        "missing object",
    ),
    (
        "postgres",
        'connection to server at "10.0.0.5", port 5432 failed: FATAL:  no pg_hba.conf entry for '
        'host "10.0.0.9", user "dbt", database "analytics", no encryption',
        "authentication",
    ),
    ("postgres", "permission denied for schema analytics", "authorization"),
    (
        "postgres",
        'connection to server at "127.0.0.1", port 1 failed: Connection refused\n\tIs the '
        "server running on that host and accepting TCP/IP connections?",
        "unreachable",
    ),
    ("postgres", "SSL connection has been closed unexpectedly", "unreachable"),
    (
        "postgres",
        'could not translate host name "warehouse.internal" to address: Temporary failure in '
        "name resolution",
        "unreachable",
    ),
    ("postgres", "FATAL:  terminating connection due to administrator command", "unreachable"),
    ("postgres", "could not serialize access due to concurrent update", "transient"),
    (
        "postgres",
        "deadlock detected\nDETAIL:  Process 123 waits for ShareLock on transaction 456",
        "transient",
    ),
    ("postgres", 'column "no_such_column" does not exist', "other"),
    ("redshift", "1023 DETAIL: Serializable isolation violation on table - 12345", "transient"),
    # DuckDB
    (
        "duckdb",
        'IO Error: Could not set lock on file "/data/warehouse.duckdb": Conflicting lock is held '
        "in /usr/bin/python3 (PID 4242). See also https://duckdb.org/docs/connect/concurrency",
        "transient",
    ),
    ("duckdb", "Catalog Error: Table with name raw_orders does not exist!", "other"),
    ("duckdb", 'Binder Error: Referenced column "x" not found in FROM clause!', "other"),
    # Snowflake
    (
        "snowflake",
        "250001 (08001): Could not connect to Snowflake backend after 2 attempt(s).Aborting",
        "unreachable",
    ),
    (
        "snowflake",
        "250001 (08001): Failed to connect to DB: xy12345.snowflakecomputing.com:443. Incorrect "
        "username or password was specified.",
        "authentication",
    ),
    ("snowflake", "390144 (08004): JWT token is invalid.", "authentication"),
    (
        "snowflake",
        "002003 (02000): SQL compilation error:\nDatabase 'ANALYTICS' does not exist or not "
        "authorized.",
        "missing object",
    ),
    (
        "snowflake",
        "000625 (57014): Statement '01b2' has locked table 'ORDERS' in transaction 123 and this "
        "lock has not yet been released.",
        "transient",
    ),
    # BigQuery
    (
        "bigquery",
        "503 GET https://bigquery.googleapis.com/bigquery/v2/projects/p/queries/j: Service "
        "Unavailable",
        "unreachable",
    ),
    (
        "bigquery",
        "403 Exceeded rate limits: too many table update operations for this table. reason: "
        "rateLimitExceeded",
        "transient",
    ),
    (
        "bigquery",
        "403 Access Denied: Table p:d.t: User does not have permission to query table p:d.t",
        "authorization",
    ),
    (
        "bigquery",
        "404 Not found: Dataset p:analytics was not found in location US",
        "missing object",
    ),
    (
        "bigquery",
        "Request had invalid authentication credentials. Expected OAuth 2 access token",
        "authentication",
    ),
    # Databricks
    (
        "databricks",
        "TEMPORARILY_UNAVAILABLE: The service at /api/2.0/sql/statements is temporarily "
        "unavailable. Please try again later.",
        "unreachable",
    ),
    ("databricks", "Error during request to server: Invalid access token.", "authentication"),
    (
        "databricks",
        "[SCHEMA_NOT_FOUND] The schema `main`.`analytics` cannot be found.",
        "missing object",
    ),
    (
        "databricks",
        "[DELTA_CONCURRENT_APPEND] ConcurrentAppendException: Files were added to the root of "
        "the table by a concurrent update.",
        "transient",
    ),
    # Generic
    ("any", "[Errno -2] Name or service not known", "unreachable"),
    ("any", "line 429: syntax error at or near 'selct'", "other"),
]


@pytest.mark.parametrize(("adapter", "message", "kind"), MESSAGES)
def test_classify_adapter_message(adapter: str, message: str, kind: str) -> None:
    assert classify_adapter_message(message) == kind, adapter


def test_a_permanent_refusal_anywhere_decides_and_transient_needs_every_message() -> None:
    refused = 'connection to server at "h", port 1 failed: Connection refused'
    wrong_password = 'FATAL:  password authentication failed for user "dbt"'
    assert classify_failure([refused, refused]) == "unreachable"
    assert classify_failure([refused, "could not serialize access"]) == "unreachable"
    assert classify_failure(["could not serialize access"]) == "transient"
    assert classify_failure([refused, wrong_password]) == "authentication"
    assert classify_failure([refused, "Binder Error: no such column"]) == "other"
    assert classify_failure([]) == "other"


def test_first_useful_lines_drops_the_traceback() -> None:
    message = (
        "Runtime Error in model probe (models/probe.py)\n  Python model failed:\n"
        "  Traceback (most recent call last):\n"
        '    File "/venv/dbt/adapters/duckdb/environments/__init__.py", line 286, in run\n'
        "      df = module.model(dbt, con)\n           ^^^^^^^^^^^^\n"
        '    File "/tmp/model.py", line 13, in model\n      duckdb.connect(probe).close()\n'
        '  _duckdb.IOException: IO Error: Could not set lock on file "/x.duckdb"\n  '
    )
    assert first_useful_lines(message) == (
        "Runtime Error in model probe (models/probe.py)\nPython model failed:\n"
        '_duckdb.IOException: IO Error: Could not set lock on file "/x.duckdb"'
    )
    assert first_useful_lines("a\nb\nc\nd\ne", count=2) == "a\nb\n... (3 more lines)"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["build"], DbtSelection()),
        (["run", "--select", "a", "b+", "--exclude", "c"], DbtSelection(("a", "b+"), ("c",))),
        (["run", "-s", "tag:x", "--full-refresh"], DbtSelection(("tag:x",))),
        (["run", "--select=a b"], DbtSelection(("a", "b"))),
        (["test", "--selector", "nightly"], DbtSelection(selector=("nightly",))),
    ],
)
def test_selection_from_args(args: list[str], expected: DbtSelection) -> None:
    assert DbtSelection.from_args(args) == expected


def test_state_selections_may_be_empty() -> None:
    assert DbtSelection(("state:modified+",)).stateful
    assert DbtSelection(("result:error+",)).stateful
    assert not DbtSelection(("orders",)).stateful


def test_the_launcher_answers_version_itself_and_starts_dbt_in_its_own_session(
    tmp_path: Path,
) -> None:
    dbt = shutil.which("dbt") or str(Path(sys.executable).parent / "dbt")
    launcher = dbt_launcher(dbt)
    answered = subprocess.run(
        [launcher, "--version"], capture_output=True, text=True, check=True
    ).stdout
    # dbt's own answer also lists the latest release and the plugins (and asks PyPI).
    assert answered.split() == ["Core:", "-", "installed:", installed_dbt_core_version()]

    # Anything else runs the program under setsid: it leads its own session, same PID.
    fake = tmp_path / "fake-dbt"
    fake.write_text("#!/bin/sh\nawk '{print $1, $6}' /proc/$$/stat\n")
    fake.chmod(0o700)
    pid, session = subprocess.run(
        [dbt_launcher(str(fake)), "run"], capture_output=True, text=True, check=True
    ).stdout.split()
    assert pid == session
