"""The store is an external dependency: its failures, waits, replacement and privacy."""

from __future__ import annotations

import logging
import multiprocessing
import os
import pwd
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import dagster as dg
import psycopg2
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, StoreUnavailable, TransportError
from flowstone_dagster.resilience import (
    CircuitBreaker,
    CircuitBreakerConfig,
    RateLimitConfig,
    RateLimiter,
    ResilienceResource,
    RetryConfig,
    ServicePolicy,
    close_stores,
    default_store_url,
    open_store,
    state,
)
from flowstone_dagster_tests import resilience_jobs
from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.postgres import PostgresCluster
from flowstone_dagster_tests.support.redis import RedisServer


class Service:
    """Counts its calls; fails with ``error`` when given."""

    def __init__(self, error: BaseException | None = None) -> None:
        self.calls = 0
        self.error = error

    def __call__(self) -> str:
        self.calls += 1
        if self.error is not None:
            raise self.error
        return "ok"


def unreachable_postgres() -> str:
    return f"postgresql://flowstone:secret-pw@127.0.0.1:{free_port()}/postgres"


def guarded(store_url: str, **policy: object) -> ResilienceResource:
    return ResilienceResource(
        store_url=store_url,
        policies={
            "svc": ServicePolicy(
                retry=RetryConfig(max_attempts=3, base_delay=0.01, deadline=2.0),
                circuit_breaker=CircuitBreakerConfig(threshold=2),
                rate_limit=RateLimitConfig(limit=100, period=1.0),
                **policy,  # type: ignore[arg-type]
            )
        },
        store_retry_after=1,
        step_max_retries=6,
    )


# -- a store error is the store's, never the service's -------------------------------------------


def test_an_unreachable_store_raises_store_unavailable_and_calls_nothing() -> None:
    url = unreachable_postgres()
    service = Service()
    with pytest.raises(StoreUnavailable) as caught:
        guarded(url).call("svc", service, dagster_errors=False)
    assert service.calls == 0
    assert "secret-pw" not in str(caught.value)
    assert "127.0.0.1" in caught.value.store
    # In Dagster it is a step retry, not a failure.
    with pytest.raises(dg.RetryRequested) as retry:
        guarded(url).call("svc", service)
    assert retry.value.seconds_to_wait == 1
    assert "secret-pw" not in repr(retry.value.__cause__)


@pytest.mark.postgres
def test_a_dropped_table_is_recreated_and_never_opens_the_circuit(
    pg_database: PostgresCluster,
) -> None:
    resource = guarded(pg_database.url)
    service = Service()
    assert resource.call("svc", service) == "ok"
    with psycopg2.connect(pg_database.dsn) as connection, connection.cursor() as cursor:
        cursor.execute("DROP TABLE flowstone_limiter_log")
    for _ in range(5):
        assert resource.call("svc", service) == "ok"
    assert service.calls == 6
    status = state("svc", store=pg_database.url)
    assert (status.state, status.failures) == ("closed", 0)


def test_local_fallback_goes_on_with_a_warning_once(
    caplog: pytest.LogCaptureFixture, events: list[telemetry.TelemetryEvent]
) -> None:
    url = unreachable_postgres()
    resource = guarded(url, on_store_error="local")
    service = Service()
    with caplog.at_level(logging.WARNING, logger="flowstone_dagster"):
        assert resource.call("svc", service, dagster_errors=False) == "ok"
        assert resource.call("svc", service, dagster_errors=False) == "ok"
    assert service.calls == 2
    warnings = [r for r in caplog.records if "on_store_error='local'" in r.getMessage()]
    assert len(warnings) == 1
    assert "secret-pw" not in caplog.text
    degraded = [e for e in events if e.name == "flowstone.store.degraded"]
    assert len(degraded) == 1  # the WARNING event, once per process
    calls = [e for e in events if e.name == "flowstone.resilience.call"]
    assert all(e.measures.get("store_degraded") == 1 for e in calls)


@pytest.mark.dagster
def test_local_fallback_shows_in_the_materialization_metadata() -> None:
    url = unreachable_postgres()

    @dg.asset
    def degraded(context, resilience: ResilienceResource) -> str:  # type: ignore[no-untyped-def]
        with telemetry.observe(context):
            return resilience.call("svc", Service())

    result = dg.materialize(
        [degraded], resources={"resilience": guarded(url, on_store_error="local")}
    )
    metadata = result.asset_materializations_for_node("degraded")[0].metadata
    assert metadata["flowstone/store_degraded"].value is True


