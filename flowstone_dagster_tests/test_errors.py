"""The error taxonomy and the one retry decision, table-driven."""

from __future__ import annotations

import socket
from types import SimpleNamespace

import anthropic
import httpx2
import openai
import pytest
import requests

from flowstone_dagster.errors import (
    CallTimeout,
    CircuitOpen,
    ConfigurationError,
    DbtFailed,
    DecodeError,
    ExternalServiceError,
    FlowstoneError,
    Forbidden,
    HTTPError,
    MaxAttemptsExceeded,
    NotFound,
    PartialFailure,
    PythonWorkerError,
    RateLimited,
    ResponseTooLarge,
    TransportError,
    Unauthorized,
    WorkerCrashed,
    error_for_status,
    is_retryable,
    parse_retry_after,
    retry_after_of,
    truncate,
)


def _sdk_status_error(module, status: int, headers: dict[str, str] | None = None):
    request = httpx2.Request("POST", "https://api.example.com/v1/messages")
    response = httpx2.Response(status, headers=headers or {}, request=request, json={})
    return module.APIStatusError("provider said no", response=response, body={})


def _sdk_timeout(module):
    return module.APITimeoutError(request=httpx2.Request("POST", "https://api.example.com/"))


RETRY_TABLE = [
    # (case, exception, retryable)
    ("our timeout", CallTimeout("slow", timeout=1.0), True),
    ("our transport error", TransportError("refused"), True),
    ("tls failure", TransportError("bad cert", tls=True), False),
    ("rate limited", RateLimited("429", retry_after=2.0), True),
    ("worker crashed", WorkerCrashed("SIGSEGV", signal=11), True),
    ("builtin TimeoutError", TimeoutError(), True),
    ("socket timeout", socket.timeout(), True),  # noqa: UP041 - the alias is the point
    ("builtin ConnectionRefusedError", ConnectionRefusedError(), True),
    ("requests ReadTimeout", requests.exceptions.ReadTimeout(), True),
    ("requests ConnectionError", requests.exceptions.ConnectionError(), True),
    ("anthropic timeout", _sdk_timeout(anthropic), True),
    ("openai timeout", _sdk_timeout(openai), True),
    (
        "anthropic connection error",
        anthropic.APIConnectionError(request=httpx2.Request("POST", "https://x/")),
        True,
    ),
    ("anthropic 529 overloaded", _sdk_status_error(anthropic, 529), True),
    ("anthropic 400", _sdk_status_error(anthropic, 400), False),
    ("openai 429", _sdk_status_error(openai, 429), True),
    ("openai 401", _sdk_status_error(openai, 401), False),
    ("openai 422", _sdk_status_error(openai, 422), False),
    ("not found", error_for_status(404), False),
    ("gone", error_for_status(410), False),
    ("unauthorized", error_for_status(401), False),
    ("forbidden", error_for_status(403), False),
    ("bad request", error_for_status(400), False),
    ("conflict", error_for_status(409), False),
    ("unprocessable", error_for_status(422), False),
    ("response too large", ResponseTooLarge("big", limit=10), False),
    ("decode error", DecodeError("not json", url="http://x", fmt="json"), False),
    ("configuration", ConfigurationError("missing", field="api_key"), False),
    ("circuit open", CircuitOpen("svc", 3.0), False),
    ("max attempts", MaxAttemptsExceeded(3, CallTimeout("slow")), False),
    ("partial failure", PartialFailure([("slack", RuntimeError("x"))], ["email"]), False),
    ("dbt failure", DbtFailed("dbt run failed", exit_code=1), False),
    ("python worker error", PythonWorkerError("ValueError", "bad"), False),
    ("plain ValueError", ValueError("bad input"), False),
    ("plain RuntimeError", RuntimeError("bug"), False),
    ("KeyError", KeyError("x"), False),
] + [
    (f"HTTP {status}", error_for_status(status), True)
    for status in (408, 425, 429, 500, 502, 503, 504, 529)
]


@pytest.mark.parametrize(
    ("case", "exc", "expected"), RETRY_TABLE, ids=[c for c, _, _ in RETRY_TABLE]
)
def test_is_retryable(case: str, exc: BaseException, expected: bool) -> None:
    assert is_retryable(exc) is expected, case


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, HTTPError),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (410, NotFound),
        (418, HTTPError),
        (429, RateLimited),
        (500, HTTPError),
        (503, HTTPError),
    ],
)
def test_error_for_status_maps_each_status(status: int, cls: type) -> None:
    error = error_for_status(status, url="https://api.example.com/x", method="GET", body="nope")
    assert type(error) is cls
    assert isinstance(error, ExternalServiceError)
    assert error.status == status
    assert f"HTTP {status} from GET https://api.example.com/x: nope" in str(error)


def test_error_keeps_a_truncated_server_message() -> None:
    error = error_for_status(500, body="x" * 10_000)
    assert isinstance(error, HTTPError)
    assert error.body is not None
    assert len(error.body) <= 500
    assert error.body.endswith("more]")
    assert len(str(error)) < 700


def test_rate_limited_status_carries_retry_after() -> None:
    error = error_for_status(429, retry_after=2.5)
    assert isinstance(error, RateLimited)
    assert error.retry_after == 2.5
    assert retry_after_of(error) == 2.5
    assert "retry after 2.5 s" in str(error)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, None),
        ("", None),
        ("  3 ", 3.0),
        ("0", 0.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("nan", None),
        ("soon", None),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
    ],
)
def test_parse_retry_after(value: str | None, expected: float | None) -> None:
    now = 1445412480.0  # Wed, 21 Oct 2015 07:28:00 GMT
    assert parse_retry_after(value, now=now) == expected


