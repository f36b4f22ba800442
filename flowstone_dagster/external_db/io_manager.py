"""``ExternalDBIOManager``: asset tables in PostgreSQL or SQLite, per partition, built on
Dagster's ``DbIOManager`` (the guide is ``docs/external_db.md``)."""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any, TypeVar, cast

import dagster as dg
from pydantic import Field

from flowstone_dagster import telemetry
from flowstone_dagster.external_db.client import ExternalDB, WriteMode
from flowstone_dagster.external_db.config import (
    PostgresConfig,
)
from flowstone_dagster.external_db.dagster_db import (
    DbIOManager,
    DbTypeHandler,
    TablePartitionDimension,
    TableSlice,
)
from flowstone_dagster.external_db.db_client import ExternalDbClient
from flowstone_dagster.external_db.partitions import check_partition_expr
from flowstone_dagster.external_db.resource import ExternalDBSettings
from flowstone_dagster.external_db.type_handlers import default_type_handlers
from flowstone_dagster.resilience import resolve

__all__ = ["ExternalDBIOManager"]

T = TypeVar("T")


def _origin(annotation: Any) -> Any:
    """``list`` for ``list[dict[str, Any]]`` (``issubclass`` refuses parameterized generics,
    which Dagster's ``DbIOManager`` passes it as they are)."""
    return typing.get_origin(annotation) or annotation


class _DbIOManager(DbIOManager):
    """Dagster's ``DbIOManager``, with what its users rely on and it lacks: ``-> None`` assets
    store nothing, annotations such as ``list[dict[str, Any]]``, inputs whose partition mapping
    maps to no upstream partition (an empty value, also for multi-partitions), clear
    ``partition_expr`` errors, telemetry and the one mapping of errors to Dagster."""

    def __init__(
        self,
        *,
        type_handlers: list[DbTypeHandler[Any]],
        db_client: ExternalDbClient,
        database: str,
        schema: str | None,
        write_mode: WriteMode,
        dagster_errors: Callable[[Callable[[], Any]], Any],
    ) -> None:
        super().__init__(
            type_handlers=type_handlers,
            db_client=db_client,
            database=database,
            schema=schema,
            io_manager_name="ExternalDBIOManager",
            default_load_type=list,
        )
        self._write_mode = write_mode
        self._dagster_errors = dagster_errors

    def _check_supported_type(self, obj_type: Any) -> None:
        super()._check_supported_type(_origin(obj_type))

    def _resolve_handler(self, obj_type: type) -> DbTypeHandler[Any]:
        return super()._resolve_handler(_origin(obj_type))

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is None and context.dagster_type.typing_type is type(None):
            return  # an asset annotated "-> None" stores nothing
        metadata = context.definition_metadata or {}
        if context.has_asset_key:
            check_partition_expr(context, metadata.get("partition_expr"))
        with telemetry.observe(context, attach_metadata=False) as calls:
            self._dagster_errors(lambda: super(_DbIOManager, self).handle_output(context, obj))
        totals = calls.metadata()
        mode = metadata.get("write_mode") or self._write_mode
        if context.has_asset_partitions or mode == "replace":
            # The same number as dagster/(partition_)row_count, under the key the UI shows.
            totals.pop("flowstone/db.store/rows", None)
        context.add_output_metadata(totals)

    def load_input(self, context: dg.InputContext) -> object:
        upstream = context.upstream_output
        metadata = (upstream.definition_metadata if upstream is not None else None) or {}
        if context.has_asset_key:
            check_partition_expr(context, metadata.get("partition_expr"))
        # Dagster takes input metadata for one partition only; several are still logged.
        single = not context.has_asset_partitions or len(context.asset_partition_keys) == 1
        with telemetry.observe(context, attach_metadata=single):
            return self._dagster_errors(lambda: self._load(context, metadata))

    def _load(self, context: dg.InputContext, metadata: Any) -> object:
        definition = context.asset_partitions_def if context.has_asset_partitions else None
        if isinstance(definition, dg.MultiPartitionsDefinition) and not (
            context.asset_partition_keys
        ):
            return self._load_no_partition(context, definition, metadata)
        return super().load_input(context)

    def _load_no_partition(
        self, context: dg.InputContext, definition: dg.MultiPartitionsDefinition, metadata: Any
    ) -> object:
        """An empty value with the table's columns: the input maps to no upstream partition
        (a self-dependent asset's first partition, a mapping with no upstream key). Dagster's
        own slice fails for multi-partitions here (it needs a key range), so the slice is built
        by its rules: schema from metadata, then config, then the key's prefix."""
        path = context.asset_key.path
        schema = metadata.get("schema") or self._schema
        if not schema:
            schema = path[-2] if len(path) > 1 else "public"
        expressions = metadata["partition_expr"]
        table_slice = TableSlice(
            table=path[-1],
            schema=schema,
            database=self._database,
            columns=(context.definition_metadata or {}).get("columns"),
            partition_dimensions=[
                TablePartitionDimension(expressions[d.name], []) for d in definition.partitions_defs
            ],
        )
        load_type = context.dagster_type.typing_type
        if load_type is Any:
            load_type = self._default_load_type
        self._check_supported_type(load_type)
        with self._db_client.connect(context, table_slice) as session:
            return self._resolve_handler(cast(type, load_type)).load_input(
                context, table_slice, session
            )


