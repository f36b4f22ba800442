"""Dagster ``DbTypeHandler``s of :class:`~flowstone_dagster.ExternalDBIOManager`: pandas
DataFrames and lists of dicts, both stored and loaded through the same
:class:`~flowstone_dagster.external_db.db_client.TableSession` (COPY on PostgreSQL)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import dagster as dg

from flowstone_dagster.external_db.dagster_db import DbTypeHandler, TableSlice
from flowstone_dagster.external_db.db_client import TableSession

__all__ = ["DataFrameTypeHandler", "RowsTypeHandler", "default_type_handlers"]


class RowsTypeHandler(DbTypeHandler[list]):
    """``list[dict[str, Any]]``: one dict per row, column name to value."""

    def handle_output(
        self,
        context: dg.OutputContext,
        table_slice: TableSlice,
        obj: list[dict[str, Any]],
        connection: TableSession,
    ) -> Mapping[str, Any]:
        return connection.store(context, obj)

    def load_input(
        self, context: dg.InputContext, table_slice: TableSlice, connection: TableSession
    ) -> list[dict[str, Any]]:
        rows: list[dict[str, Any]] = connection.load(context, as_dataframe=False)
        return rows

    @property
    def supported_types(self) -> Sequence[type[object]]:
        return [list]


class DataFrameTypeHandler(DbTypeHandler[Any]):
    """``pandas.DataFrame``: its dtypes name the columns' types when the table is created."""

    def handle_output(
        self, context: dg.OutputContext, table_slice: TableSlice, obj: Any, connection: TableSession
    ) -> Mapping[str, Any]:
        return connection.store(context, obj)

    def load_input(
        self, context: dg.InputContext, table_slice: TableSlice, connection: TableSession
    ) -> Any:
        return connection.load(context, as_dataframe=True)

    @property
    def supported_types(self) -> Sequence[type[object]]:
        import pandas as pd

        return [pd.DataFrame]


def default_type_handlers() -> list[DbTypeHandler[Any]]:
    """Lists of dicts, and DataFrames when pandas is installed."""
    handlers: list[DbTypeHandler[Any]] = [RowsTypeHandler()]
    try:
        import pandas  # noqa: F401
    except ImportError:
        return handlers
    handlers.append(DataFrameTypeHandler())
    return handlers
