"""Shared state for circuit breakers and rate limiters, chosen by a URL.

Dagster runs each step in its own process, so a breaker or limiter that lives in one process's
memory protects nothing. Their state lives in a :class:`StateStore` that every process opens by
the same URL::

    from flowstone_dagster.resilience import open_store

    store = open_store("sqlite:////var/lib/dagster/flowstone/resilience.sqlite3")
    store = open_store("postgresql://dagster:secret@db:5432/dagster")
    store = open_store("redis://:secret@redis:6379/0")   # needs the [redis] extra
    store = open_store("memory://tests")          # this process only

=====================================  =====================================================
URL                                    atomicity
=====================================  =====================================================
``sqlite:///<absolute path>``          every update is one ``BEGIN IMMEDIATE`` transaction
(default; one machine)                 (WAL journal); reads of a closed breaker are single
                                       ``SELECT`` statements; a deleted or replaced file is
                                       noticed and reopened
``postgresql://user:pw@host/db``       every update is one transaction holding a
(many machines)                        transaction-level advisory lock on the breaker's or
                                       limiter's name; timestamps come from the server's
                                       clock (``clock_timestamp()``), so machines need not
                                       agree on the time
``redis://[:pw@]host:port/db``          limiter reservations and bulkhead leases are Lua
``rediss://...`` (TLS; many machines)  scripts (prune, check, add in one step); a breaker
                                       update is an optimistic ``WATCH``/``MULTI``/``EXEC``
                                       transaction, repeated when another process changed
                                       the breaker; times from the server's clock (``TIME``);
                                       one server or primary (not Redis Cluster)
``memory://`` / ``memory://<name>``    a ``threading.Lock``; one store per name per process
=====================================  =====================================================

**A store is an external dependency too.** Every operation waits at most the call's remaining
deadline (at most :data:`~.base.DEFAULT_STORE_TIMEOUT`, 10 s): SQLite's ``busy_timeout``,
PostgreSQL's ``lock_timeout``, ``statement_timeout``, ``connect_timeout`` and TCP keepalives,
Redis's socket connect and read timeouts (the client's own retries are off).
Every failure raises :class:`~flowstone_dagster.errors.StoreUnavailable` (URL redacted), which
a breaker never counts as a failure of the service.

The default store is private: its directory is created 0700 and its file 0600, and a
directory or file owned by another user is refused (:class:`ConfigurationError` naming the
path and the fix).

:func:`open_store` caches one store per URL per process and is fork-safe: a child process
created by ``fork`` gets fresh stores with their own connections (and an empty memory store).
Connections are per thread. The default URL is :func:`default_store_url`.
"""

from __future__ import annotations

import getpass
import os
import tempfile
import threading
from pathlib import Path
from urllib.parse import urlsplit

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.redaction import redact_url
from flowstone_dagster.resilience.stores.base import (
    CLOSED,
    CLOSED_RECORD,
    DEFAULT_STORE_TIMEOUT,
    HALF_OPEN,
    OPEN,
    BreakerRecord,
    Lease,
    Reservation,
    StateStore,
    operation_timeout,
    window_key,
)
from flowstone_dagster.resilience.stores.memory import MemoryStore
from flowstone_dagster.resilience.stores.postgres import PostgresStore
from flowstone_dagster.resilience.stores.redis import RedisStore, require_redis
from flowstone_dagster.resilience.stores.sqlite import SQLiteStore

__all__ = [
    "CLOSED",
    "CLOSED_RECORD",
    "DEFAULT_STORE_TIMEOUT",
    "HALF_OPEN",
    "OPEN",
    "STORE_URL_ENV",
    "BreakerRecord",
    "Lease",
    "MemoryStore",
    "PostgresStore",
    "RedisStore",
    "Reservation",
    "SQLiteStore",
    "StateStore",
    "check_store_url",
    "close_stores",
    "default_store_url",
    "open_store",
    "operation_timeout",
    "window_key",
]

#: Environment variable that overrides the default store URL of every process.
STORE_URL_ENV = "FLOWSTONE_RESILIENCE_STORE"


