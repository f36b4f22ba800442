"""``ExternalDB``: a PostgreSQL or SQLite database, for custom SQL and for whole tables per
partition (what :class:`~flowstone_dagster.ExternalDBIOManager` stores through), testable
without Dagster::

    db = ExternalDB.postgres(host="db.internal", database="analytics", user="etl",
                             password=os.environ["WAREHOUSE_PASSWORD"])
    db.load(lambda day: ("SELECT * FROM users WHERE date = %s", [day]), partition="2025-01-15")
    db.store(
        [{"name": "Alice"}, {"name": "Bob"}],
        "INSERT INTO users (name, date) VALUES (%s, %s)",
        lambda row, day: [row["name"], day],
        partition="2025-01-15",
    )
    db.store_table("orders", [{"id": 1, "total": 9.5}], partition={"day": date(2025, 1, 15)})

A table store replaces the partition's rows (DELETE of the partition, then COPY of the new rows)
in one transaction: re-running a partition never duplicates it, and a failure anywhere (a
constraint violated by row 50,001, a dropped connection, a timeout) leaves the table exactly as
it was. Tables are created from the data's types when missing (see
:mod:`~flowstone_dagster.external_db.types`); an existing table's schema is used as it is, and
data that does not fit it is a :class:`SchemaMismatch` before anything is written.
"""

from __future__ import annotations

import contextlib
import operator
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal, TypeVar

from pydantic import ConfigDict, Field, validate_call

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.external_db.adapters import (
    UNDEFINED_TABLE,
    Adapter,
    ColumnInfo,
    LoadedFrame,
    PostgresAdapter,
    SQLiteAdapter,
)
from flowstone_dagster.external_db.config import (
    DEFAULT_BUSY_TIMEOUT,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_STATEMENT_TIMEOUT,
    PostgresConfig,
    SQLiteConfig,
    SSLModeSetting,
)
from flowstone_dagster.external_db.errors import (
    ConstraintViolation,
    DatabaseError,
    SchemaMismatch,
)
from flowstone_dagster.external_db.partitions import (
    PartitionSelection,
)
from flowstone_dagster.external_db.types import (
    POSTGRES_TYPES,
    SQLITE_TYPES,
    Columns,
    Kind,
    accepts,
    gc_paused,
    payload_size,
    rows_size,
    to_columns,
)
from flowstone_dagster.formats import is_dataframe, require_pandas
from flowstone_dagster.resilience import ResilienceResource, current_deadline, resolve

__all__ = [
    "DEFAULT_STATEMENT_TIMEOUT",
    "ConstraintViolation",
    "DatabaseError",
    "ExternalDB",
    "SchemaMismatch",
    "TableStoreResult",
]

T = TypeVar("T")

Query = str | Callable[[Any], tuple[str, Any]]
WriteMode = Literal["replace", "append"]


@dataclass(frozen=True)
class TableStoreResult:
    """What :meth:`ExternalDB.store_table` did."""

    table: str
    rows: int
    deleted: int
    bytes: int
    created: bool
    columns: list[tuple[str, str]]


def _shape(names: list[str], rows: list[tuple[Any, ...]], as_dataframe: bool) -> Any:
    with gc_paused():
        return _shape_rows(names, rows, as_dataframe)


def _shape_rows(names: list[str], rows: list[tuple[Any, ...]], as_dataframe: bool) -> Any:
    if as_dataframe:
        pandas = require_pandas()
        if not rows:
            return pandas.DataFrame(columns=names)
        frame = pandas.DataFrame.from_records(rows, columns=names)
        for position, name in enumerate(names):
            # pandas turns integers with a NULL into float64, which changes values past 2**53,
            # and booleans with a NULL into objects: such columns load as the nullable Int64
            # and boolean dtypes instead (as COPY loads them).
            kind = frame.dtypes.iloc[position].kind
            if (kind == "f" and frame.iloc[:, position].hasnans) or kind == "O":
                values = list(map(operator.itemgetter(position), rows))
                types = set(map(type, values))
                if types == {int, type(None)}:
                    frame[name] = pandas.array(values, dtype="Int64")
                elif types == {bool, type(None)}:
                    frame[name] = pandas.array(values, dtype="boolean")
        return frame
    return [dict(zip(names, row, strict=True)) for row in rows]


