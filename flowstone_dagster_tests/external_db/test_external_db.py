"""ExternalDB against a real PostgreSQL cluster and a real SQLite file: custom SQL per partition,
types, injection, size, atomicity, idempotency, schema checks, timeouts, configuration and
telemetry."""

import datetime as dt
import decimal
import logging
import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import psycopg2
import pytest
from pydantic import ValidationError

from flowstone_dagster import telemetry
from flowstone_dagster.errors import CallTimeout, TransportError, is_retryable
from flowstone_dagster.external_db import ExternalDB, PostgresConfig, SQLiteConfig
from flowstone_dagster.external_db.errors import (
    ConstraintViolation,
    DatabaseError,
    InvalidValue,
    SchemaMismatch,
)
from flowstone_dagster_tests.support.postgres import PostgresCluster

DAY = dt.date(2025, 1, 15)


class Target:
    """One database under test, with a raw connection for checks behind ExternalDB's back."""

    def __init__(self, name: str, db: ExternalDB, raw: Callable[[], Any]) -> None:
        self.name = name
        self.db = db
        self.raw = raw
        self.mark = "%s" if name == "postgres" else "?"

    def sql(self, statement: str, params: Any = ()) -> list[tuple[Any, ...]]:
        connection = self.raw()
        try:
            cursor = connection.cursor()
            cursor.execute(statement.replace("?", self.mark), params)
            rows = cursor.fetchall() if cursor.description else []
            connection.commit()
            return rows
        finally:
            connection.close()

    def count(self, table: str) -> int:
        return int(self.sql(f'SELECT count(*) FROM "{table}"')[0][0])


@pytest.fixture(params=[pytest.param("postgres", marks=pytest.mark.postgres), "sqlite"])
def target(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Target]:
    if request.param == "postgres":
        pg: PostgresCluster = request.getfixturevalue("pg_database")
        db = ExternalDB.postgres(
            host=pg.host, port=pg.port, database=pg.database, user=pg.user, password=pg.password
        )
        raw: Callable[[], Any] = lambda: psycopg2.connect(pg.dsn)  # noqa: E731
    else:
        path = tmp_path / "external.sqlite3"
        db = ExternalDB.sqlite(path)
        raw = lambda: sqlite3.connect(path)  # noqa: E731
    with db:
        yield Target(request.param, db, raw)


# -- custom SQL per partition --------------------------------------------------------------------


def test_loads_data_from_external_database(target: Target) -> None:
    target.sql("CREATE TABLE users (name text, date date)")
    target.sql(
        "INSERT INTO users VALUES (?, ?), (?, ?)", ("Ann", "2025-01-15", "Old", "2025-01-14")
    )
    mark = target.mark

    result = target.db.load(
        lambda partition: (f"SELECT * FROM users WHERE date = {mark}", [partition.isoformat()]),
        partition=DAY,
    )

    assert isinstance(result, list)
    assert [row["name"] for row in result] == ["Ann"]


def test_stores_data_to_external_database(target: Target) -> None:
    target.sql("CREATE TABLE users (name text, date text)")
    data = [{"name": "Alice"}, {"name": "Bob"}]

    stored = target.db.store(
        data,
        f"INSERT INTO users (name, date) VALUES ({target.mark}, {target.mark})",
        lambda row, partition: [row["name"], partition.isoformat()],
        partition=DAY,
    )

    assert stored == 2
    assert sorted(target.sql("SELECT name, date FROM users")) == [
        ("Alice", "2025-01-15"),
        ("Bob", "2025-01-15"),
    ]


