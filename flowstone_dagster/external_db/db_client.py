"""The ``DbClient`` of :class:`~flowstone_dagster.ExternalDBIOManager`: Dagster's database
I/O manager protocol over :class:`~flowstone_dagster.external_db.client.ExternalDB`.

Dagster's ``DbIOManager`` stores an output as ``connect`` → ``ensure_schema_exists`` →
``delete_table_slice`` → the type handler's ``handle_output``. Run literally, that is three
transactions, or one transaction that a retry cannot repeat. Here ``connect`` yields a
:class:`TableSession` that records what the steps ask for, and the type handler's store runs
them all in one transaction through ``ExternalDB.store_table``: ``CREATE SCHEMA``/``CREATE
TABLE IF NOT EXISTS`` under a lock, the schema check, ``DELETE`` of the table slice, ``COPY`` of
the rows, retried as a whole by the resilience policy. A failure anywhere leaves the table as
it was.

The backends (PostgreSQL, SQLite) differ in the adapter the ``ExternalDB`` holds (quoting,
COPY or ``executemany``, SQLite's table-name prefix for schemas); the client is the same.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import dagster as dg

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.external_db.adapters import UNDEFINED_TABLE
from flowstone_dagster.external_db.client import ExternalDB, TableStoreResult, WriteMode
from flowstone_dagster.external_db.dagster_db import DbClient, TableSlice
from flowstone_dagster.external_db.errors import DatabaseError
from flowstone_dagster.external_db.partitions import PartitionSelection, selection_of_dimensions
from flowstone_dagster.external_db.types import POSTGRES_TYPES, Kind, kind_of_declared_type

__all__ = ["ExternalDbClient", "TableSession"]


@dataclass
class TableSession:
    """One store or load of a table slice (what :meth:`ExternalDbClient.connect` yields)."""

    db: ExternalDB
    table_slice: TableSlice
    write_mode: WriteMode
    create_tables: bool
    #: Set by ``delete_table_slice``: the store replaces the slice's rows.
    replace: bool = False
    output_metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def schema(self) -> str:
        return self.table_slice.schema

    @property
    def table(self) -> str:
        return self.table_slice.table

    def selection(self, single: bool) -> PartitionSelection | None:
        dimensions = self.table_slice.partition_dimensions or []
        if not dimensions:
            return None
        return selection_of_dimensions(
            [(d.partition_expr, d.partitions) for d in dimensions], single=single
        )

    def store(self, context: dg.OutputContext, obj: Any) -> Mapping[str, Any]:
        """Store ``obj`` (a DataFrame or a list of dicts) in one transaction; the output
        metadata Dagster's database I/O managers emit, and ours."""
        metadata = context.definition_metadata or {}
        single = not context.has_asset_partitions or len(context.asset_partition_keys) == 1
        selection = self.selection(single)
        mode: WriteMode = "replace"
        if selection is None:
            mode = metadata.get("write_mode") or self.write_mode
        result = self.db.store_table(
            self.table,
            obj,
            schema=self.schema,
            mode=mode if self.replace else "append",
            selection=selection,
            create=self.create_tables,
            declared=_declared_columns(context),
        )
        return _output_metadata(result, selection, mode)

    def load(self, context: dg.InputContext, *, as_dataframe: bool) -> Any:
        """The slice's rows (its ``columns`` only, when the input asks for some)."""
        selection = self.selection(single=False)
        try:
            return self.db.load_table(
                self.table,
                schema=self.schema,
                selection=selection,
                columns=self.table_slice.columns,
                as_dataframe=as_dataframe,
            )
        except DatabaseError as exc:
            if exc.sqlstate != UNDEFINED_TABLE:
                raise
            if selection is not None and selection.is_empty:
                # No upstream partition (a self-dependent asset's first partition): an empty
                # value, also before the first store created the table.
                return _empty(as_dataframe)
            if _stored_no_rows(context):
                # Its outputs were empty and named no columns, so no table could be created:
                # what was stored is an empty value.
                return _empty(as_dataframe)
            what = (
                f"asset {context.asset_key.to_user_string()}"
                if context.has_asset_key
                else f"output {context.upstream_output.name}"  # type: ignore[union-attr]
            )
            raise DatabaseError(
                f"no table for {what}: {exc.message}",
                sqlstate=exc.sqlstate,
                table=exc.table,
                service=exc.service,
            ) from None