class ExternalDBIOManager(dg.ConfigurableIOManagerFactory, ExternalDBSettings):
    """Stores each asset or op output as rows of a table and loads inputs from it, through
    Dagster's ``DbIOManager`` (the rules of dagster-duckdb, dagster-snowflake and dagster-gcp).

    ``database`` is a :class:`PostgresConfig` or a :class:`SQLiteConfig`::

        ExternalDBIOManager(database=PostgresConfig(host="db.internal", database="analytics",
                                                    user="etl", password=dg.EnvVar("PGPASSWORD")))
        ExternalDBIOManager(database=SQLiteConfig(path="/data/warehouse.sqlite3"))

    The table is the asset key's last part (an op output: metadata ``table``, else the output's
    name), in the schema named by metadata ``schema``, else the ``schema`` field, else the key's
    prefix, else ``public`` (SQLite has no schemas: the schema prefixes the table's name,
    ``sales__orders``). Definition metadata: ``partition_expr`` (the column holding the
    partition; for multi-partitions ``{dimension: column}``), ``write_mode``; input metadata
    ``columns`` loads only those columns. Outputs and inputs are pandas DataFrames or lists of
    dicts (the default for unannotated inputs).

    Output metadata (one key per fact; the table is in ``docs/external_db.md``):
    ``dagster/table_name``, ``dagster/column_schema``, ``dagster/partition_row_count``
    (partitioned) or ``dagster/row_count`` (unpartitioned replace), ``Query``,
    ``flowstone/db/partition``, ``flowstone/db/rows_replaced``, ``flowstone/db/table_created``
    and the step's ``flowstone/db.store/...`` telemetry totals (``flowstone/db.store/rows`` only
    for appends, where no Dagster key holds the row count).
    """

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

    @property
    def db(self) -> ExternalDB:
        """The :class:`ExternalDB` this manager stores through (one per process)."""
        return self.get_client()

    def teardown_after_execution(self, context: dg.InitResourceContext) -> None:
        self.close_client()

    def _dagster_errors(self, call: Callable[[], T]) -> T:
        """The one mapping to Dagster (``resolve(resilience).dagster_retries``): an open circuit
        becomes RetryRequested, a failure Failure(allow_retries=<retryable>), unless the
        resilience resource's ``dagster_errors`` is off."""
        with resolve(self.resilience).dagster_retries(service=self.db.service):
            return call()

    def create_io_manager(self, context: dg.InitResourceContext) -> dg.IOManager:
        database = self.database
        return _DbIOManager(
            type_handlers=default_type_handlers(),
            db_client=ExternalDbClient(
                lambda: self.db, write_mode=self.write_mode, create_tables=self.create_tables
            ),
            database=database.database if isinstance(database, PostgresConfig) else database.path,
            schema=self.schema_,
            write_mode=self.write_mode,
            dagster_errors=self._dagster_errors,
        )