def test_custom_store_is_one_transaction_and_delete_query_makes_it_idempotent(
    target: Target,
) -> None:
    target.sql("CREATE TABLE users (name text PRIMARY KEY, date text)")
    mark = target.mark
    insert = f"INSERT INTO users (name, date) VALUES ({mark}, {mark})"

    def delete(day: dt.date) -> tuple[str, list[str]]:
        return f"DELETE FROM users WHERE date = {mark}", [day.isoformat()]

    def params(row: dict, day: dt.date) -> list[str]:
        return [row["name"], day.isoformat()]

    for _ in range(2):  # a re-run replaces, never duplicates
        target.db.store(
            [{"name": "a"}, {"name": "b"}], insert, params, partition=DAY, delete_query=delete
        )
    assert target.count("users") == 2
    with pytest.raises(ConstraintViolation):  # "c" twice: the whole batch is rolled back
        target.db.store(
            [{"name": "c"}, {"name": "c"}], insert, params, partition=DAY, delete_query=delete
        )
    assert sorted(target.sql("SELECT name FROM users")) == [("a",), ("b",)]


# -- types ---------------------------------------------------------------------------------------

ROUND_TRIP: list[tuple[str, Any]] = [
    ("small_int", -7),
    ("big_int", 2**62 + 1),
    ("float", 0.1),
    ("huge_float", -1.5e300),
    ("numeric", decimal.Decimal("12345678901234567890.123456789012")),
    ("text", "tab\there\nnewline \\backslash 'quote' \"dq\" \u00e9\u4e2d\U0001f600"),
    ("empty_text", ""),
    ("bool", True),
    ("date", dt.date(2025, 1, 15)),
    ("timestamp", dt.datetime(2025, 1, 15, 13, 1, 2, 345678)),
    ("timestamptz", dt.datetime(2025, 1, 15, 13, 0, tzinfo=dt.timezone(dt.timedelta(hours=5)))),
    ("time", dt.time(23, 59, 58, 1)),
    ("json", {"a": [1, 2.5, None, {"b": "c\td"}], "u": "\u00e9"}),
    ("bytes", b"\x00\\\x01\xff\t\n"),
    ("uuid", uuid.UUID("12345678-1234-5678-1234-567812345678")),
]


def test_round_trip_of_common_types_and_null(target: Target) -> None:
    row = dict(ROUND_TRIP)
    nulls = dict.fromkeys(row)
    result = target.db.store_table("kinds", [row, nulls])
    assert result.created
    loaded = target.db.load_table("kinds")
    assert loaded[1] == nulls
    for name, value in ROUND_TRIP:
        assert loaded[0][name] == value, name
        assert type(loaded[0][name]) is type(value), name
    # numeric stays exact, not a float
    assert str(loaded[0]["numeric"]) == "12345678901234567890.123456789012"
    # the same through a DataFrame
    frame = target.db.load_table("kinds", as_dataframe=True)
    assert list(frame.columns) == [name for name, _ in ROUND_TRIP]
    assert frame["big_int"][0] == 2**62 + 1


def test_dataframe_store_maps_dtypes_and_missing_values(target: Target) -> None:
    frame = pd.DataFrame(
        {
            "id": [1, 2, 3],
            "score": [0.5, float("nan"), 2.0],
            "when": pd.to_datetime(["2025-01-15 10:00", None, "2025-01-16 00:00"]),
            "label": ["a", None, "c"],
        }
    )
    target.db.store_table("frame", frame)
    rows = target.db.load_table("frame")
    assert rows[1] == {"id": 2, "score": None, "when": None, "label": None}
    assert rows[0] == {"id": 1, "score": 0.5, "when": dt.datetime(2025, 1, 15, 10), "label": "a"}


# -- injection -----------------------------------------------------------------------------------

EVIL = "x'); DROP TABLE victims; --"