def _records(rows: Any) -> list[Any]:
    if is_dataframe(rows):
        return list(to_records(rows))
    if isinstance(rows, (str, bytes, Mapping)):
        raise TypeError(f"stores a list of rows, not {type(rows).__name__}")
    return list(rows)


def to_records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame's rows as dicts of Python values (NaN/NaT as ``None``)."""
    columns = to_columns(frame)
    return [
        dict(zip(columns.names, values, strict=True))
        for values in zip(*columns.values, strict=True)
    ]


class ExternalDB:
    """A PostgreSQL or SQLite database: custom SQL (:meth:`load`, :meth:`store`) and whole
    tables per partition (:meth:`load_table`, :meth:`store_table`).

    Each call is one transaction on one connection, kept open between calls (and replaced when
    it broke: a connection that died while idle, say because the server restarted, is replaced
    before the call runs, since the server never saw it). Each call runs through
    ``resilience``'s policy for ``service`` (retries of connection failures and timeouts,
    breaker, rate limit); without ``resilience`` a call is made once. ``service`` defaults to
    the database server, what fails together: ``db:postgresql://host:port/database`` (no user,
    no password) or ``db:sqlite:<absolute path>``. Statements run under ``statement_timeout``
    seconds (or the time left of the resilience policy's timeout, when shorter).

    Placeholders in custom SQL are the driver's: ``%s`` / ``%(name)s`` for PostgreSQL, ``?`` /
    ``:name`` for SQLite.
    """

    @validate_call(config=ConfigDict(arbitrary_types_allowed=True))
    def __init__(
        self,
        adapter: Adapter,
        *,
        statement_timeout: Annotated[float, Field(gt=0)] | None = DEFAULT_STATEMENT_TIMEOUT,
        resilience: ResilienceResource | None = None,
        service: str | None = None,
    ) -> None:
        self.adapter = adapter
        self.statement_timeout = statement_timeout
        self.resilience = resilience
        self.service = service or adapter.default_service
        self._connection: Any = None
        self._pid = 0
        self._lock = threading.RLock()

    @classmethod
    def from_config(cls, database: PostgresConfig | SQLiteConfig, **options: Any) -> ExternalDB:
        """The database ``database`` describes; ``options`` are :class:`ExternalDB`'s keyword
        arguments (``statement_timeout``, ``resilience``, ``service``)."""
        return cls(database.adapter(), **options)

    @classmethod
    def postgres(
        cls,
        *,
        database: str,
        user: str,
        password: str | None = None,
        host: str = "localhost",
        port: int = 5432,
        sslmode: SSLModeSetting = "auto",
        sslrootcert: str | None = None,
        connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **options: Any,
    ) -> ExternalDB:
        """A PostgreSQL database (:class:`PostgresConfig`'s fields); ``options`` are
        :class:`ExternalDB`'s keyword arguments."""
        config = PostgresConfig(
            host=host,
            port=port,
            database=database,
            user=user,
            password=password,
            sslmode=sslmode,
            sslrootcert=sslrootcert,
            connect_timeout=connect_timeout,
        )
        return cls.from_config(config, **options)

    @classmethod
    def sqlite(
        cls,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        **options: Any,
    ) -> ExternalDB:
        """A SQLite database file (created when missing)."""
        config = SQLiteConfig(path=os.fspath(path), busy_timeout=busy_timeout)
        return cls.from_config(config, **options)

    def __repr__(self) -> str:
        return f"ExternalDB({self.adapter!r}, service={self.service!r})"

    def __enter__(self) -> ExternalDB:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        with self._lock:
            if self._connection is not None and self._pid == os.getpid():
                self.adapter.close(self._connection)
            self._connection = None

    # -- transactions --------------------------------------------------------------------------

    def _checkout(self) -> tuple[Any, bool]:
        """The open connection (reused: True) or a new one. A connection inherited through
        fork belongs to the parent: it is forgotten, never used or closed."""
        if self._connection is not None and self._pid == os.getpid():
            return self._connection, True
        self._connection = self.adapter.connect()
        self._pid = os.getpid()
        return self._connection, False

    def _discard(self) -> None:
        if self._connection is not None:
            self.adapter.close(self._connection)
        self._connection = None

    def _timeout(self) -> float | None:
        deadline = current_deadline()
        if deadline is None:
            return self.statement_timeout
        deadline.check("the database call")
        remaining = deadline.remaining()
        return (
            remaining if self.statement_timeout is None else min(remaining, self.statement_timeout)
        )

    @contextlib.contextmanager
    def _transaction(self, *, write: bool, idempotent: bool, table: str | None) -> Iterator[Any]:
        """A connection inside a transaction (statement timeout set), committed when the block
        ends, rolled back (or replaced, when lost) when it raises; driver errors become the
        taxonomy's, never chained (their messages may quote a password)."""
        adapter = self.adapter
        with self._lock:
            timeout = self._timeout()
            connection, reused = self._checkout()
            committing = False
            try:
                try:
                    adapter.begin(connection, timeout, write=write)
                except Exception as exc:
                    if not (reused and adapter.is_disconnect(exc, connection)):
                        raise
                    # The connection died while idle (server restart, a proxy's idle cut): the
                    # server never saw this call, so it runs on a new connection.
                    self._discard()
                    connection, reused = self._checkout()
                    adapter.begin(connection, timeout, write=write)
                yield connection
                committing = True
                adapter.commit(connection)
            except BaseException as exc:
                lost = adapter.is_disconnect(exc, connection)
                error = adapter.translate(exc, table=table, timeout=timeout, connection=connection)
                if lost:
                    self._discard()
                else:
                    try:
                        adapter.rollback(connection)
                    except Exception:
                        self._discard()
                if committing and lost and not idempotent:
                    error = DatabaseError(
                        f"the connection was lost while committing{' to ' + table if table else ''}"
                        f"; whether the transaction was committed is unknown: check before "
                        f"running it again ({error})",
                        table=table,
                        service=self.service,
                    )
                if error is exc:
                    raise
                if getattr(error, "service", None) is None:
                    error.service = self.service  # type: ignore[attr-defined]
                raise error from None

    def _attempt(
        self, work: Callable[[Any], T], *, write: bool, idempotent: bool, table: str | None
    ) -> T:
        with self._transaction(write=write, idempotent=idempotent, table=table) as connection:
            return work(connection)

    @contextlib.contextmanager
    def connection(self) -> Iterator[Any]:
        """The database's own DB-API connection (psycopg2 or sqlite3) for SQL of your own,
        inside one transaction: committed when the block ends, rolled back when it raises::

            with db.connection() as connection:
                cursor = connection.cursor()
                cursor.execute("UPDATE orders SET status = %s WHERE id = %s", ["paid", 42])

        Statements are bounded by ``statement_timeout``; errors are the taxonomy's
        (``ConstraintViolation``, ``CallTimeout``, ``DatabaseError``...). The block runs once:
        ``resilience`` retries only the package's own calls, which it can run again. One
        ``flowstone.db.connection`` event per block. The connection is the one this
        ``ExternalDB`` reuses: do not close it or keep it past the block.
        """
        measures: dict[str, Any] = {"adapter": self.adapter.name, "service": self.service}
        with (
            telemetry.span("flowstone.db.connection", **measures),
            self._transaction(write=True, idempotent=False, table=None) as connection,
        ):
            yield connection

    def _run(
        self,
        event: str,
        work: Callable[[Any], T],
        measure: Callable[[T], dict[str, Any]],
        *,
        write: bool,
        idempotent: bool,
        table: str | None = None,
    ) -> T:
        attempts = 0

        def attempt() -> T:
            nonlocal attempts
            attempts += 1
            return self._attempt(work, write=write, idempotent=idempotent, table=table)

        measures: dict[str, Any] = {"adapter": self.adapter.name, "service": self.service}
        if table is not None:
            measures["table"] = table
        with telemetry.span(event, **measures) as call:
            try:
                result = resolve(self.resilience).call(self.service, attempt, dagster_errors=False)
            finally:
                call.attempts = max(attempts, 1)
            call.set(**measure(result))
        return result

    # -- custom SQL ------------------------------------------------------------------------------

    def load(
        self,
        load_query: Query,
        params: Any = None,
        *,
        partition: Any = None,
        as_dataframe: bool = False,
    ) -> Any:
        """Rows of a query, as a list of dicts (or a DataFrame with ``as_dataframe``).

        ``load_query`` is SQL with ``params``, or a function ``load_query(partition)`` returning
        ``(sql, params)``::

            db.load("SELECT * FROM users WHERE date = %s", ["2025-01-15"])
            db.load(lambda day: ("SELECT * FROM users WHERE date = %s", [day]),
                    partition=date(2025, 1, 15))
        """
        statement, bound = _query(load_query, params, partition, "load_query")

        def work(connection: Any) -> tuple[list[str], list[tuple[Any, ...]]]:
            return self.adapter.query(connection, statement, bound)

        names, rows = self._run(
            "flowstone.db.load", work, _load_measures, write=False, idempotent=True
        )
        return _shape(names, rows, as_dataframe)

    def store(
        self,
        rows: Any,
        insert_query: str,
        params_fn: Callable[[Any, Any], Any] | None = None,
        *,
        partition: Any = None,
        delete_query: Query | None = None,
        delete_params: Any = None,
    ) -> int:
        """Run ``insert_query`` once per row, all rows in one transaction; returns the row count.

        ``params_fn(row, partition)`` gives each row's parameters (default: the row itself, for
        named placeholders). ``delete_query`` (SQL, or ``fn(partition) -> (sql, params)``) runs
        first in the same transaction, so that a re-run replaces instead of duplicating::

            db.store(
                [{"name": "Alice"}, {"name": "Bob"}],
                "INSERT INTO users (name, date) VALUES (%s, %s)",
                lambda row, day: [row["name"], day],
                partition=date(2025, 1, 15),
                delete_query=lambda day: ("DELETE FROM users WHERE date = %s", [day]),
            )

        On PostgreSQL an ``INSERT ... VALUES %s`` statement is sent with ``execute_values``
        (many rows per statement), any other with ``execute_batch``. Parameters are computed
        before the transaction starts: a ``params_fn`` that fails writes nothing.
        """
        records = _records(rows)
        params = records if params_fn is None else [params_fn(r, partition) for r in records]
        delete = (
            _query(delete_query, delete_params, partition, "delete_query")
            if delete_query is not None
            else None
        )

        def work(connection: Any) -> int:
            if delete is not None:
                self.adapter.query(connection, delete[0], delete[1])
            if params:
                self.adapter.execute_many(connection, insert_query, params)
            return len(params)

        size = _params_size(params)
        self._run(
            "flowstone.db.store",
            work,
            lambda count: {"rows": count, "bytes": size},
            write=True,
            idempotent=delete is not None,
        )
        return len(params)

    # -- tables ----------------------------------------------------------------------------------

    def _target(self, schema: str | None, table: str) -> tuple[str, str]:
        """``(schema, table)`` in the database. SQLite has no schemas: a schema (an asset key
        prefix) becomes a prefix of the table's name, ``sales__orders`` (as Dagster names the
        asset's op), so that ``sales/orders`` and ``marketing/orders`` are distinct tables."""
        if isinstance(self.adapter, SQLiteAdapter):
            if schema in (None, "main", "public"):
                return "main", table
            return "main", f"{schema}__{table}"
        return schema or "public", table

    def qualified(self, schema: str | None, table: str) -> str:
        """The table's name as the database shows it: ``schema.table`` on PostgreSQL, the
        table on SQLite (``schema__table`` for a schema other than ``main``/``public``)."""
        return self.adapter.qualified(*self._target(schema, table))

    def load_table(
        self,
        table: str,
        *,
        schema: str | None = None,
        partition: Mapping[str, Any] | None = None,
        selection: PartitionSelection | None = None,
        columns: Sequence[str] | None = None,
        as_dataframe: bool = False,
    ) -> Any:
        """The rows of ``table`` (all, or those equal to ``partition``, e.g. ``{"day": day}``,
        or of a Dagster ``selection``), as a list of dicts or a DataFrame; all columns, or
        ``columns`` in that order.

        A missing table raises :class:`DatabaseError` with ``sqlstate`` ``42P01``.
        """
        schema, table = self._target(schema, table)
        if selection is None and partition is not None:
            selection = PartitionSelection.of(partition)
        qualified = self.adapter.qualified(schema, table)
        self.adapter.identifier(schema, table, *(columns or ()))

        adapter = self.adapter
        copy_frames = as_dataframe and isinstance(adapter, PostgresAdapter)

        def work(connection: Any) -> tuple[list[str], list[tuple[Any, ...]]] | LoadedFrame:
            info = None
            # The column types decide how time-window bounds are bound, whether a
            # partition_expr is a column or an expression, and whether COPY can load a frame.
            if isinstance(adapter, SQLiteAdapter) or selection is not None or copy_frames:
                info = adapter.columns(connection, schema, table)
                if info is None:
                    raise _missing_table(qualified)
            where = selection.where(_kinds(info)) if selection is not None else None
            if as_dataframe and isinstance(adapter, SQLiteAdapter) and info is not None:
                return adapter.select_frame(
                    connection, schema, table, where, columns=columns, info=info
                )
            if copy_frames and isinstance(adapter, PostgresAdapter) and info is not None:
                copied = adapter.copy_frame(
                    connection, schema, table, where, columns=columns, info=info
                )
                if copied is not None:
                    return copied
            return adapter.select(connection, schema, table, where, columns)

        result = self._run(
            "flowstone.db.load",
            work,
            _load_measures,
            write=False,
            idempotent=True,
            table=qualified,
        )
        if isinstance(result, LoadedFrame):
            return result.frame
        names, rows = result
        return _shape(names, rows, as_dataframe)

    def store_table(
        self,
        table: str,
        data: Any,
        *,
        schema: str | None = None,
        mode: WriteMode = "replace",
        partition: Mapping[str, Any] | None = None,
        selection: PartitionSelection | None = None,
        create: bool = True,
        declared: Sequence[tuple[str, Kind]] | None = None,
    ) -> TableStoreResult:
        """Store ``data`` (a list of dicts or a DataFrame) in ``table``, in one transaction.

        ``declared`` (column names and kinds) creates the table when ``data`` has no columns
        (an empty list), so that an empty first output still leaves a table to load from.

        ``mode="replace"`` first deletes the rows being replaced: those of ``partition`` (e.g.
        ``{"day": date(2025, 1, 15)}``; missing partition columns are filled in, and every row
        must belong to it) or of the Dagster ``selection``, or all rows when neither is given.
        ``mode="append"`` deletes nothing. The table is created from the data's types when
        missing (unless ``create`` is false); an existing table is never altered.

        Raises ``TypeError``/``ValueError`` for data that cannot be stored and
        :class:`SchemaMismatch` for data that does not fit the table, before anything is
        written; :class:`ConstraintViolation`, ``CallTimeout``, ``TransportError`` or
        :class:`DatabaseError` from the database, after rolling back.
        """
        if mode not in ("replace", "append"):
            raise ConfigurationError("must be 'replace' or 'append'", field="write_mode")
        schema, table = self._target(schema, table)
        if selection is None and partition is not None:
            selection = PartitionSelection.of(partition)
        columns = to_columns(data)
        if not columns.names and declared:
            columns = Columns(
                [name for name, _ in declared],
                [[] for _ in declared],
                [kind for _, kind in declared],
                0,
            )
        if selection is not None:
            selection.apply(columns)
        self.adapter.identifier(schema, table)
        for name in columns.names:
            self.adapter.identifier(name)
        qualified = self.adapter.qualified(schema, table)

        def work(connection: Any) -> TableStoreResult:
            return self._store_table(
                connection,
                schema=schema,
                table=table,
                qualified=qualified,
                columns=columns,
                mode=mode,
                selection=selection,
                create=create,
            )

        return self._run(
            "flowstone.db.store",
            work,
            lambda result: {"rows": result.rows, "bytes": result.bytes},
            write=True,
            idempotent=mode == "replace",
            table=qualified,
        )

    def _store_table(
        self,
        connection: Any,
        *,
        schema: str,
        table: str,
        qualified: str,
        columns: Columns,
        mode: WriteMode,
        selection: PartitionSelection | None,
        create: bool,
    ) -> TableStoreResult:
        adapter = self.adapter
        one_partition = (
            selection.describe()
            if selection is not None and selection.single and mode == "replace"
            else None
        )
        adapter.lock_rows(connection, schema, table, one_partition)
        existing = adapter.columns(connection, schema, table)
        if existing is None:
            # Creating the table: wait for any other first store into the schema, then look
            # again (it may have created the table meanwhile).
            adapter.lock_creation(connection, schema)
            existing = adapter.columns(connection, schema, table)
        created = False
        if existing is None:
            if not create:
                raise _missing_table(qualified, hint="create_tables is off: create it first")
            if not columns.names:
                # Nothing to infer a table from, and nothing to store.
                return TableStoreResult(qualified, 0, 0, 0, False, [])
            kinds = list(columns.kinds)
            adapter.create_table(connection, schema, table, columns.names, kinds)
            created = True
            types = POSTGRES_TYPES if adapter.name == "postgres" else SQLITE_TYPES
            described = [(n, types[k or "text"]) for n, k in zip(columns.names, kinds, strict=True)]
        else:
            kinds = _fit(existing, columns, qualified, self.service)
            described = [(c.name, c.declared) for c in existing]
        if selection is None:
            where = None
        elif existing is None:
            where = selection.where(dict(zip(columns.names, kinds, strict=True)))
        else:
            where = selection.where(_kinds(existing))
        deleted = adapter.delete(connection, schema, table, where) if mode == "replace" else 0
        sent = adapter.insert(connection, schema, table, columns, kinds) if columns.rows else 0
        return TableStoreResult(qualified, columns.rows, deleted, sent, created, described)