def test_retry_after_from_sdk_headers() -> None:
    assert retry_after_of(_sdk_status_error(anthropic, 429, {"retry-after": "7"})) == 7.0
    assert retry_after_of(_sdk_status_error(openai, 429, {"retry-after-ms": "1500"})) == 1.5
    assert retry_after_of(_sdk_status_error(openai, 500)) is None
    assert retry_after_of(ValueError()) is None
    assert retry_after_of(SimpleNamespace(retry_after=-1)) == 0.0  # type: ignore[arg-type]


def test_every_error_is_a_flowstone_error_and_names_its_service() -> None:
    error = CallTimeout("no answer in 5 s", timeout=5, service="anthropic")
    assert isinstance(error, FlowstoneError)
    assert isinstance(error, TimeoutError)
    assert str(error) == "[anthropic] no answer in 5 s"
    assert isinstance(TransportError("x"), ConnectionError)
    assert isinstance(ConfigurationError("x"), ValueError)


def test_composite_errors_keep_their_parts() -> None:
    last = CallTimeout("slow")
    exhausted = MaxAttemptsExceeded(3, last)
    assert exhausted.attempts == 3
    assert exhausted.last_error is last
    assert "gave up after 3 attempts: CallTimeout: slow" in str(exhausted)

    partial = PartialFailure([("slack", RuntimeError("500"))], ["email"])
    assert partial.failures[0][0] == "slack"
    assert partial.succeeded == ["email"]
    assert str(partial) == "1 of 2 failed: slack: RuntimeError: 500"
    everything = PartialFailure([("slack", RuntimeError("a")), ("email", OSError("b"))])
    assert str(everything).startswith("all failed:")

    circuit = CircuitOpen("anthropic", -1.0)
    assert circuit.retry_in == 0.0

    worker = PythonWorkerError("ZeroDivisionError", "division by zero", "Traceback ...")
    assert worker.remote_type == "ZeroDivisionError"
    assert str(worker) == "ZeroDivisionError: division by zero"

    crashed = WorkerCrashed("worker 123 killed by SIGKILL", signal=9)
    assert crashed.signal == 9

    failed = DbtFailed("dbt run failed", exit_code=1, failed_nodes=[{"unique_id": "model.x"}])
    assert failed.failed_nodes == [{"unique_id": "model.x"}]

    config = ConfigurationError("is required", field="base_url")
    assert config.field == "base_url"
    assert str(config) == "base_url: is required"


def test_truncate() -> None:
    assert truncate("short") == "short"
    cut = truncate("y" * 1000, 100)
    assert len(cut) <= 100
    assert cut.endswith(f"... [{1000 - cut.index('.')} more]")


# -- database drivers and the store --------------------------------------------------------------


def test_database_driver_errors_are_classified_by_sqlstate() -> None:
    import sqlite3

    import psycopg2
    import psycopg2.errors

    from flowstone_dagster.errors import StoreUnavailable

    assert is_retryable(psycopg2.OperationalError("server closed the connection unexpectedly"))
    assert is_retryable(psycopg2.errors.SerializationFailure())
    assert is_retryable(psycopg2.errors.DeadlockDetected())
    assert is_retryable(psycopg2.errors.LockNotAvailable())
    assert is_retryable(psycopg2.errors.AdminShutdown())
    assert not is_retryable(psycopg2.errors.UndefinedTable())
    assert not is_retryable(psycopg2.errors.UniqueViolation())
    assert is_retryable(sqlite3.OperationalError("database is locked"))
    assert not is_retryable(sqlite3.OperationalError("no such table: orders"))
    assert is_retryable(StoreUnavailable("sqlite:///x", "reserve", "database is locked"))


def test_no_secret_survives_in_any_link_of_a_mapped_chain() -> None:
    import traceback

    from flowstone_dagster.redaction import RedactedError, register_secret
    from flowstone_dagster.resilience import to_dagster_error

    key = "sk-test-0123456789abcdef"
    register_secret(key)

    class SDKError(Exception):
        pass

    try:
        try:
            raise SDKError(f"invalid x-api-key: {key}")
        except SDKError as sdk:
            raise Unauthorized("HTTP 401 from POST /v1/messages", status=401) from sdk
    except Unauthorized as ours:
        mapped = to_dagster_error(ours)
    text = "".join(traceback.format_exception(mapped))
    assert key not in text
    assert "invalid x-api-key: ***" in text
    cause = mapped.__cause__
    assert isinstance(cause, Unauthorized)  # our own error keeps its type
    assert isinstance(cause.__cause__, RedactedError)
    assert cause.__cause__.original_type.endswith("SDKError")


def test_errors_survive_pickling_between_processes() -> None:
    import pickle

    from flowstone_dagster.errors import StoreUnavailable

    last = RateLimited("HTTP 429", retry_after=3.0, status=429, service="api")
    for error in (
        MaxAttemptsExceeded(2, last, service="api"),
        StoreUnavailable("sqlite:///x", "reserve", "database is locked"),
        NotFound("HTTP 404", status=404, url="https://api/x"),
    ):
        copy = pickle.loads(pickle.dumps(error))  # noqa: S301 - our own bytes
        assert type(copy) is type(error)
        assert str(copy) == str(error)
        assert copy.__dict__.keys() == error.__dict__.keys()