def test_sql_injection_through_values_tables_columns_and_partition_keys(target: Target) -> None:
    target.sql("CREATE TABLE victims (id integer)")
    evil_table = 'users"; DROP TABLE victims; --'
    evil_column = 'name" text); DROP TABLE victims; --'
    rows = [{evil_column: EVIL, "region": EVIL}]

    target.db.store_table(evil_table, rows, partition={"region": EVIL})
    target.db.store_table(evil_table, [{evil_column: "ok"}], partition={"region": "eu"})

    assert target.db.load_table(evil_table, partition={"region": EVIL}) == rows
    assert len(target.db.load_table(evil_table)) == 2
    assert target.sql("SELECT count(*) FROM victims") == [(0,)]  # still there
    with pytest.raises(DatabaseError):  # a partition column that is SQL is just a bad name
        target.db.load_table(evil_table, partition={"region = region OR 1=1 --": "eu"})
    assert target.sql("SELECT count(*) FROM victims") == [(0,)]


# -- size, atomicity, idempotency ----------------------------------------------------------------


def _rows(n: int) -> list[dict[str, Any]]:
    start = dt.date(2024, 1, 1)
    return [
        {
            "id": i,
            "name": f"name-{i}\t{i % 7}",
            "score": i / 3,
            "day": start + dt.timedelta(i % 365),
        }
        for i in range(n)
    ]


def test_100_000_rows_round_trip(target: Target) -> None:
    rows = _rows(100_000)
    result = target.db.store_table("big", rows)
    assert result.rows == 100_000
    assert result.bytes > 100_000 * 8
    assert target.db.load_table("big") == rows


def test_a_constraint_violation_at_row_50001_leaves_the_table_unchanged(target: Target) -> None:
    target.sql(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, name text, score double precision, day date)"
    )
    before = _rows(10)
    target.db.store_table("accounts", before)
    rows = _rows(100_000)
    rows[50_000] = {**rows[50_000], "id": 3}  # duplicates row 4's key

    with pytest.raises(ConstraintViolation) as raised:
        target.db.store_table("accounts", rows)

    assert not is_retryable(raised.value)
    if target.name == "postgres":
        assert raised.value.row == 50_001
        assert raised.value.constraint == "accounts_pkey"
        assert "name-" not in str(raised.value)  # the row's data is not echoed
    assert target.db.load_table("accounts") == before


def test_rerunning_a_partition_leaves_one_copy(target: Target) -> None:
    for day in (DAY, DAY + dt.timedelta(1), DAY):
        target.db.store_table("daily", [{"v": 1}, {"v": 2}], partition={"day": day})
    assert target.count("daily") == 4
    assert target.db.load_table("daily", partition={"day": DAY}) == [
        {"v": 1, "day": DAY},
        {"v": 2, "day": DAY},
    ]


def test_unpartitioned_replace_and_append(target: Target) -> None:
    target.db.store_table("log", [{"n": 1}])
    target.db.store_table("log", [{"n": 2}])
    assert target.db.load_table("log") == [{"n": 2}]
    target.db.store_table("log", [{"n": 3}], mode="append")
    assert target.db.load_table("log") == [{"n": 2}, {"n": 3}]


# -- bad input loses nothing ---------------------------------------------------------------------


def test_schema_mismatch_is_clear_and_writes_nothing(target: Target) -> None:
    target.db.store_table("typed", [{"id": 1, "name": "a"}])
    with pytest.raises(SchemaMismatch) as raised:
        target.db.store_table("typed", [{"id": "one", "name": "b"}])
    assert raised.value.column == "id"
    assert "holds text values" in str(raised.value)
    with pytest.raises(SchemaMismatch, match="has no column 'extra'"):
        target.db.store_table("typed", [{"id": 2, "name": "b", "extra": 1}])
    assert target.db.load_table("typed") == [{"id": 1, "name": "a"}]