@pytest.mark.postgres
@pytest.mark.dagster
def test_a_store_restarted_inside_a_step_becomes_step_retries(tmp_path: Path) -> None:
    """The measured defect: a 3 s PostgreSQL restart failed the step for good."""
    with PostgresCluster.start() as cluster:
        marker = tmp_path / "stopped"
        service_calls = tmp_path / "calls"

        def service() -> str:
            with service_calls.open("a") as calls:
                calls.write("1\n")
            return "ok"

        @dg.asset(retry_policy=dg.RetryPolicy(max_retries=6, delay=1))
        def uses_the_store(resilience: ResilienceResource) -> str:
            if not marker.exists():
                marker.write_text("x")
                resilience.call("svc", service)  # the store works ...
                cluster.stop()  # ... and goes away for 3 s
                threading.Timer(3.0, cluster.restart).start()
            return resilience.call("svc", service)

        resource = guarded(cluster.url)
        result = dg.materialize(
            [uses_the_store],
            resources={"resilience": resource},
            raise_on_error=False,
        )
        retries = [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
        failures = [str(e.step_failure_data.error) for e in result.all_events if e.is_step_failure]
        assert result.success, failures
        assert len(retries) >= 1
        assert service_calls.read_text().count("1") == 2  # never called while the store was down
        close_stores()
        status = state("svc", store=cluster.url)
        assert (status.state, status.failures) == ("closed", 0)


@pytest.mark.redis
def test_a_stopped_redis_is_store_unavailable_never_a_breaker_failure(
    events: list[telemetry.TelemetryEvent],
) -> None:
    with RedisServer.start() as server:
        resource = guarded(server.url)
        service = Service()
        assert resource.call("svc", service, dagster_errors=False) == "ok"
        server.stop()
        for _ in range(3):  # more than the breaker's threshold (2)
            with pytest.raises(StoreUnavailable) as caught:
                resource.call("svc", service, dagster_errors=False)
            assert caught.value.store == server.url
        assert service.calls == 1  # never called while the store was down
        with pytest.raises(dg.RetryRequested):
            resource.call("svc", service)
        assert not [e for e in events if e.name == "flowstone.circuit.transition"]
        server.restart()
        assert resource.call("svc", service, dagster_errors=False) == "ok"
        status = state("svc", store=server.url)
        assert (status.state, status.failures) == ("closed", 0)


@pytest.mark.redis
def test_redis_restarted_under_load_admits_no_more_than_the_limit_afterwards() -> None:
    limit, period = 10, 0.2
    admitted: list[tuple[float, float]] = []
    outages: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()
    with RedisServer.start() as server:
        limiter = RateLimiter("hammered", limit, period, max_wait=5.0, store=server.url)

        def hammer() -> None:
            while not stop.is_set():
                try:
                    at = limiter.acquire(1)
                except StoreUnavailable as exc:
                    with lock:
                        outages.append(exc.operation)
                    time.sleep(0.01)
                    continue
                with lock:
                    admitted.append((at, 1.0))

        workers = [threading.Thread(target=hammer) for _ in range(4)]
        for worker in workers:
            worker.start()
        try:
            time.sleep(0.5)
            server.stop()
            time.sleep(0.3)
            server.restart()
            restarted = time.time()
            time.sleep(1.0)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=30)
    assert outages, "the workers saw the store go away"
    after = sorted(at for at, _ in admitted if at >= restarted)
    assert len(after) >= limit, "the limiter admitted calls again after the restart"
    j = 0
    for i, start in enumerate(after):
        while j < len(after) and after[j] < start + period:
            j += 1
        assert j - i <= limit, f"{j - i} admissions in [{start}, {start + period})"


# -- every wait on the store is bounded by the call's deadline -----------------------------------


@pytest.mark.postgres
def test_a_held_postgres_lock_waits_no_longer_than_the_deadline(
    pg_database: PostgresCluster,
) -> None:
    resource = guarded(pg_database.url)
    assert resource.call("svc", Service(), dagster_errors=False) == "ok"  # tables exist
    holder = psycopg2.connect(pg_database.dsn)
    try:
        with holder.cursor() as cursor:
            cursor.execute(
                "BEGIN; SELECT pg_advisory_xact_lock(hashtextextended('flowstone.limiter:svc', 0))"
            )
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="timeout"):
            resource.call("svc", Service(), dagster_errors=False)
        waited = time.monotonic() - started
    finally:
        holder.close()
    assert 1.5 <= waited < 5.0  # the retry deadline (2 s), not the holder's 25 s


