"""``ExternalDBResource``: an external database as a Dagster resource, in the style of
dagster-duckdb's ``DuckDBResource``, for SQL of your own in assets and ops::

    @dg.asset
    def paid_orders(warehouse: ExternalDBResource) -> None:
        with warehouse.get_connection() as connection:
            connection.cursor().execute("UPDATE orders SET paid = true WHERE paid_at IS NOT NULL")

    database = PostgresConfig(host="db.internal", database="analytics", user="etl",
                              password=dg.EnvVar("WAREHOUSE_PASSWORD"))
    defs = dg.Definitions(
        assets=[paid_orders, ...],
        resources={
            "warehouse": ExternalDBResource(database=database),
            "io_manager": ExternalDBIOManager(database=database),
        },
    )

The resource and the I/O manager run on the same :class:`ExternalDB` code (transactions,
statement timeouts, the error taxonomy, telemetry), each with its own connection.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster.external_db.client import ExternalDB
from flowstone_dagster.external_db.config import (
    DEFAULT_STATEMENT_TIMEOUT,
    PostgresConfig,
    SQLiteConfig,
)
from flowstone_dagster.resilience import ResilienceResource

__all__ = ["ExternalDBResource", "ExternalDBSettings"]


class ExternalDBSettings(dg.Config):
    """The database and how to call it: the fields :class:`ExternalDBResource` and
    :class:`~flowstone_dagster.ExternalDBIOManager` share, and the one :class:`ExternalDB`
    each builds from them (one per process, its connection reused)."""

    database: PostgresConfig | SQLiteConfig = Field(
        discriminator="kind",
        description="The database: postgres (host, port, database, user, password, sslmode, "
        "sslrootcert, connect_timeout) or sqlite (path, busy_timeout).",
    )
    statement_timeout: float | None = Field(
        default=DEFAULT_STATEMENT_TIMEOUT,
        gt=0,
        description="Seconds a statement may run before it is cancelled (CallTimeout). Null: no "
        "limit.",
    )
    service: str | None = Field(
        default=None,
        description="Service name in errors, telemetry and the resilience policy. Null: the "
        "database server, db:postgresql://host:port/database (no user or password) or "
        "db:sqlite:<absolute path>.",
    )
    resilience: ResilienceResource | None = Field(
        default=None,
        description="Retry/breaker/rate-limit policy for each database call (policy `service`), "
        "and whether errors become Dagster control flow (its dagster_errors). Without it, each "
        "call is made once and errors are mapped to Dagster.",
    )

    _client: ExternalDB | None = PrivateAttr(default=None)

    def get_client(self) -> ExternalDB:
        """The :class:`ExternalDB` of this database (one per process, its connection reused)."""
        if self._client is None:
            self._client = ExternalDB.from_config(
                self.database,
                statement_timeout=self.statement_timeout,
                resilience=self.resilience,
                service=self.service,
            )
        return self._client

    def close_client(self) -> None:
        """Close the client's connection (at the end of a run)."""
        if self._client is not None:
            self._client.close()
            self._client = None


class ExternalDBResource(dg.ConfigurableResource, ExternalDBSettings):
    """A PostgreSQL or SQLite database for SQL of your own (``get_connection()``) and for
    :class:`~flowstone_dagster.external_db.client.ExternalDB`'s table and query methods
    (``get_client()``). ``get_connection()`` blocks run once (``resilience`` applies to
    ``get_client()``'s calls)."""

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close_client()

    @contextmanager
    def get_connection(self) -> Iterator[Any]:
        """The database's DB-API connection (psycopg2 or sqlite3) inside one transaction,
        committed when the block ends and rolled back when it raises (see
        :meth:`ExternalDB.connection`)."""
        with self.get_client().connection() as connection:
            yield connection
