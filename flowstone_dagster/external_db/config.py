"""The database an :class:`~flowstone_dagster.ExternalDBIOManager` or
:class:`~flowstone_dagster.ExternalDB` talks to: :class:`PostgresConfig` or :class:`SQLiteConfig`,
one discriminated union (``kind``), so that the Dagster UI and config errors name exactly the
fields of the chosen database.

In run config the union is a selector keyed by ``kind``::

    resources:
      warehouse:
        config:
          database:
            postgres: {host: db.internal, database: analytics, user: etl,
                       password: {env: WAREHOUSE_PASSWORD}}
"""

from __future__ import annotations

import os
from typing import Literal, cast

import dagster as dg
from pydantic import Field

from flowstone_dagster.external_db.adapters import PostgresAdapter, SQLiteAdapter, is_local_host

__all__ = [
    "DEFAULT_BUSY_TIMEOUT",
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_STATEMENT_TIMEOUT",
    "PostgresConfig",
    "SQLiteConfig",
    "SSLMode",
    "SSLModeSetting",
    "default_sslmode",
]

#: Seconds a statement may run before the database cancels it (``CallTimeout``).
DEFAULT_STATEMENT_TIMEOUT = 300.0
#: Seconds to wait for a PostgreSQL connection to be established.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds a SQLite write waits for another writer's lock.
DEFAULT_BUSY_TIMEOUT = 30.0

SSLMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
#: ``sslmode`` as configured: a libpq mode, or ``auto`` (see :func:`default_sslmode`).
SSLModeSetting = Literal[
    "auto", "disable", "allow", "prefer", "require", "verify-ca", "verify-full"
]


def default_sslmode(host: str, sslmode: SSLModeSetting, sslrootcert: str | None) -> SSLMode:
    """The ``sslmode`` to connect with: the one given, else (``auto``) ``verify-full`` with a CA,
    else
    ``require`` for a server on another machine (encrypted, never a silent fall back to plain
    text), else libpq's ``prefer``."""
    if sslmode != "auto":
        return cast(SSLMode, sslmode)
    if sslrootcert:
        return "verify-full"
    return "prefer" if is_local_host(host) else "require"


def _plain(value: str | None) -> str | None:
    """An ``EnvVar`` not resolved by Dagster (the config used outside a run) read now."""
    return value.get_value() if isinstance(value, dg.EnvVar) else value


class PostgresConfig(dg.Config):
    """A PostgreSQL database, through psycopg2."""

    kind: Literal["postgres"] = Field(default="postgres", description="This is PostgreSQL.")
    host: str = Field(default="localhost", min_length=1, description="Server host.")
    port: int = Field(default=5432, gt=0, le=65535, description="Server port.")
    database: str = Field(min_length=1, description="Database name.")
    user: str = Field(min_length=1, description="User name.")
    password: str | None = Field(
        default=None, repr=False, description="Password. Use EnvVar('...')."
    )
    sslmode: SSLModeSetting = Field(
        default="auto",
        description="libpq sslmode. auto: verify-full when sslrootcert is set, else require for "
        "a server that is not on this machine (prefer for localhost, loopback addresses and "
        "Unix sockets). Set prefer or disable explicitly to opt down.",
    )
    sslrootcert: str | None = Field(
        default=None, description="PEM file of the CAs to trust (verify-ca, verify-full)."
    )
    connect_timeout: float = Field(
        default=DEFAULT_CONNECT_TIMEOUT, gt=0, description="Seconds to connect."
    )

    def adapter(self) -> PostgresAdapter:
        """The adapter that connects to this database."""
        return PostgresAdapter(
            host=self.host,
            port=self.port,
            database=self.database,
            user=self.user,
            password=_plain(self.password),
            sslmode=default_sslmode(self.host, self.sslmode, self.sslrootcert),
            sslrootcert=self.sslrootcert,
            connect_timeout=self.connect_timeout,
        )


class SQLiteConfig(dg.Config):
    """A SQLite database file, through the standard library (created when missing)."""

    kind: Literal["sqlite"] = Field(default="sqlite", description="This is SQLite.")
    path: str = Field(min_length=1, description="The database file (created when missing).")
    busy_timeout: float = Field(
        default=DEFAULT_BUSY_TIMEOUT,
        gt=0,
        description="Seconds a write waits for another writer's lock.",
    )

    def adapter(self) -> SQLiteAdapter:
        """The adapter that opens this file."""
        return SQLiteAdapter(path=os.fspath(self.path), busy_timeout=self.busy_timeout)
