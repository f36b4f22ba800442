"""Dagster's database I/O manager base: the one place this package imports it.

``DbIOManager``, ``DbClient``, ``DbTypeHandler``, ``TableSlice`` and ``TablePartitionDimension``
are what Dagster's own database I/O managers (dagster-duckdb, dagster-snowflake, dagster-gcp) are
built on, and the table, schema and partition rules of ``ExternalDBIOManager`` come from them.
Dagster 1.13 exports them from no public module (dagster-duckdb imports them from this same
path), so the package's rule of public Dagster APIs only has this one, deliberate exception,
kept in this module so that a move in Dagster is a one-line change here.
"""

from dagster._core.storage.db_io_manager import (
    DbClient,
    DbIOManager,
    DbTypeHandler,
    TablePartitionDimension,
    TableSlice,
)

__all__ = ["DbClient", "DbIOManager", "DbTypeHandler", "TablePartitionDimension", "TableSlice"]