def test_a_locked_sqlite_store_waits_no_longer_than_the_deadline(tmp_path: Path) -> None:
    url = f"sqlite://{tmp_path / 'store.sqlite3'}"
    resource = guarded(url)
    assert resource.call("svc", Service(), dagster_errors=False) == "ok"
    holder = sqlite3.connect(tmp_path / "store.sqlite3", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            resource.call("svc", Service(), dagster_errors=False)
        waited = time.monotonic() - started
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 1.5 <= waited < 5.0


def test_the_retry_deadline_never_cuts_a_running_attempt_short() -> None:
    resource = ResilienceResource(
        store_url="memory://deadline",
        policies={"long": ServicePolicy(retry=RetryConfig(deadline=0.2), timeout=5.0)},
    )

    def long_call() -> float:
        time.sleep(0.5)
        from flowstone_dagster.resilience import current_deadline

        deadline = current_deadline()
        assert deadline is not None
        return deadline.seconds

    assert resource.call("long", long_call) == 5.0  # the attempt saw its timeout, not 0.2 s


# -- a replaced SQLite file is noticed -----------------------------------------------------------


def test_a_deleted_sqlite_store_is_reopened_with_a_warning(
    tmp_path: Path, events: list[telemetry.TelemetryEvent]
) -> None:
    path = tmp_path / "store.sqlite3"
    url = f"sqlite://{path}"
    breaker = CircuitBreaker("svc-deleted", threshold=1, timeout=300, store=url)
    with pytest.raises(TransportError):
        breaker.call(Service(TransportError("down")))
    other = sqlite3.connect(path)  # another process's view: the same file
    assert other.execute("SELECT state FROM flowstone_breakers").fetchone() == ("open",)
    other.close()
    for suffix in ("", "-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)
    assert breaker.status().state == "closed"  # the new file: state starts afresh ...
    assert path.exists()  # ... in the file at the path, which every process now shares
    assert [e.name for e in events].count("flowstone.store.reopened") == 1


@pytest.mark.multiprocess
def test_processes_never_split_when_the_sqlite_store_is_deleted(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    url = f"sqlite://{path}"
    name, limit, period = f"split-{uuid.uuid4().hex[:6]}", 20, 1.0
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=4, mp_context=context) as pool:
        list(pool.map(time.sleep, [0.2] * 4))
        start_at = time.time() + 0.5
        futures = [
            pool.submit(
                resilience_jobs.hammer_limiter,
                url,
                name=name,
                limit=limit,
                period=period,
                duration=5.0,
                start_at=start_at,
                seed=seed,
            )
            for seed in range(4)
        ]
        time.sleep(max(start_at + 1.5 - time.time(), 0))
        deleted_at = time.time()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)
        admitted = sorted(
            (at, cost) for future in futures for at, cost, _, _ in future.result(timeout=60)
        )
    # Once every process has noticed (one window after the deletion), no window holds more
    # than the limit: a split would admit the limit once per file.
    settled = [(at, cost) for at, cost in admitted if at >= deleted_at + period + 0.2]
    # About two settled windows' worth of units (costs are 1 or 3, so count units, not calls):
    # enough that a split, admitting the limit once per file, would show.
    assert sum(cost for _, cost in settled) > 1.5 * limit
    for i, (start, _) in enumerate(settled):
        in_window = sum(c for at, c in settled[i:] if at < start + period)
        assert in_window <= limit, f"{in_window} units in the window from {start}"


# -- the default store is private ----------------------------------------------------------------


def test_the_default_store_is_created_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("FLOWSTONE_RESILIENCE_STORE", raising=False)
    url = default_store_url()
    store = open_store(url)
    store.read_breaker("x")
    directory = tmp_path / "flowstone"
    assert (directory.stat().st_mode & 0o777) == 0o700
    assert ((directory / "resilience.sqlite3").stat().st_mode & 0o777) == 0o600
    close_stores()


def test_a_foreign_owned_store_directory_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.delenv("FLOWSTONE_RESILIENCE_STORE", raising=False)
    directory = tmp_path / "flowstone"
    directory.mkdir(mode=0o700)
    other = pwd.getpwnam("postgres") if os.geteuid() == 0 else None
    if other is None:  # not root: cannot plant another user's directory; use a group-writable one
        directory.chmod(0o777)
        match = "writable by other users"
    else:
        os.chown(directory, other.pw_uid, other.pw_gid)
        match = f"belongs to uid {other.pw_uid}"
    resource = ResilienceResource(policies={"svc": ServicePolicy()})
    with pytest.raises(ConfigurationError, match=match) as caught:
        resource.call("svc", Service(), dagster_errors=False)
    assert str(directory) in str(caught.value)
    close_stores()


# -- several rates in one limiter ----------------------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


def test_several_rates_are_enforced_together(store_url: str) -> None:
    clock = FakeClock()
    name = f"multi-{uuid.uuid4().hex[:6]}"
    limiter = RateLimiter(
        name, rates=[(3, 1.0), (5, 10.0)], mode="reject", store=store_url, clock=clock
    )
    admitted = 0
    for _ in range(4):
        if limiter.try_acquire().admitted:
            admitted += 1
    assert admitted == 3  # the 1 s window
    clock.now += 1.0
    results = [limiter.try_acquire() for _ in range(3)]
    assert [r.admitted for r in results] == [True, True, False]  # the 10 s window: 5 in all
    assert results[-1].wait == pytest.approx(9.0, abs=0.01)  # the longest wait of the two
    clock.now += 9.001
    assert limiter.try_acquire().admitted


def test_rate_limit_config_takes_pairs() -> None:
    config = RateLimitConfig(rates=[(50, 1), (1000, 60)])
    assert config.windows() == ((50.0, 1.0), (1000.0, 60.0))
    assert RateLimitConfig(limit=10, period=2, rates=[(100, 60)]).windows() == (
        (10.0, 2.0),
        (100.0, 60.0),
    )


@pytest.fixture(autouse=True)
def _fresh_stores() -> Iterator[None]:
    yield
    close_stores()