@pytest.mark.parametrize(
    ("rows", "error", "message"),
    [
        ([{"a": 1}, {"a": "x"}], TypeError, "column 'a' mixes integer values (row 1) and text"),
        ([{"a": object()}], TypeError, "column 'a', row 1: object values cannot be stored"),
        ([{"a": 1}, ["not", "a", "dict"]], TypeError, "row 2 is a list"),
        ({"a": 1}, TypeError, "not dict"),
        ([{"a": 1, "day": DAY + dt.timedelta(1)}], ValueError, "row 1 (day=2025-01-16) is outside"),
    ],
)
def test_bad_rows_are_refused_before_anything_is_written(
    target: Target, rows: Any, error: type[Exception], message: str
) -> None:
    target.db.store_table("kept", [{"a": 7}], partition={"day": DAY})
    with pytest.raises(error) as raised:
        target.db.store_table("kept", rows, partition={"day": DAY})
    assert message in str(raised.value)
    assert target.db.load_table("kept") == [{"a": 7, "day": DAY}]


def test_missing_table_names_the_sqlstate(target: Target) -> None:
    with pytest.raises(DatabaseError) as raised:
        target.db.load_table("never_written")
    assert raised.value.sqlstate == "42P01"
    assert not is_retryable(raised.value)


@pytest.mark.parametrize(
    ("build", "field"),
    [
        (lambda path: ExternalDB.sqlite(path, busy_timeout=0), "busy_timeout"),
        (lambda path: ExternalDB.sqlite(path, statement_timeout=-1), "statement_timeout"),
        (lambda path: ExternalDB.postgres(database="", user="etl"), "database"),
        (lambda path: ExternalDB.postgres(database="d", user="u", port=70000), "port"),
        (lambda path: ExternalDB.postgres(database="d", user="u", sslmode="on"), "sslmode"),  # type: ignore[arg-type]
    ],
)
def test_bad_settings_are_refused_naming_the_field(
    tmp_path: Path, build: Callable[[Path], ExternalDB], field: str
) -> None:
    with pytest.raises(ValidationError, match=field):
        build(tmp_path / "x.sqlite3")


def test_constructors_take_the_config_classes(tmp_path: Path) -> None:
    config = SQLiteConfig(path=str(tmp_path / "x.sqlite3"), busy_timeout=2)
    with ExternalDB.from_config(config, statement_timeout=None) as db:
        assert db.statement_timeout is None
        assert db.adapter.busy_timeout == 2  # type: ignore[union-attr]
    secret = PostgresConfig(database="d", user="u", password="hunter2")
    assert "hunter2" not in repr(secret)
    assert "hunter2" not in repr(ExternalDB.from_config(secret))


# -- timeouts ------------------------------------------------------------------------------------


def test_statement_timeout_becomes_call_timeout(target: Target, tmp_path: Path) -> None:
    slow = (
        "SELECT pg_sleep(30)"
        if target.name == "postgres"
        else "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n) "
        "SELECT count(*) FROM n"
    )
    target.db.statement_timeout = 0.3
    with pytest.raises(CallTimeout) as raised:
        target.db.load(slow)
    assert raised.value.timeout == pytest.approx(0.3)
    assert is_retryable(raised.value)
    target.db.statement_timeout = 30
    assert target.db.load("SELECT 1 AS one") == [{"one": 1}]  # the connection still works


@pytest.mark.postgres
def test_a_store_blocked_past_its_timeout_leaves_the_table_unchanged(
    pg_database: PostgresCluster,
) -> None:
    db = ExternalDB.postgres(
        host=pg_database.host,
        port=pg_database.port,
        database=pg_database.database,
        user=pg_database.user,
        password=pg_database.password,
        statement_timeout=0.5,
    )
    db.store_table("locked", [{"n": 1}])
    blocker = psycopg2.connect(pg_database.dsn)
    try:
        blocker.cursor().execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
        with pytest.raises(CallTimeout):
            db.store_table("locked", [{"n": 2}])
    finally:
        blocker.rollback()
        blocker.close()
    assert db.load_table("locked") == [{"n": 1}]
    db.close()


# -- telemetry -----------------------------------------------------------------------------------