def default_store_url() -> str:
    """The store URL used when none is given.

    ``$FLOWSTONE_RESILIENCE_STORE`` when set; otherwise a SQLite file
    ``$DAGSTER_HOME/flowstone/resilience.sqlite3``; without ``DAGSTER_HOME``, the same file in a
    per-user directory under the system's temp dir (``/tmp/flowstone-<user>/``), created
    0700 and refused when another user owns it.
    """
    explicit = os.environ.get(STORE_URL_ENV)
    if explicit:
        return explicit
    return _default_sqlite_url()


def _default_sqlite_url() -> str:
    home = os.environ.get("DAGSTER_HOME")
    if home:
        directory = Path(home).expanduser().resolve() / "flowstone"
    else:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no name for this uid (containers)
            user = str(os.getuid())
        directory = Path(tempfile.gettempdir()) / f"flowstone-{user}"
    return f"sqlite://{directory / 'resilience.sqlite3'}"


def _scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def check_store_url(url: str) -> None:
    """Raise ``ConfigurationError`` for a URL no store can open (nothing is connected)."""
    scheme = _scheme(url)
    if scheme == "sqlite":
        _sqlite_path(url)
    elif scheme in ("redis", "rediss"):
        _redis_url(url)
        require_redis()  # a missing client fails at set-up, naming the extra
    elif scheme not in ("memory", "postgresql", "postgres"):
        raise _unsupported(url)


def _unsupported(url: str) -> ConfigurationError:
    return ConfigurationError(
        f"unsupported resilience store URL {redact_url(url)!r}; "
        "use sqlite:///<path>, postgresql://user:password@host:port/db, "
        "redis://:password@host:port/db or memory://",
        field="store_url",
    )


def _sqlite_path(url: str) -> Path:
    raw = url[len("sqlite://") :]
    if not raw.startswith("/") or raw.strip("/") in ("", ":memory:"):
        raise ConfigurationError(
            f"{url!r} is not a SQLite file URL; use sqlite:///<absolute path> "
            "(for example sqlite:////var/lib/dagster/resilience.sqlite3) or memory://",
            field="store_url",
        )
    return Path("/" + raw.lstrip("/"))


def _redis_url(url: str) -> None:
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError as exc:
        raise ConfigurationError(
            f"{redact_url(url)!r} is not a Redis URL ({exc})", field="store_url"
        ) from None
    if not parts.hostname:
        raise ConfigurationError(
            f"{redact_url(url)!r} names no host; use redis://:password@host:6379/0",
            field="store_url",
        )


def _create(url: str) -> StateStore:
    scheme = _scheme(url)
    if scheme == "memory":
        return MemoryStore(url)
    if scheme == "sqlite":
        # The default location is ours alone: its directory's owner and mode are checked.
        private = url == _default_sqlite_url() and not os.environ.get(STORE_URL_ENV)
        return SQLiteStore(url, _sqlite_path(url), private_directory=private)
    if scheme in ("postgresql", "postgres"):
        return PostgresStore(url)
    if scheme in ("redis", "rediss"):
        _redis_url(url)
        return RedisStore(url)
    raise _unsupported(url)


_stores: dict[str, StateStore] = {}
_stores_lock = threading.Lock()


def open_store(url: str | None = None) -> StateStore:
    """The process's store for ``url`` (default :func:`default_store_url`), opened once.

    ::

        store = open_store("memory://my-test")
        assert open_store("memory://my-test") is store

    Raises :class:`~flowstone_dagster.errors.ConfigurationError` for an unknown scheme.
    """
    if url is None:
        url = default_store_url()
    store = _stores.get(url)
    if store is not None:
        return store
    with _stores_lock:
        store = _stores.get(url)
        if store is None:
            store = _stores[url] = _create(url)
        return store


def close_stores() -> None:
    """Close and forget every store this process opened (tests and shutdown)."""
    with _stores_lock:
        stores = list(_stores.values())
        _stores.clear()
    for store in stores:
        store.close()


#: Stores inherited from a parent process: kept referenced, never used or closed, so that the
#: parent's connections are not torn down from the child.
_inherited: list[StateStore] = []


def _after_fork_in_child() -> None:
    global _stores_lock  # noqa: PLW0603 - a lock held at fork time must not be inherited
    _stores_lock = threading.Lock()
    _inherited.extend(_stores.values())
    _stores.clear()


os.register_at_fork(after_in_child=_after_fork_in_child)
