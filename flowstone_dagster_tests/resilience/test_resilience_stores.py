"""Store URLs, the default store, the per-process cache and fork safety."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.http import redact_url
from flowstone_dagster.resilience import (
    CircuitBreaker,
    MemoryStore,
    PostgresStore,
    RateLimiter,
    RedisStore,
    SQLiteStore,
    default_store_url,
    open_store,
)
from flowstone_dagster.resilience.stores import STORE_URL_ENV
from flowstone_dagster_tests.support.postgres import PostgresCluster


def test_store_kinds_by_url(tmp_path: Path) -> None:
    assert isinstance(open_store("memory://"), MemoryStore)
    sqlite = open_store(f"sqlite://{tmp_path / 'a' / 'state.sqlite3'}")
    assert isinstance(sqlite, SQLiteStore)
    assert sqlite.path == tmp_path / "a" / "state.sqlite3"
    assert not sqlite.path.exists()  # opened on first use: a store down at set-up is no error
    sqlite.read_breaker("x")
    assert sqlite.path.exists()
    # SQLAlchemy's four-slash spelling of an absolute path works too.
    four = open_store(f"sqlite:///{tmp_path / 'b.sqlite3'}")
    assert isinstance(four, SQLiteStore)
    assert four.path == tmp_path / "b.sqlite3"


def test_open_store_is_cached_per_url() -> None:
    name = uuid.uuid4().hex
    assert open_store(f"memory://{name}") is open_store(f"memory://{name}")
    assert open_store(f"memory://{name}") is not open_store(f"memory://{name}-other")


@pytest.mark.parametrize(
    "url",
    ["redis:///no-host", "sqlite://relative/path.db", "sqlite:///:memory:", "nonsense"],
)
def test_unsupported_urls_name_the_field(url: str) -> None:
    with pytest.raises(ConfigurationError, match="store_url"):
        open_store(url)


def test_passwords_never_show() -> None:
    assert redact_url("postgresql://dagster:s3cret@db:5432/dagster") == (
        "postgresql://dagster:***@db:5432/dagster"
    )
    with pytest.raises(ConfigurationError) as caught:
        open_store("mysql://root:s3cret@db/x")
    assert "s3cret" not in str(caught.value)


@pytest.mark.postgres
def test_postgres_store_repr_hides_the_password(postgres: PostgresCluster) -> None:
    store = open_store(postgres.url)
    assert isinstance(store, PostgresStore)
    assert postgres.password not in repr(store)
    assert postgres.password not in repr(CircuitBreaker("x", store=store))


@pytest.mark.redis
def test_redis_store_by_url_hides_the_password(redis_url: str) -> None:
    store = open_store(redis_url)
    assert isinstance(store, RedisStore)
    assert open_store("rediss://:s3cret@redis.example:6380/1").url.startswith("rediss://")
    assert "s3cret" not in repr(open_store("rediss://:s3cret@redis.example:6380/1"))
    store.read_breaker("x")  # connects


def test_a_missing_redis_client_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "redis", None)  # import redis raises ImportError
    with pytest.raises(ImportError, match=r"\[redis\] extra"):
        open_store(f"redis://127.0.0.1:1/{uuid.uuid4().int % 16}")


def test_default_store_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(STORE_URL_ENV, raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert default_store_url() == f"sqlite://{tmp_path}/flowstone/resilience.sqlite3"
    monkeypatch.delenv("DAGSTER_HOME")
    url = default_store_url()
    assert url.startswith("sqlite:///")
    assert url.endswith("/resilience.sqlite3")
    assert "flowstone-" in url
    monkeypatch.setenv(STORE_URL_ENV, "memory://everything")
    assert default_store_url() == "memory://everything"
    assert CircuitBreaker("x").store is open_store("memory://everything")


def _in_child(work: object) -> int:
    """Run ``work()`` in a forked child; its exit status (0 when it returned True)."""
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            code = 0 if work() else 1  # type: ignore[operator]
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


@pytest.mark.multiprocess
@pytest.mark.parametrize(
    "kind",
    [
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
        pytest.param("redis", marks=pytest.mark.redis),
    ],
)
def test_stores_survive_fork(kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    if kind == "sqlite":
        url = f"sqlite://{tmp_path / 'fork.sqlite3'}"
    elif kind == "redis":
        url = request.getfixturevalue("redis_url")
    else:
        url = request.getfixturevalue("pg_database").url
    name = f"forked-{uuid.uuid4().hex[:8]}"
    parent_store = open_store(url)
    breaker = CircuitBreaker(name, threshold=100, store=parent_store)
    limiter = RateLimiter(name, limit=100, period=60, store=parent_store)
    limiter.acquire()
    with pytest.raises(ConnectionError):
        breaker.call(_down)

    def child() -> bool:
        # Both the inherited objects and a freshly opened store work in the child ...
        assert open_store(url) is not parent_store
        with pytest.raises(ConnectionError):
            breaker.call(_down)
        limiter.acquire()
        return CircuitBreaker(name, threshold=100, store=url).status().failures == 2

    assert _in_child(child) == 0
    # ... and the parent's own connection was not disturbed by the child.
    with pytest.raises(ConnectionError):
        breaker.call(_down)
    assert breaker.status().failures == 3
    assert limiter.usage() == 2


def _down() -> None:
    raise ConnectionError("down")