def test_load_and_store_emit_one_event_each_with_measures(target: Target) -> None:
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        target.db.store_table("measured", [{"name": "abc"}, {"name": "de"}])
        target.db.load_table("measured")
    finally:
        remove()
    store, load = (e for e in events if e.name.startswith("flowstone.db."))
    table = "public.measured" if target.name == "postgres" else "measured"
    assert store.name == "flowstone.db.store"
    assert load.name == "flowstone.db.load"
    for event in (store, load):
        assert event.ok
        assert event.attempts == 1
        assert event.measures["adapter"] == target.name
        assert event.measures["service"] == target.db.service
        assert event.measures["table"] == table
        assert event.measures["rows"] == 2
    assert load.measures["bytes"] == 5  # "abc" + "de"
    assert store.measures["bytes"] >= 5


def test_default_service_names_the_database_server(tmp_path: Path) -> None:
    postgres = ExternalDB.postgres(
        host="db.internal", port=6543, database="analytics", user="etl", password="pw-secret"
    )
    assert postgres.service == "db:postgresql://db.internal:6543/analytics"  # no user, password
    sqlite = ExternalDB.sqlite(tmp_path / "warehouse.sqlite3")
    assert sqlite.service == f"db:sqlite:{tmp_path / 'warehouse.sqlite3'}"
    named = ExternalDB.sqlite(tmp_path / "warehouse.sqlite3", service="warehouse")
    assert named.service == "warehouse"


# -- values that must fail clearly, or round-trip unchanged --------------------------------------


@pytest.mark.parametrize(
    ("good", "bad", "reason"),
    [
        pytest.param("ok", "a\x00b", "NUL", id="nul-in-text"),
        pytest.param({"x": 1}, {"x": float("nan")}, "NaN", id="nan-in-json"),
        pytest.param("ok", "lone \ud800 surrogate", "surrogate", id="lone-surrogate"),
        pytest.param(5, 2**64, "out of range", id="int-beyond-64-bits"),
    ],
)
def test_a_bad_value_is_a_data_error_naming_column_and_row(
    target: Target, good: Any, bad: Any, reason: str
) -> None:
    target.db.store_table("kept", [{"v": 7, "w": good}])
    rows: list[dict[str, Any]] = [{"v": 1, "w": good}] * 25_000 + [{"v": 2, "w": bad}]
    if target.name == "sqlite" and bad == "a\x00b":  # SQLite text holds NUL
        target.db.store_table("kept", rows)
        assert target.db.load_table("kept")[-1] == {"v": 2, "w": bad}
        return
    with pytest.raises(InvalidValue) as raised:
        target.db.store_table("kept", rows)
    error = raised.value
    assert (error.column, error.row) == ("w", 25_001)
    assert reason in str(error)
    assert not is_retryable(error)
    assert target.db.load_table("kept") == [{"v": 7, "w": good}]


def test_percent_and_other_characters_in_identifiers(target: Target) -> None:
    table, column = "100% of % sales", "share %s %(x)s"
    selection = {"day %": DAY}
    target.db.store_table(table, [{column: 1}], partition=selection)
    target.db.store_table(table, [{column: 2}], partition=selection)
    assert target.db.load_table(table, partition=selection) == [{column: 2, "day %": DAY}]
    target.db.store_table(table, [{column: 3, "day %": DAY}])  # replace all, no WHERE
    assert target.db.load_table(table) == [{column: 3, "day %": DAY}]


def test_nullable_integers_stay_integers_in_dataframes(target: Target) -> None:
    big = 2**53 + 1
    frame = pd.DataFrame({"n": pd.array([big, None], dtype="Int64")})
    target.db.store_table("nullable", frame)
    loaded = target.db.load_table("nullable", as_dataframe=True)
    assert str(loaded["n"].dtype) == "Int64"
    assert loaded["n"].tolist()[0] == big
    assert loaded["n"].isna().tolist() == [False, True]