def _fit(
    existing: list[ColumnInfo], columns: Columns, table: str, service: str
) -> list[Kind | None]:
    """The target kinds of the data's columns in an existing table, or SchemaMismatch."""
    by_name = {column.name: column for column in existing}
    kinds: list[Kind | None] = []
    for name, kind in zip(columns.names, columns.kinds, strict=True):
        column = by_name.get(name)
        if column is None:
            raise SchemaMismatch(
                f"{table} has no column {name!r} (its columns: "
                f"{', '.join(repr(c.name) for c in existing)}); the I/O manager never alters an "
                "existing table: add the column (ALTER TABLE) or leave it out of the data",
                table=table,
                column=name,
                found=kind,
                service=service,
            )
        if column.kind == "integer" and kind == "float":
            # A pandas integer column with a missing value arrives as float64: whole numbers
            # fit the integer column, anything else is a mismatch naming the value.
            position = columns.names.index(name)
            values = columns.values[position]
            fraction = next(
                (v for v in values if v is not None and not float(v).is_integer()), None
            )
            if fraction is None:
                columns.values[position] = [None if v is None else int(v) for v in values]
                columns.kinds[position] = "integer"
                kinds.append(column.kind)
                continue
            else:
                raise SchemaMismatch(
                    f"column {name!r} of {table} is {column.declared}, but the data holds "
                    f"{fraction!r}, not a whole number; round the data, or migrate the column",
                    table=table,
                    column=name,
                    expected=column.declared,
                    found=kind,
                    service=service,
                )
        if not accepts(column.kind, kind):
            raise SchemaMismatch(
                f"column {name!r} of {table} is {column.declared}, but the data holds {kind} "
                "values; convert the data, or migrate the column",
                table=table,
                column=name,
                expected=column.declared,
                found=kind,
                service=service,
            )
        kinds.append(column.kind or kind)
    return kinds


