"""The two databases of the external DB I/O manager: PostgreSQL (psycopg2) and SQLite.

Each adapter knows how to connect, run a transaction's statements, describe, create, delete
from, copy into and select from a table, and how to turn its driver's exceptions into the
package's taxonomy. :class:`~flowstone_dagster.external_db.ExternalDB` drives them;
they hold no connection themselves::

    adapter = PostgresAdapter(host="db", port=5432, database="analytics", user="etl",
                              password=os.environ["PGPASSWORD"])
    connection = adapter.connect()
    adapter.begin(connection, timeout=30.0)
    adapter.columns(connection, "public", "orders")     # [("id", "integer", "bigint"), ...]

Identifiers (schemas, tables, columns) are always quoted, with ``psycopg2.sql.Identifier`` or
:func:`quote_sqlite`, never pasted into SQL text; values are always bound parameters.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import logging
import math
import operator
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowstone_dagster.errors import CallTimeout, FlowstoneError, TransportError, truncate
from flowstone_dagster.external_db.errors import (
    ConstraintViolation,
    DatabaseError,
    InvalidValue,
)
from flowstone_dagster.external_db.types import (
    POSTGRES_TYPES,
    SQLITE_TYPES,
    Columns,
    Kind,
    copy_text,
    decode_sqlite_column,
    gc_paused,
    invalid_value,
    kind_of_postgres_type,
    kind_of_sqlite_type,
    payload_size,
    sqlite_param,
    sqlite_values,
)
from flowstone_dagster.http import redact_text

__all__ = [
    "Adapter",
    "ColumnInfo",
    "Condition",
    "LoadedFrame",
    "PostgresAdapter",
    "SQLiteAdapter",
    "Where",
    "is_local_host",
    "quote_sqlite",
]

logger = logging.getLogger(__name__)

#: Rows per chunk of a COPY stream: bounds the memory of encoding to one chunk's text.
COPY_CHUNK_ROWS = 20_000
#: SQLSTATE reported (by both adapters) when a table does not exist.
UNDEFINED_TABLE = "42P01"


@dataclass(frozen=True)
class Condition:
    """``column <op> value``; ``op`` is ``=``, ``>=``, ``<`` or ``in`` (``value`` a tuple)."""

    column: str
    op: Literal["=", ">=", "<", "in"]
    value: Any
    #: ``column`` is a SQL expression the user wrote (Dagster's ``partition_expr``), used as
    #: it is, not a column name to quote.
    expression: bool = False


#: A row filter: any of the alternatives (OR), each all of its conditions (AND). ``[]`` and
#: ``None`` mean every row.
Where = list[list[Condition]]


@dataclass(frozen=True)
class ColumnInfo:
    """A column of an existing table: its name, kind (``None``: a type we do not map) and the
    database's own name for its type."""

    name: str
    kind: Kind | None
    declared: str


_unverified_warned: set[tuple[str, int]] = set()
_unverified_lock = threading.Lock()


def is_local_host(host: str) -> bool:
    """Whether ``host`` is this machine: ``localhost``, a loopback address or a Unix socket
    directory (a path)."""
    if host.startswith("/") or host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _warn_unverified(host: str, port: int, sslmode: str) -> None:
    """A WARNING, once per server per process, that the server's certificate is not verified
    (a server on this machine excepted: nothing is on the network path)."""
    if is_local_host(host):
        return
    with _unverified_lock:
        if (host, port) in _unverified_warned:
            return
        _unverified_warned.add((host, port))
    logger.warning(
        "PostgreSQL at %s:%s: TLS certificate verification is off (sslmode=%s): anyone on the "
        "network path can impersonate the server%s; set sslrootcert (sslmode then defaults to "
        "verify-full) to verify it",
        host,
        port,
        sslmode,
        " or read the traffic" if sslmode in ("disable", "allow", "prefer") else "",
    )


def _cut_row(message: str) -> str:
    # PostgreSQL's context "COPY t, line 50001: "<the row's text>"" carries the row's data;
    # keep the line number, drop the data.
    return re.sub(r'(line \d+)(, column [^:]+)?: ".*', r"\1\2", message, flags=re.DOTALL)