def test_a_float_column_of_whole_numbers_fits_an_integer_column(target: Target) -> None:
    target.db.store_table("counts", pd.DataFrame({"n": [1, 2]}))  # bigint / INTEGER
    frame = pd.DataFrame({"n": [3, None]})  # pandas makes this float64 with NaN
    target.db.store_table("counts", frame)
    assert [row["n"] for row in target.db.load_table("counts")] == [3, None]
    with pytest.raises(SchemaMismatch, match=r"1\.5"):
        target.db.store_table("counts", pd.DataFrame({"n": [1.5]}))


def test_sqlite_readers_are_not_blocked_by_a_writer(tmp_path: Path) -> None:
    """WAL mode: a writer holding the database's exclusive lock (as a store does while it
    commits) leaves readers reading the last committed rows."""
    path = tmp_path / "wal.sqlite3"
    with ExternalDB.sqlite(path, busy_timeout=1) as db:
        db.store_table("t", [{"a": 1}])
        writer = sqlite3.connect(path, isolation_level=None)
        try:
            writer.execute("BEGIN EXCLUSIVE")
            writer.execute('INSERT INTO "t" VALUES (2)')
            assert db.load_table("t") == [{"a": 1}]
        finally:
            writer.execute("ROLLBACK")
            writer.close()
    with sqlite3.connect(path) as check:
        assert check.execute("PRAGMA journal_mode").fetchone() == ("wal",)


# -- TLS -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "sslmode", "sslrootcert", "resolved"),
    [
        ("db.internal", "auto", None, "require"),
        ("10.0.0.5", "auto", None, "require"),
        ("db.internal", "auto", "/etc/ssl/our-ca.pem", "verify-full"),
        ("localhost", "auto", None, "prefer"),
        ("127.0.0.1", "auto", None, "prefer"),
        ("::1", "auto", None, "prefer"),
        ("/var/run/postgresql", "auto", None, "prefer"),
        ("db.internal", "prefer", None, "prefer"),  # the documented opt-down
        ("db.internal", "verify-ca", "/etc/ssl/our-ca.pem", "verify-ca"),
    ],
)
def test_sslmode_defaults_to_an_encrypted_connection_off_this_machine(
    host: str, sslmode: Any, sslrootcert: str | None, resolved: str
) -> None:
    config = PostgresConfig(
        host=host, database="d", user="u", sslmode=sslmode, sslrootcert=sslrootcert
    )
    assert config.adapter().sslmode == resolved


def test_unverified_tls_logs_one_warning_per_server(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="flowstone_dagster.external_db.adapters"):
        for _ in range(2):
            PostgresConfig(host="warn-once.internal", database="d", user="u").adapter()
        PostgresConfig(
            host="verified.internal", database="d", user="u", sslrootcert="/etc/ca.pem"
        ).adapter()
        PostgresConfig(host="127.0.0.1", database="d", user="u").adapter()
    messages = [r.getMessage() for r in caplog.records]
    assert len(messages) == 1
    assert "warn-once.internal:5432" in messages[0]
    assert "verification is off (sslmode=require)" in messages[0]


@pytest.mark.postgres
def test_required_tls_against_a_server_without_it_fails_clearly(
    pg_database: PostgresCluster,
) -> None:
    """The test cluster has no TLS: sslmode=require refuses to fall back to plain text."""
    with (
        ExternalDB.postgres(
            host=pg_database.host,
            port=pg_database.port,
            database=pg_database.database,
            user=pg_database.user,
            password=pg_database.password,
            sslmode="require",
        ) as db,
        pytest.raises(TransportError, match="SSL") as raised,
    ):
        db.load("SELECT 1")
    assert pg_database.password not in str(raised.value)