def _stored_no_rows(context: dg.InputContext) -> bool:
    """The upstream asset's latest materialization stored 0 rows (then no table exists only
    because nothing said what its columns are); False for op outputs and assets never
    materialized."""
    if not context.has_asset_key:
        return False
    event = context.instance.get_latest_materialization_event(context.asset_key)
    materialization = event.asset_materialization if event is not None else None
    if materialization is None:
        return False
    metadata = materialization.metadata
    rows = metadata.get("dagster/row_count", metadata.get("dagster/partition_row_count"))
    return getattr(rows, "value", rows) == 0


def _declared_columns(context: dg.OutputContext) -> list[tuple[str, Kind]] | None:
    """The columns of the output's ``dagster/column_schema`` definition metadata, to create
    the table from when the first output is empty."""
    value = (context.definition_metadata or {}).get("dagster/column_schema")
    schema = getattr(value, "schema", value)
    if not isinstance(schema, dg.TableSchema):
        return None
    declared: list[tuple[str, Kind]] = []
    for column in schema.columns:
        kind = kind_of_declared_type(column.type)
        if kind is None:
            raise ConfigurationError(
                f"column {column.name!r} has type {column.type!r}, which names no column type "
                f"(use one of: {', '.join(POSTGRES_TYPES)}, or PostgreSQL's type names)",
                field="dagster/column_schema",
            )
        declared.append((column.name, kind))
    return declared


def _empty(as_dataframe: bool) -> Any:
    if as_dataframe:
        import pandas as pd

        return pd.DataFrame()
    return []


def _output_metadata(
    result: TableStoreResult,
    selection: PartitionSelection | None,
    mode: Literal["replace", "append"],
) -> dict[str, Any]:
    output: dict[str, Any] = {"dagster/table_name": result.table}
    if result.columns:
        output["dagster/column_schema"] = dg.TableSchema(
            columns=[dg.TableColumn(name, type_) for name, type_ in result.columns]
        )
    if selection is not None:
        output["dagster/partition_row_count"] = result.rows
        output["flowstone/db/partition"] = selection.describe()
    elif mode == "replace":
        output["dagster/row_count"] = result.rows
    output["flowstone/db/rows_replaced"] = result.deleted
    output["flowstone/db/table_created"] = result.created
    return output


class ExternalDbClient(DbClient[TableSession]):
    """Dagster's ``DbClient`` for PostgreSQL and SQLite (see the module docs)."""

    def __init__(
        self, db: Callable[[], ExternalDB], *, write_mode: WriteMode, create_tables: bool
    ) -> None:
        self._db = db
        self._write_mode = write_mode
        self._create_tables = create_tables

    @contextmanager
    def connect(  # type: ignore[override]
        self, context: dg.OutputContext | dg.InputContext, table_slice: TableSlice
    ) -> Iterator[TableSession]:
        yield TableSession(self._db(), table_slice, self._write_mode, self._create_tables)

    def ensure_schema_exists(  # type: ignore[override]
        self, context: dg.OutputContext, table_slice: TableSlice, connection: TableSession
    ) -> None:
        """Nothing yet: the store creates the schema in its own transaction, under the lock
        that keeps two first stores into one new schema from racing."""

    def delete_table_slice(  # type: ignore[override]
        self, context: dg.OutputContext, table_slice: TableSlice, connection: TableSession
    ) -> None:
        """Recorded: the store deletes the slice's rows in the transaction that inserts the new
        ones (unpartitioned ``write_mode="append"`` deletes nothing)."""
        connection.replace = True

    def get_select_statement(self, table_slice: TableSlice) -> str:  # type: ignore[override]
        """The query a user would run for the slice (shown as metadata ``Query``; the
        statements the client runs bind their values)."""
        columns = ", ".join(table_slice.columns) if table_slice.columns else "*"
        statement = f"SELECT {columns} FROM {self.get_table_name(table_slice)}"
        selection = TableSession(self._db(), table_slice, "replace", False).selection(False)
        return statement if selection is None else f"{statement} WHERE {selection.describe()}"

    def get_table_name(self, table_slice: TableSlice) -> str:  # type: ignore[override]
        """``schema.table`` on PostgreSQL, the table (``schema__table`` for a schema) on
        SQLite."""
        return self._db().qualified(table_slice.schema, table_slice.table)