def _missing_table(table: str, hint: str = "materialize its asset first") -> DatabaseError:
    return DatabaseError(
        f"table {table} does not exist; {hint}", sqlstate=UNDEFINED_TABLE, table=table
    )


def _kinds(info: list[ColumnInfo] | None) -> dict[str, Kind | None]:
    return {column.name: column.kind for column in info or ()}


def _query(query: Query, params: Any, partition: Any, field: str) -> tuple[str, Any]:
    if callable(query):
        produced = query(partition)
        if not (
            isinstance(produced, tuple) and len(produced) == 2 and isinstance(produced[0], str)
        ):
            raise ConfigurationError(
                f"must return (sql, params), got {type(produced).__name__}", field=field
            )
        return produced
    if not isinstance(query, str):
        raise ConfigurationError("must be SQL text or fn(partition) -> (sql, params)", field=field)
    return query, params


def _load_measures(
    result: tuple[list[str], list[tuple[Any, ...]]] | LoadedFrame,
) -> dict[str, Any]:
    if isinstance(result, LoadedFrame):
        return {"rows": len(result.frame), "bytes": result.size}
    _, rows = result
    if not rows:
        return {"rows": 0, "bytes": 0}
    with gc_paused():
        return {"rows": len(rows), "bytes": rows_size(rows)}


def _params_size(params: Sequence[Any]) -> int:
    if not params:
        return 0
    first = params[0]
    if isinstance(first, Mapping):
        return payload_size([list(row.values()) for row in params])
    return payload_size([list(column) for column in zip(*params, strict=False)])