@pytest.mark.postgres
def test_dataframes_load_through_copy_as_they_load_row_by_row(pg_database: PostgresCluster) -> None:
    """A DataFrame load reads COPY's output with pandas; it must give the same frame as the
    row-by-row load (used when a column has a type COPY does not load, here jsonb)."""
    texts = ["plain", "tab\tnew\nline", 'quote " comma , back \\ slash', "", None, "\\N", "é✓"]
    n = len(texts)
    frame = pd.DataFrame(
        {
            "i": list(range(n)),
            "i_null": pd.array([1, None, 3, None, 2**53 + 1, 6, 7], dtype="Int64"),
            "f": [0.1, float("nan"), 1e300, -0.0, 2.5, 3.0, 1 / 3],
            "t": texts,
            "b": [True, False, None, True, False, True, False],
            "ts": pd.to_datetime(["2025-01-15 10:00:00.123456"] * (n - 1) + [None]),
            "tz": pd.to_datetime(["2025-01-15T10:00:00+01:00"] * n, utc=True),
            "j": [{"k": i} for i in range(n)],
        }
    )
    with ExternalDB.postgres(
        host=pg_database.host,
        port=pg_database.port,
        database=pg_database.database,
        user=pg_database.user,
        password=pg_database.password,
    ) as db:
        db.store_table("copied", frame)
        names = ["i", "i_null", "f", "t", "b", "ts", "tz"]
        copied = db.load_table("copied", columns=names, as_dataframe=True)
        row_by_row = db.load_table("copied", columns=[*names, "j"], as_dataframe=True)
    pd.testing.assert_frame_equal(copied, row_by_row[names])
    assert copied["t"].tolist()[:4] == texts[:4]
    assert copied["t"].isna().tolist() == [False, False, False, False, True, False, False]
    assert copied["i_null"].tolist()[4] == 2**53 + 1


def test_timestamps_with_nanoseconds_are_refused_not_rounded(target: Target) -> None:
    at = pd.to_datetime(["2025-01-15 10:00:00.000001", "2025-01-15 10:00:00.000001001"])
    with pytest.raises(InvalidValue) as raised:
        target.db.store_table("precise", pd.DataFrame({"at": at}))
    assert (raised.value.column, raised.value.row) == ("at", 2)
    assert "nanoseconds" in str(raised.value)
    target.db.store_table("precise", pd.DataFrame({"at": at.floor("us")}))
    assert len(target.db.load_table("precise")) == 2


def test_sqlite_dataframes_load_a_column_at_a_time_as_row_by_row(tmp_path: Path) -> None:
    """The DataFrame load builds each column at once (timestamps parsed by pandas); it must give
    the frame the rows give (the list-of-dicts load, made a frame by the same rules)."""
    from flowstone_dagster.external_db.client import _shape_rows

    n = 5
    frame = pd.DataFrame(
        {
            "i": list(range(n)),
            "i_null": pd.array([1, None, 3, None, 2**53 + 1], dtype="Int64"),
            "f": [0.1, float("nan"), 1e300, -0.0, 2.5],
            "t": ["plain", "tab\tnew\nline", "", None, "é✓"],
            "b": [True, False, None, True, False],
            "ts": pd.to_datetime(["2025-01-15 10:00:00.123456"] * (n - 1) + [None]),
            "tz": pd.to_datetime(["2025-01-15T10:00:00+01:00"] * n, utc=True),
            "d": [dt.date(2025, 1, i + 1) for i in range(n)],
            "j": [{"k": i} for i in range(n)],
            "n": [decimal.Decimal("1.10")] * n,
        }
    )
    with ExternalDB.sqlite(tmp_path / "frames.sqlite3") as db:
        db.store_table("frames", frame)
        loaded = db.load_table("frames", as_dataframe=True)
        rows = db.load_table("frames")
    names = list(frame.columns)
    expected = _shape_rows(names, [tuple(row[name] for name in names) for row in rows], True)
    pd.testing.assert_frame_equal(loaded, expected)
    assert loaded["i_null"].tolist()[4] == 2**53 + 1
