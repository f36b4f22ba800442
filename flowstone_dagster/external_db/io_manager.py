"""``ExternalDBIOManager``: asset tables in PostgreSQL or SQLite, per partition, through
:class:`~flowstone_dagster.external_db.client.ExternalDB` (the guide is
``docs/external_db.md``)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import dagster as dg
from pydantic import Field, PrivateAttr

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.external_db.adapters import UNDEFINED_TABLE
from flowstone_dagster.external_db.client import ExternalDB, WriteMode
from flowstone_dagster.external_db.config import (
    DEFAULT_STATEMENT_TIMEOUT,
    PostgresConfig,
    SQLiteConfig,
)
from flowstone_dagster.external_db.errors import DatabaseError
from flowstone_dagster.external_db.partitions import select_partitions
from flowstone_dagster.formats import wants_dataframe
from flowstone_dagster.resilience import ResilienceResource, resolve

__all__ = ["ExternalDBIOManager"]

T = TypeVar("T")


class ExternalDBIOManager(dg.ConfigurableIOManager):
    """Stores each asset output as rows of a table and loads inputs from it.

    ``database`` is a :class:`PostgresConfig` or a :class:`SQLiteConfig`::

        ExternalDBIOManager(database=PostgresConfig(host="db.internal", database="analytics",
                                                    user="etl", password=dg.EnvVar("PGPASSWORD")))
        ExternalDBIOManager(database=SQLiteConfig(path="/data/warehouse.sqlite3"))

    The table is the asset key's last part, in the schema named by metadata ``schema``, else
    the ``schema`` field, else the key's prefix (the part before the last), else ``public``
    (SQLite has no schemas: the schema prefixes the table's name, ``sales__orders``). Asset
    definition metadata overrides: ``table``, ``schema``, ``partition_expr`` (the column holding the
    partition; for multi-partitions ``{dimension: column}``) and ``write_mode``.

    Output metadata (one key per fact; the table is in ``docs/external_db.md``):
    ``dagster/table_name``, ``dagster/column_schema``, ``dagster/partition_row_count``
    (partitioned) or ``dagster/row_count`` (unpartitioned replace), ``flowstone/db/partition``,
    ``flowstone/db/rows_replaced``, ``flowstone/db/table_created`` and the step's
    ``flowstone/db.store/...`` telemetry totals (``flowstone/db.store/rows`` only for appends,
    where no Dagster key holds the row count).
    """

    database: PostgresConfig | SQLiteConfig = Field(
        discriminator="kind",
        description="The database: postgres (host, port, database, user, password, sslmode, "
        "sslrootcert, connect_timeout) or sqlite (path, busy_timeout).",
    )
    schema_: str | None = Field(
        default=None,
        alias="schema",
        description="Schema of tables without metadata `schema` (before the asset key's "
        "prefix; default public); created when missing. SQLite: a prefix of the table name.",
    )
    write_mode: WriteMode = Field(
        default="replace",
        description="Unpartitioned outputs: replace the table's rows, or append to them. "
        "Partitioned outputs always replace their partition's rows.",
    )
    create_tables: bool = Field(
        default=True,
        description="Create a missing table from the data's types; if false a missing table is "
        "an error.",
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

    _db: ExternalDB | None = PrivateAttr(default=None)

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    @property
    def db(self) -> ExternalDB:
        """The :class:`ExternalDB` this manager stores through (one per process)."""
        if self._db is None:
            self._db = ExternalDB.from_config(
                self.database,
                statement_timeout=self.statement_timeout,
                resilience=self.resilience,
                service=self.service,
            )
        return self._db

    def _table(self, asset_key: dg.AssetKey, metadata: Mapping[str, Any]) -> tuple[str | None, str]:
        table = metadata.get("table") or asset_key.path[-1]
        schema = metadata.get("schema") or self.schema_
        if schema is None and len(asset_key.path) > 1:
            schema = asset_key.path[-2]
        for field, value in (("table", table), ("schema", schema)):
            if value is not None and not isinstance(value, str):
                raise ConfigurationError(f"must be a string, got {value!r}", field=field)
        return schema, str(table)

    def _dagster_errors(self, call: Callable[[], T]) -> T:
        """The one mapping to Dagster (``resolve(resilience).dagster_retries``): an open circuit
        becomes RetryRequested, a failure Failure(allow_retries=<retryable>), unless the
        resilience resource's ``dagster_errors`` is off."""
        with resolve(self.resilience).dagster_retries(service=self.db.service):
            return call()

    def handle_output(self, context: dg.OutputContext, obj: Any) -> None:
        if obj is None and context.dagster_type.typing_type is type(None):
            return  # an asset annotated "-> None" stores nothing
        metadata = context.definition_metadata or {}
        schema, table = self._table(context.asset_key, metadata)
        selection = select_partitions(context, metadata.get("partition_expr"))
        mode = metadata.get("write_mode") or self.write_mode
        with telemetry.observe(context, attach_metadata=False) as calls:
            result = self._dagster_errors(
                lambda: self.db.store_table(
                    table,
                    obj,
                    schema=schema,
                    mode=mode,
                    selection=selection,
                    create=self.create_tables,
                )
            )
        output: dict[str, Any] = {"dagster/table_name": result.table}
        if result.columns:
            output["dagster/column_schema"] = dg.TableSchema(
                columns=[dg.TableColumn(name, type_) for name, type_ in result.columns]
            )
        totals = calls.metadata()
        if selection is not None:
            output["dagster/partition_row_count"] = result.rows
            output["flowstone/db/partition"] = selection.describe()
        elif mode == "replace":
            output["dagster/row_count"] = result.rows
        if "dagster/partition_row_count" in output or "dagster/row_count" in output:
            # The same number, under the Dagster key the UI shows.
            totals.pop("flowstone/db.store/rows", None)
        output["flowstone/db/rows_replaced"] = result.deleted
        output["flowstone/db/table_created"] = result.created
        context.add_output_metadata({**output, **totals})

    def load_input(self, context: dg.InputContext) -> Any:
        upstream = context.upstream_output
        metadata = (upstream.definition_metadata if upstream is not None else None) or {}
        schema, table = self._table(context.asset_key, metadata)
        selection = select_partitions(context, metadata.get("partition_expr"))
        as_dataframe = wants_dataframe(context)
        # Dagster takes input metadata for one partition only; several are still logged.
        single = not context.has_asset_partitions or len(context.asset_partition_keys) == 1

        def load() -> Any:
            try:
                return self.db.load_table(
                    table, schema=schema, selection=selection, as_dataframe=as_dataframe
                )
            except DatabaseError as exc:
                if exc.sqlstate != UNDEFINED_TABLE:
                    raise
                raise DatabaseError(
                    f"no table for asset {context.asset_key.to_user_string()}: {exc.message}",
                    sqlstate=exc.sqlstate,
                    table=exc.table,
                    service=exc.service,
                ) from None

        with telemetry.observe(context, attach_metadata=single):
            return self._dagster_errors(load)