class PostgresAdapter:
    """PostgreSQL through psycopg2: COPY for stores, server-side ``statement_timeout``.

    Connections are in autocommit mode; transactions are explicit (``BEGIN`` ... ``COMMIT``),
    so that the first statement of each transaction is also a check that a reused connection
    still works. Every session runs in UTC (``TimeZone=UTC``).
    """

    name = "postgres"

    def __init__(
        self,
        *,
        host: str,
        port: int,
        database: str,
        user: str,
        password: str | None,
        sslmode: str = "require",
        sslrootcert: str | None = None,
        connect_timeout: float = 10.0,
        application_name: str = "flowstone-dagster",
    ) -> None:
        import psycopg2
        import psycopg2.extras
        from psycopg2 import sql

        self._psycopg2 = psycopg2
        self._sql = sql
        self.host = host
        self.port = port
        self.database = database
        self.user = user
        self._password = password
        self.sslmode = sslmode
        self.sslrootcert = sslrootcert
        if sslmode not in ("verify-ca", "verify-full"):
            _warn_unverified(host, port, sslmode)
        self.connect_timeout = connect_timeout
        self.application_name = application_name

    def __repr__(self) -> str:
        return (
            f"PostgresAdapter(host={self.host!r}, port={self.port}, database={self.database!r}, "
            f"user={self.user!r})"
        )

    @property
    def where(self) -> str:
        """The server, for messages (never the password)."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"

    @property
    def default_service(self) -> str:
        """``db:postgresql://host:port/database``: the database server, what fails together
        (no user, no password)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"db:postgresql://{host}:{self.port}/{self.database}"

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self._password,) if self._password else ()

    # -- connections ---------------------------------------------------------------------------

    def connect(self) -> Any:
        options: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "dbname": self.database,
            "user": self.user,
            "sslmode": self.sslmode,
            # libpq counts whole seconds and treats 1 as 2.
            "connect_timeout": max(2, math.ceil(self.connect_timeout)),
            "application_name": self.application_name,
            "options": "-c TimeZone=UTC",
            # Notice a peer that vanished (a dropped network) within about a minute.
            "keepalives": 1,
            "keepalives_idle": 30,
            "keepalives_interval": 10,
            "keepalives_count": 3,
        }
        if self._password is not None:
            options["password"] = self._password
        if self.sslrootcert:
            options["sslrootcert"] = self.sslrootcert
        try:
            connection = self._psycopg2.connect(**options)
        except self._psycopg2.Error as exc:
            raise self._connect_error(exc) from None
        connection.autocommit = True
        # uuid columns load as uuid.UUID (psycopg2 returns text unless asked).
        self._psycopg2.extras.register_uuid(conn_or_curs=connection)
        return connection

    def _connect_error(self, exc: Exception) -> FlowstoneError:
        message = redact_text(str(exc).strip(), self.secrets)
        lowered = message.lower()
        if "authentication failed" in lowered or "no pg_hba.conf entry" in lowered:
            return DatabaseError(
                f"cannot log in to {self.where}: {truncate(message)}; check `user` and the "
                "password (the EnvVar it comes from)",
                sqlstate="28P01",
            )
        if "does not exist" in lowered:
            return DatabaseError(
                f"cannot connect to {self.where}: {truncate(message)}; check `database`/`user`",
                sqlstate="3D000",
            )
        # A TLS failure (bad certificate, SSL required but refused) fails the same way again.
        tls = ("certificate" in lowered or "ssl" in lowered) and "refused" not in lowered
        return TransportError(f"cannot connect to {self.where}: {truncate(message)}", tls=tls)

    def is_disconnect(self, exc: BaseException, connection: Any) -> bool:
        """Whether ``exc`` means the connection is gone (so it must be replaced)."""
        if isinstance(exc, TransportError):
            return True
        if not isinstance(exc, (self._psycopg2.OperationalError, self._psycopg2.InterfaceError)):
            return False
        if connection is not None and connection.closed:
            return True
        code = getattr(exc, "pgcode", None) or ""
        if not code:  # libpq's own failure: the server did not answer at all
            return True
        # Connection exceptions, and the server shutting down or restarting.
        return code.startswith("08") or code in ("57P01", "57P02", "57P03")

    def close(self, connection: Any) -> None:
        with contextlib.suppress(self._psycopg2.Error):
            connection.close()

    def begin(self, connection: Any, timeout: float | None, *, write: bool = True) -> None:
        """Start a transaction with ``timeout`` seconds per statement (``None``: no limit)."""
        milliseconds = 0 if timeout is None else max(1, math.ceil(timeout * 1000))
        with connection.cursor() as cursor:
            cursor.execute("BEGIN; SET LOCAL statement_timeout = %s", (milliseconds,))

    def commit(self, connection: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute("COMMIT")

    def rollback(self, connection: Any) -> None:
        with connection.cursor() as cursor:
            cursor.execute("ROLLBACK")

    # -- errors --------------------------------------------------------------------------------

    def translate(
        self,
        exc: BaseException,
        *,
        table: str | None = None,
        timeout: float | None = None,
        connection: Any = None,
    ) -> BaseException:
        """The taxonomy's exception for a psycopg2 error (anything else is returned as is)."""
        if isinstance(exc, FlowstoneError) or not isinstance(exc, self._psycopg2.Error):
            return exc
        code = exc.pgcode
        diag = exc.diag
        text = str(exc).strip()
        parts = [diag.message_primary or (text.splitlines()[0] if text else type(exc).__name__)]
        if diag.message_detail:
            parts.append(diag.message_detail)
        if diag.context:
            parts.append(_cut_row(diag.context.strip().splitlines()[-1]))
        message = redact_text(truncate("; ".join(p for p in parts if p), 1000), self.secrets)
        on = f" on {table}" if table else ""
        if code == "57014":
            limit = f" of {timeout:g} s" if timeout is not None else ""
            return CallTimeout(
                f"statement{on} cancelled by statement_timeout{limit}: {message}", timeout=timeout
            )
        if self.is_disconnect(exc, connection):
            return TransportError(f"connection to {self.where} lost{on}: {message}")
        if code and code.startswith("22"):
            place = re.search(r"COPY [^,]+, line (\d+)(?:, column ([^:]+))?", diag.context or "")
            return InvalidValue(
                f"invalid value{on}: {message}; nothing was written (the transaction was "
                "rolled back)",
                table=table,
                column=place.group(2) if place else None,
                row=int(place.group(1)) if place else None,
            )
        if code and code.startswith("23"):
            line = re.search(r"COPY [^,]+, line (\d+)", diag.context or "")
            return ConstraintViolation(
                f"constraint violation{on}: {message}; nothing was written (the transaction "
                "was rolled back)",
                sqlstate=code,
                table=table,
                constraint=diag.constraint_name,
                row=int(line.group(1)) if line else None,
            )
        return DatabaseError(f"{self.where}{on}: {message}", sqlstate=code, table=table)

    # -- statements ----------------------------------------------------------------------------

    def identifier(self, *names: str) -> Any:
        for name in names:
            if not name or "\x00" in name:
                raise ValueError(f"invalid identifier {name!r}: empty or contains NUL")
            if len(name.encode()) > 63:
                raise ValueError(
                    f"identifier {name!r} is longer than PostgreSQL's 63 bytes; PostgreSQL "
                    "would silently truncate it: choose a shorter name"
                )
        return self._sql.Identifier(*names)

    def qualified(self, schema: str, table: str) -> str:
        return f"{schema}.{table}"

    def columns(self, connection: Any, schema: str, table: str) -> list[ColumnInfo] | None:
        """The table's columns in order, or ``None`` when it does not exist."""
        with connection.cursor() as cursor:
            cursor.execute(
                """
                SELECT a.attname, t.typname, format_type(a.atttypid, a.atttypmod)
                FROM pg_catalog.pg_attribute a
                JOIN pg_catalog.pg_class c ON c.oid = a.attrelid
                JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                JOIN pg_catalog.pg_type t ON t.oid = a.atttypid
                WHERE n.nspname = %s AND c.relname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')
                  AND a.attnum > 0 AND NOT a.attisdropped
                ORDER BY a.attnum
                """,
                (schema, table),
            )
            rows = cursor.fetchall()
        if not rows:
            return None
        return [
            ColumnInfo(name, kind_of_postgres_type(udt), declared) for name, udt, declared in rows
        ]

    def _advisory(self, connection: Any, function: str, key: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT {function}(hashtextextended(%s, 0))", (f"flowstone.db:{key}",))

    def lock_rows(self, connection: Any, schema: str, table: str, partition: str | None) -> None:
        """Lock what a store replaces until the transaction ends, so that two concurrent
        replacements of the same rows cannot both insert theirs.

        ``partition`` (one partition's filter): that partition only, plus a shared lock on the
        table, so that stores of *different* partitions of one table run at the same time.
        ``None`` (a range of partitions, the whole table, an append): the table, exclusively.
        """
        qualified = f"{schema}.{table}"
        if partition is None:
            self._advisory(connection, "pg_advisory_xact_lock", qualified)
            return
        self._advisory(connection, "pg_advisory_xact_lock_shared", qualified)
        self._advisory(connection, "pg_advisory_xact_lock", f"{qualified}|{partition}")

    def lock_creation(self, connection: Any, schema: str) -> None:
        """Serialize the first stores into a schema until the transaction ends: two of them
        running ``CREATE SCHEMA IF NOT EXISTS`` (or ``CREATE TABLE IF NOT EXISTS``) at once
        make one fail with a unique violation on the catalog."""
        self._advisory(connection, "pg_advisory_xact_lock", f"create:{schema}")

    def create_table(
        self,
        connection: Any,
        schema: str,
        table: str,
        names: Sequence[str],
        kinds: Sequence[Kind | None],
    ) -> None:
        sql = self._sql
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1 FROM pg_catalog.pg_namespace WHERE nspname = %s", (schema,))
            if cursor.fetchone() is None:
                cursor.execute(
                    sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(self.identifier(schema))
                )
            definitions = sql.SQL(", ").join(
                sql.SQL("{} {}").format(
                    self.identifier(name), sql.SQL(POSTGRES_TYPES[kind or "text"])
                )
                for name, kind in zip(names, kinds, strict=True)
            )
            cursor.execute(
                sql.SQL("CREATE TABLE IF NOT EXISTS {} ({})").format(
                    self.identifier(schema, table), definitions
                )
            )

    def _where(self, where: Where | None) -> Any:
        """The ``WHERE`` clause, values as ``sql.Literal`` (psycopg2 quotes them exactly as it
        binds parameters, which it also does client-side). No ``%s`` placeholders: psycopg2
        would read a ``%`` inside a quoted identifier (a table named ``100% sales``) as one."""
        sql = self._sql
        if not where:
            return sql.SQL("")
        alternatives = []
        for conditions in where:
            parts = []
            for condition in conditions:
                column = (
                    sql.SQL("({})").format(sql.SQL(condition.column))
                    if condition.expression
                    else self.identifier(condition.column)
                )
                if condition.op == "in" and not condition.value:
                    parts.append(sql.SQL("FALSE"))  # IN of no keys: no row
                elif condition.op == "in":
                    parts.append(
                        sql.SQL("{} IN ({})").format(
                            column, sql.SQL(", ").join(map(sql.Literal, condition.value))
                        )
                    )
                else:
                    parts.append(
                        sql.SQL("{} " + condition.op + " {}").format(
                            column, sql.Literal(condition.value)
                        )
                    )
            alternatives.append(sql.SQL("(") + sql.SQL(" AND ").join(parts) + sql.SQL(")"))
        return sql.SQL(" WHERE ") + sql.SQL(" OR ").join(alternatives)

    def delete(self, connection: Any, schema: str, table: str, where: Where | None) -> int:
        clause = self._where(where)
        with connection.cursor() as cursor:
            cursor.execute(
                self._sql.SQL("DELETE FROM {}").format(self.identifier(schema, table)) + clause
            )
            return int(cursor.rowcount)

    def insert(
        self,
        connection: Any,
        schema: str,
        table: str,
        columns: Columns,
        kinds: Sequence[Kind | None],
    ) -> int:
        """COPY the rows into the table; returns the bytes sent."""
        sql = self._sql
        statement = sql.SQL("COPY {} ({}) FROM STDIN").format(
            self.identifier(schema, table),
            sql.SQL(", ").join(self.identifier(name) for name in columns.names),
        )
        source = _CopySource(
            copy_text(columns, kinds, start, min(start + COPY_CHUNK_ROWS, columns.rows)).encode()
            for start in range(0, columns.rows, COPY_CHUNK_ROWS)
        )
        with connection.cursor() as cursor:
            cursor.copy_expert(statement, source, size=1 << 18)
        if source.error is not None:
            # The stream was ended early (see _CopySource); the caller rolls back.
            raise invalid_value(columns, kinds, postgres=True) or source.error
        return source.sent

    def copy_frame(
        self,
        connection: Any,
        schema: str,
        table: str,
        where: Where | None,
        *,
        columns: Sequence[str] | None,
        info: list[ColumnInfo],
    ) -> LoadedFrame | None:
        """The rows as a DataFrame through ``COPY (SELECT ...) TO STDOUT`` (CSV) parsed by
        pandas, without a Python object per value; the same dtypes as a row-by-row load.
        ``None`` when a column's type is not one COPY loads here (see ``_COPY_LOAD_KINDS``)."""
        import pandas as pd

        kinds = {column.name: column.kind for column in info}
        names = list(columns) if columns else [column.name for column in info]
        if any(kinds.get(name) not in _COPY_LOAD_KINDS for name in names):
            return None
        sql = self._sql
        select = sql.SQL("SELECT {} FROM {}").format(
            sql.SQL(", ").join(self.identifier(name) for name in names),
            self.identifier(schema, table),
        ) + self._where(where)
        statement = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT csv, NULL {})").format(
            select, sql.Literal(_COPY_NULL)
        )
        buffer = io.BytesIO()
        with connection.cursor() as cursor:
            cursor.copy_expert(statement, buffer, size=1 << 18)
        size = buffer.tell()
        buffer.seek(0)
        dtypes: dict[int, Any] = {}
        for position, name in enumerate(names):
            kind = kinds[name]
            dtypes[position] = {"integer": "Int64", "float": "float64", "boolean": "boolean"}.get(
                kind or "", "str"
            )
        frame = pd.read_csv(
            buffer,
            header=None,
            names=list(range(len(names))),
            dtype=dtypes,
            na_values=[_COPY_NULL],
            keep_default_na=False,
            true_values=["t"],
            false_values=["f"],
            encoding="utf-8",
        )
        for position, name in enumerate(names):
            kind = kinds[name]
            column = frame[position]
            if kind == "integer" and not column.hasnans:
                frame[position] = column.astype("int64")
            elif kind == "boolean" and not column.hasnans:
                frame[position] = column.astype(bool)
            elif kind in ("timestamp", "timestamptz"):
                frame[position] = pd.to_datetime(
                    column, format="ISO8601", utc=kind == "timestamptz"
                )
        frame.columns = names
        return LoadedFrame(frame, size)

    def select(
        self,
        connection: Any,
        schema: str,
        table: str,
        where: Where | None,
        columns: Sequence[str] | None = None,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """The rows of ``table`` matching ``where``: all columns, or ``columns`` in order."""
        sql = self._sql
        clause = self._where(where)
        projection = (
            sql.SQL(", ").join(self.identifier(name) for name in columns)
            if columns
            else sql.SQL("*")
        )
        statement = (
            sql.SQL("SELECT {} FROM {}").format(projection, self.identifier(schema, table)) + clause
        )
        return self.query(connection, statement)

    def query(
        self, connection: Any, statement: Any, params: Any = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """Run ``statement``; its column names and rows (bytea as ``bytes``)."""
        with connection.cursor() as cursor:
            cursor.execute(statement, params)
            if cursor.description is None:
                return [], []
            names = [column.name for column in cursor.description]
            binary = [i for i, column in enumerate(cursor.description) if column.type_code == 17]
            with gc_paused():
                rows = cursor.fetchall()
                if binary and rows:
                    rows = [_unview(row, binary) for row in rows]
        return names, rows

    def execute_many(self, connection: Any, statement: str, params: Sequence[Any]) -> None:
        """Run ``statement`` once per parameter set, in pages (``execute_values`` for a
        ``VALUES %s`` statement, else ``execute_batch``)."""
        extras = self._psycopg2.extras
        with connection.cursor() as cursor:
            if re.search(r"VALUES\s+%s", statement, flags=re.IGNORECASE):
                extras.execute_values(cursor, statement, params, page_size=1000)
            else:
                extras.execute_batch(cursor, statement, params, page_size=1000)


@dataclass(frozen=True)
class LoadedFrame:
    """A DataFrame loaded a column at a time (PostgreSQL: ``COPY ... TO STDOUT``), and its
    size in bytes (received, or :func:`payload_size` of its values)."""

    frame: Any
    size: int


#: Column kinds a DataFrame load reads through COPY (parsed by pandas in C); a table with any
#: other column (numeric, json, bytea, uuid, date, time, an unknown type) loads row by row.
_COPY_LOAD_KINDS = frozenset({"integer", "float", "text", "boolean", "timestamp", "timestamptz"})
#: COPY's NULL in CSV output: not a value a column is likely to hold (PostgreSQL quotes a value
#: equal to it, but pandas does not tell quoted from unquoted fields).
_COPY_NULL = "\\N<flowstone-null>"


def _unview(row: tuple[Any, ...], binary: list[int]) -> tuple[Any, ...]:
    values = list(row)
    for i in binary:
        if values[i] is not None:
            values[i] = bytes(values[i])
    return tuple(values)


class _CopySource(io.RawIOBase):
    """A readable file over an iterator of byte chunks (what ``copy_expert`` reads from)."""

    def __init__(self, chunks: Iterator[bytes] | Any) -> None:
        super().__init__()
        self._chunks = iter(chunks)
        self._buffer = b""
        self.sent = 0
        self.error: Exception | None = None

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:
        while self.error is None and (size < 0 or len(self._buffer) < size):
            try:
                chunk = next(self._chunks, None)
            except Exception as exc:
                # Encoding a chunk failed (a value PostgreSQL cannot hold). Raising here would
                # make psycopg2 abort the COPY, which the server reports as a cancelled
                # statement (57014, read as a timeout): end the stream instead, and let the
                # caller raise the error and roll the transaction back.
                self.error = exc
                self._buffer = b""
                break
            if chunk is None:
                break
            self._buffer += chunk
        if size < 0:
            data, self._buffer = self._buffer, b""
        else:
            data, self._buffer = self._buffer[:size], self._buffer[size:]
        self.sent += len(data)
        return data


def quote_sqlite(name: str) -> str:
    """``name`` as a quoted SQLite identifier (``"a""b"`` for ``a"b``)."""
    if not name or "\x00" in name:
        raise ValueError(f"invalid identifier {name!r}: empty or contains NUL")
    return '"' + name.replace('"', '""') + '"'


class SQLiteAdapter:
    """SQLite through the standard library: ``executemany`` inside ``BEGIN IMMEDIATE``.

    Statement timeouts are enforced with a progress handler that interrupts a statement running
    past the deadline; ``busy_timeout`` is how long a write waits for another writer's lock.
    """

    name = "sqlite"
    secrets: tuple[str, ...] = ()

    def __init__(self, *, path: str, busy_timeout: float = 30.0) -> None:
        self.path = path
        self.busy_timeout = busy_timeout

    def __repr__(self) -> str:
        return f"SQLiteAdapter(path={self.path!r})"

    @property
    def where(self) -> str:
        return f"sqlite:///{self.path}"

    @property
    def default_service(self) -> str:
        """``db:sqlite:<absolute path>``: the database file."""
        path = self.path if self.path == ":memory:" else os.path.abspath(self.path)
        return f"db:sqlite:{path}"

    def connect(self) -> Any:
        try:
            connection = sqlite3.connect(
                self.path, timeout=self.busy_timeout, isolation_level=None, check_same_thread=False
            )
            # WAL: readers read the last committed state while a store writes or commits,
            # instead of waiting up to busy_timeout (the mode is kept by the file). NORMAL
            # synchronous is WAL's durable-across-crashes setting (a power loss may lose the
            # last commits, never corrupt the file).
            connection.execute("PRAGMA journal_mode=WAL")
            connection.execute("PRAGMA synchronous=NORMAL")
            return connection
        except sqlite3.Error as exc:
            raise DatabaseError(f"cannot open {self.where}: {exc}; check `path`") from None

    def is_disconnect(self, exc: BaseException, connection: Any) -> bool:
        return isinstance(exc, sqlite3.ProgrammingError) and "closed" in str(exc)

    def close(self, connection: Any) -> None:
        connection.close()

    def begin(self, connection: Any, timeout: float | None, *, write: bool = True) -> None:
        if timeout is None:
            connection.set_progress_handler(None, 0)
        else:
            deadline = time.monotonic() + timeout
            # Called every 10,000 virtual machine instructions; non-zero interrupts.
            connection.set_progress_handler(lambda: int(time.monotonic() > deadline), 10_000)
        connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def commit(self, connection: Any) -> None:
        connection.execute("COMMIT")

    def rollback(self, connection: Any) -> None:
        if connection.in_transaction:
            connection.execute("ROLLBACK")

    def translate(
        self,
        exc: BaseException,
        *,
        table: str | None = None,
        timeout: float | None = None,
        connection: Any = None,
    ) -> BaseException:
        """The taxonomy's exception for a sqlite3 error (anything else is returned as is)."""
        if isinstance(exc, FlowstoneError) or not isinstance(exc, sqlite3.Error):
            return exc
        message = truncate(str(exc), 1000)
        on = f" on {table}" if table else ""
        if isinstance(exc, sqlite3.IntegrityError):
            constraint = message.split(":", 1)[1].strip() if ":" in message else None
            return ConstraintViolation(
                f"constraint violation{on}: {message}; nothing was written (the transaction "
                "was rolled back)",
                table=table,
                constraint=constraint,
            )
        if isinstance(exc, sqlite3.OperationalError):
            if message == "interrupted":
                limit = f" of {timeout:g} s" if timeout is not None else ""
                return CallTimeout(
                    f"statement{on} interrupted by statement_timeout{limit}", timeout=timeout
                )
            if "locked" in message:
                return CallTimeout(
                    f"{self.where}{on}: {message} (waited busy_timeout={self.busy_timeout:g} s for "
                    "another writer)",
                    timeout=self.busy_timeout,
                )
            if message.startswith("no such table"):
                return DatabaseError(
                    f"{self.where}{on}: {message}", sqlstate=UNDEFINED_TABLE, table=table
                )
        return DatabaseError(f"{self.where}{on}: {message}", table=table)

    def identifier(self, *names: str) -> str:
        return ".".join(quote_sqlite(name) for name in names)

    def qualified(self, schema: str, table: str) -> str:
        return table if schema == "main" else f"{schema}.{table}"

    def columns(self, connection: Any, schema: str, table: str) -> list[ColumnInfo] | None:
        rows = connection.execute(
            "SELECT name, type FROM pragma_table_info(?, ?) ORDER BY cid", (table, schema)
        ).fetchall()
        if not rows:
            return None
        return [
            ColumnInfo(name, kind_of_sqlite_type(declared), declared) for name, declared in rows
        ]

    def lock_rows(self, connection: Any, schema: str, table: str, partition: str | None) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already holds the database's write lock."""

    def lock_creation(self, connection: Any, schema: str) -> None:
        """Nothing to do: ``BEGIN IMMEDIATE`` already holds the database's write lock."""

    def create_table(
        self,
        connection: Any,
        schema: str,
        table: str,
        names: Sequence[str],
        kinds: Sequence[Kind | None],
    ) -> None:
        definitions = ", ".join(
            f"{quote_sqlite(name)} {SQLITE_TYPES[kind or 'text']}"
            for name, kind in zip(names, kinds, strict=True)
        )
        connection.execute(
            f"CREATE TABLE IF NOT EXISTS {self.identifier(schema, table)} ({definitions})"
        )

    @staticmethod
    def _where(where: Where | None) -> tuple[str, list[Any]]:
        if not where:
            return "", []
        params: list[Any] = []
        alternatives = []
        for conditions in where:
            parts = []
            for condition in conditions:
                column = (
                    f"({condition.column})"
                    if condition.expression
                    else quote_sqlite(condition.column)
                )
                if condition.op == "in" and not condition.value:
                    parts.append("0")  # IN of no keys: no row
                elif condition.op == "in":
                    values = [sqlite_param(v) for v in condition.value]
                    parts.append(f"{column} IN ({', '.join('?' * len(values))})")
                    params.extend(values)
                else:
                    parts.append(f"{column} {condition.op} ?")
                    params.append(sqlite_param(condition.value))
            alternatives.append("(" + " AND ".join(parts) + ")")
        return " WHERE " + " OR ".join(alternatives), params

    def _check_columns(
        self,
        info: list[ColumnInfo] | None,
        table: str,
        where: Where | None,
        columns: Sequence[str] | None = None,
    ) -> None:
        # SQLite reads a double-quoted name that is not a column as a string literal (a legacy
        # quirk), so a filter on (or a selection of) a missing column would silently match
        # nothing, or load the name as a value: refuse it.
        known = {column.name for column in info or ()}
        named = [c.column for conditions in where or () for c in conditions if not c.expression]
        for name in [*named, *(columns or ())]:
            if name not in known:
                raise DatabaseError(
                    f"{self.where}: no such column {name!r} in table {table}", table=table
                )

    def delete(self, connection: Any, schema: str, table: str, where: Where | None) -> int:
        self._check_columns(self.columns(connection, schema, table), table, where)
        clause, params = self._where(where)
        cursor = connection.execute(f"DELETE FROM {self.identifier(schema, table)}{clause}", params)
        return int(cursor.rowcount)

    def insert(
        self,
        connection: Any,
        schema: str,
        table: str,
        columns: Columns,
        kinds: Sequence[Kind | None],
    ) -> int:
        names = ", ".join(quote_sqlite(name) for name in columns.names)
        marks = ", ".join("?" * len(columns.names))
        try:
            values = sqlite_values(columns, kinds)
            connection.executemany(
                f"INSERT INTO {self.identifier(schema, table)} ({names}) VALUES ({marks})",
                zip(*values, strict=True),
            )
        except (ValueError, UnicodeError, OverflowError) as exc:
            raise invalid_value(columns, kinds, postgres=False) or exc from None
        return payload_size(values)

    def select(
        self,
        connection: Any,
        schema: str,
        table: str,
        where: Where | None,
        columns: Sequence[str] | None = None,
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        """The rows of ``table`` matching ``where``: all columns, or ``columns`` in order."""
        info = self.columns(connection, schema, table) or []
        names, rows = self._select(connection, schema, table, where, columns=columns, info=info)
        kinds = {column.name: column.kind for column in info}
        if not rows or not any(kinds.get(name) for name in names):
            return names, rows
        with gc_paused():
            by_column = zip(names, zip(*rows, strict=True), strict=True)
            decoded = [decode_sqlite_column(kinds.get(n), list(values)) for n, values in by_column]
            return names, list(zip(*decoded, strict=True))

    def _select(
        self,
        connection: Any,
        schema: str,
        table: str,
        where: Where | None,
        *,
        columns: Sequence[str] | None,
        info: list[ColumnInfo],
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        self._check_columns(info, table, where, columns)
        clause, params = self._where(where)
        projection = ", ".join(map(quote_sqlite, columns)) if columns else "*"
        return self.query(
            connection,
            f"SELECT {projection} FROM {self.identifier(schema, table)}{clause}",
            params,
        )

    def select_frame(
        self,
        connection: Any,
        schema: str,
        table: str,
        where: Where | None,
        *,
        columns: Sequence[str] | None,
        info: list[ColumnInfo],
    ) -> LoadedFrame:
        """The rows as a DataFrame built a column at a time (timestamps parsed by pandas, not
        one ``fromisoformat`` per value); the same frame as a row-by-row load."""
        import pandas as pd

        names, rows = self._select(connection, schema, table, where, columns=columns, info=info)
        kinds = {column.name: column.kind for column in info}
        if not rows:
            return LoadedFrame(pd.DataFrame(columns=names), 0)
        size = 0
        with gc_paused():
            # pandas transposes the rows and infers plain columns (int64, float64, object) in
            # C, as read_sql does; only columns whose kind needs decoding, and integer columns
            # holding NULL (which pandas would make float64), are rebuilt from their values.
            frame = pd.DataFrame.from_records(rows, columns=names, coerce_float=False)
            for position, name in enumerate(names):
                column = frame[name]
                kind = kinds.get(name)
                if column.dtype.kind in "iuf" and kind not in ("boolean", "numeric"):
                    if column.dtype.kind == "f" and kind == "integer":
                        values = list(map(operator.itemgetter(position), rows))
                        frame[name] = _frame_column(pd, kind, values)
                    size += 8 * int(column.notna().sum())
                    continue
                values = list(map(operator.itemgetter(position), rows))
                size += payload_size([values])
                if kind is None or kind == "text":
                    continue
                frame[name] = _frame_column(pd, kind, values)
        return LoadedFrame(frame, size)

    def query(
        self, connection: Any, statement: str, params: Any = None
    ) -> tuple[list[str], list[tuple[Any, ...]]]:
        cursor = connection.execute(statement, params if params is not None else ())
        if cursor.description is None:
            return [], []
        with gc_paused():
            return [column[0] for column in cursor.description], cursor.fetchall()

    def execute_many(self, connection: Any, statement: str, params: Sequence[Any]) -> None:
        connection.executemany(statement, params)


Adapter = PostgresAdapter | SQLiteAdapter


def _frame_column(pd: Any, kind: Kind, values: list[Any]) -> Any:
    """One loaded SQLite column as the DataFrame column the row-by-row load gives."""
    types = set(map(type, values))
    if kind in ("timestamp", "timestamptz") and types <= {str, type(None)}:
        return pd.to_datetime(values, format="ISO8601", utc=kind == "timestamptz").as_unit("us")
    values = decode_sqlite_column(kind, values)
    types = set(map(type, values))
    if types == {int, type(None)}:
        return pd.array(values, dtype="Int64")
    if types == {bool, type(None)}:
        return pd.array(values, dtype="boolean")
    return values
