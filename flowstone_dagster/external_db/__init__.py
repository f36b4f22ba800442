"""External SQL databases (PostgreSQL, SQLite): asset tables per partition, and custom SQL.

- :mod:`.client`: :class:`ExternalDB` (transactions, COPY, schema checks; testable without
  Dagster);
- :mod:`.io_manager`: :class:`ExternalDBIOManager`, the Dagster I/O manager, on Dagster's
  ``DbIOManager`` (:mod:`.db_client`, :mod:`.type_handlers`; :mod:`.dagster_db` imports the base);
- :mod:`.resource`: :class:`ExternalDBResource`, the database as a resource (``get_connection()``);
- :mod:`.config`: :class:`PostgresConfig` / :class:`SQLiteConfig`, the database to use;
- :mod:`.adapters`: one adapter per database; :mod:`.types`: column types and values;
  :mod:`.partitions`: partition bounds; :mod:`.errors`: :class:`DatabaseError` and its kinds.

The guide is ``docs/external_db.md``.
"""

from flowstone_dagster.external_db.client import ExternalDB, TableStoreResult
from flowstone_dagster.external_db.config import PostgresConfig, SQLiteConfig
from flowstone_dagster.external_db.errors import (
    ConstraintViolation,
    DatabaseError,
    InvalidValue,
    SchemaMismatch,
)
from flowstone_dagster.external_db.io_manager import ExternalDBIOManager
from flowstone_dagster.external_db.resource import ExternalDBResource

__all__ = [
    "ConstraintViolation",
    "DatabaseError",
    "ExternalDB",
    "ExternalDBIOManager",
    "ExternalDBResource",
    "InvalidValue",
    "PostgresConfig",
    "SQLiteConfig",
    "SchemaMismatch",
    "TableStoreResult",
]
