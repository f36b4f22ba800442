"""The one HTTP session factory, against real servers on loopback."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    ExternalServiceError,
    Forbidden,
    HTTPError,
    NotFound,
    RateLimited,
    TransportError,
    Unauthorized,
)
from flowstone_dagster.http import (
    DEFAULT_USER_AGENT,
    create_session,
    redact_headers,
    redact_url,
)
from flowstone_dagster_tests.support.net import free_port, trickling_server

SECRET = "sk-live-0123456789abcdef"


def test_get_json_with_default_headers(httpserver: HTTPServer) -> None:
    httpserver.expect_oneshot_request(
        "/orders", query_string="day=2025-01-15", headers={"User-Agent": DEFAULT_USER_AGENT}
    ).respond_with_json({"orders": [1, 2, 3]})
    session = create_session(headers={"X-Team": "data"})
    response = session.get(httpserver.url_for("/orders"), params={"day": "2025-01-15"})
    assert response.json() == {"orders": [1, 2, 3]}
    assert httpserver.log[0][0].headers["X-Team"] == "data"
    httpserver.check_assertions()


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (400, HTTPError),
        (401, Unauthorized),
        (403, Forbidden),
        (404, NotFound),
        (410, NotFound),
        (429, RateLimited),
        (500, HTTPError),
        (503, HTTPError),
    ],
)
def test_failing_status_raises_the_taxonomy_error(
    httpserver: HTTPServer, status: int, error: type[Exception]
) -> None:
    httpserver.expect_oneshot_request("/thing").respond_with_data("server says no", status=status)
    session = create_session(service="things")
    with pytest.raises(error) as raised:
        session.get(httpserver.url_for("/thing"))
    assert type(raised.value) is error
    assert raised.value.status == status  # type: ignore[attr-defined]
    assert "server says no" in str(raised.value)
    assert str(raised.value).startswith(f"[things] HTTP {status} from GET http://")


def test_raise_for_status_false_returns_the_response(httpserver: HTTPServer) -> None:
    httpserver.expect_oneshot_request("/missing").respond_with_data("gone", status=404)
    response = create_session().get(httpserver.url_for("/missing"), raise_for_status=False)
    assert response.status_code == 404


def test_retry_after_header_is_read(httpserver: HTTPServer) -> None:
    httpserver.expect_oneshot_request("/busy").respond_with_data(
        "slow down", status=429, headers={"Retry-After": "3"}
    )
    with pytest.raises(RateLimited) as raised:
        create_session().get(httpserver.url_for("/busy"))
    assert raised.value.retry_after == 3.0


def test_streamed_error_body_is_read_within_a_limit(httpserver: HTTPServer) -> None:
    httpserver.expect_oneshot_request("/big-error").respond_with_data("E" * 200_000, status=502)
    with pytest.raises(HTTPError) as raised:
        create_session().get(httpserver.url_for("/big-error"), stream=True)
    assert raised.value.status == 502
    assert raised.value.body is not None
    assert raised.value.body.startswith("EEEE")
    assert len(raised.value.body) <= 500


def test_no_hidden_retries_on_503(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/flaky").respond_with_data("down", status=503)
    with pytest.raises(HTTPError):
        create_session().get(httpserver.url_for("/flaky"))
    assert len(httpserver.log) == 1


def test_no_hidden_retries_on_a_dropped_connection() -> None:
    accepted = 0
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]

    def drop_connections() -> None:
        nonlocal accepted
        listener.settimeout(5)
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            accepted += 1
            connection.recv(65536)
            connection.close()  # an empty reply: the server went away mid-request

    thread = threading.Thread(target=drop_connections, daemon=True)
    thread.start()
    try:
        with pytest.raises(TransportError):
            create_session().get(f"http://127.0.0.1:{port}/x")
    finally:
        listener.close()
        thread.join(10)
    assert accepted == 1


def test_refused_connection_is_a_transport_error() -> None:
    port = free_port()
    with pytest.raises(TransportError) as raised:
        create_session(service="api").get(f"http://127.0.0.1:{port}/data?token={SECRET}")
    message = str(raised.value)
    assert "refused" in message.lower()
    assert SECRET not in message
    assert raised.value.retryable is True


def test_read_timeout_from_the_session_default(httpserver: HTTPServer) -> None:
    def slow(request: Request) -> Response:
        time.sleep(1.0)
        return Response("late")

    httpserver.expect_oneshot_request("/slow").respond_with_handler(slow)
    session = create_session(timeout=(2.0, 0.2))
    started = time.monotonic()
    with pytest.raises(CallTimeout) as raised:
        session.get(httpserver.url_for("/slow"))
    assert time.monotonic() - started < 0.9
    assert raised.value.timeout == pytest.approx(2.2)
    assert raised.value.retryable is True


def test_per_request_timeout_overrides_the_default(httpserver: HTTPServer) -> None:
    def slow(request: Request) -> Response:
        time.sleep(0.5)
        return Response("late but fine")

    httpserver.expect_oneshot_request("/slow").respond_with_handler(slow)
    session = create_session(timeout=0.1)
    assert session.get(httpserver.url_for("/slow"), timeout=5).text == "late but fine"


def test_untrusted_certificate_is_rejected(untrusted_https_server: HTTPServer) -> None:
    untrusted_https_server.expect_request("/x").respond_with_data("secret data")
    with pytest.raises(TransportError) as raised:
        create_session().get(untrusted_https_server.url_for("/x"))
    assert raised.value.tls is True
    assert raised.value.retryable is False
    assert "ca_bundle" in str(raised.value)


def test_trusted_certificate_is_accepted(https_server: HTTPServer, ca_bundle: str) -> None:
    https_server.expect_request("/x").respond_with_json({"ok": True})
    session = create_session(ca_bundle=ca_bundle)
    assert https_server.url_for("/x").startswith("https://")
    assert session.get(https_server.url_for("/x")).json() == {"ok": True}


def test_redirect_loop_is_bounded(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/a").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for("/b")}
    )
    httpserver.expect_request("/b").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for("/a")}
    )
    with pytest.raises(ExternalServiceError, match="more than 3 redirects"):
        create_session(max_redirects=3).get(httpserver.url_for("/a"))
    assert len(httpserver.log) == 4


def test_secrets_never_reach_error_text(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/private").respond_with_data(f"invalid key {SECRET}", status=401)
    session = create_session(
        headers={"Authorization": f"Bearer {SECRET}"}, secrets=[SECRET], service="vendor"
    )
    with pytest.raises(Unauthorized) as raised:
        session.get(httpserver.url_for("/private"), params={"api_key": SECRET, "day": "1"})
    rendered = f"{raised.value} {raised.value.url} {raised.value.body} {raised.value!r}"
    assert SECRET not in rendered
    assert "day=1" in rendered
    assert SECRET not in repr(session)
    assert httpserver.log[0][0].headers["Authorization"] == f"Bearer {SECRET}"


def test_invalid_url_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="url"):
        create_session().get("not a url")


@pytest.mark.parametrize("kwargs", [{"timeout": 0}, {"timeout": (1.0, -1.0)}, {"pool_size": 0}])
def test_bad_factory_arguments(kwargs: dict) -> None:
    with pytest.raises(ConfigurationError):
        create_session(**kwargs)


def test_telemetry_event_per_request(
    httpserver: HTTPServer, events: list[telemetry.TelemetryEvent]
) -> None:
    httpserver.expect_oneshot_request("/ok").respond_with_data("12345")
    httpserver.expect_oneshot_request("/bad").respond_with_data("no", status=500)
    session = create_session()
    session.get(httpserver.url_for("/ok"))
    with pytest.raises(HTTPError):
        session.post(httpserver.url_for("/bad"), data=b"x")
    ok, bad = [e for e in events if e.name == "flowstone.http.request"]
    assert ok.outcome == "ok"
    assert ok.measures == {"method": "GET", "host": "localhost", "status": 200, "bytes": 5}
    assert bad.outcome == "error"
    assert bad.error_type == "HTTPError"
    assert bad.measures["status"] == 500
    assert bad.measures["method"] == "POST"


def test_connection_pool_reuses_connections(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/ping").respond_with_data("pong")
    session = create_session(pool_size=2)
    for _ in range(5):
        assert session.get(httpserver.url_for("/ping")).text == "pong"
    adapter = session.get_adapter(httpserver.url_for("/ping"))
    assert isinstance(adapter, requests.adapters.HTTPAdapter)
    assert adapter.max_retries.total == 0


def test_redaction_helpers() -> None:
    assert redact_url("https://u:p@h.example/x?token=abc&day=1") == (
        "https://u:***@h.example/x?token=***&day=1"
    )
    assert redact_url("https://h.example/hooks/T1/B2/XYZ", secrets=["XYZ"]).endswith("/***")
    assert redact_url("https://h.example/plain?a=1") == "https://h.example/plain?a=1"
    assert redact_headers({"Authorization": "Bearer x", "X-Api-Key": "k", "Accept": "a"}) == {
        "Authorization": "***",
        "X-Api-Key": "***",
        "Accept": "a",
    }


# -- a total time per request ----------------------------------------------------------------


def test_a_trickling_body_is_cut_at_the_timeout_total() -> None:
    url, stop = trickling_server()
    session = create_session(timeout=(0.5, 1.0))  # 1.5 s in all, though bytes arrive each 0.25 s
    started = time.monotonic()
    try:
        with pytest.raises(CallTimeout) as raised:
            session.get(url)
    finally:
        stop.set()
    elapsed = time.monotonic() - started
    assert 1.4 <= elapsed < 2.5
    assert raised.value.retryable
    assert raised.value.timeout == pytest.approx(1.5)
    assert "within 1.5 s" in str(raised.value)


def test_a_trickling_streamed_body_is_cut_at_the_resilience_deadline() -> None:
    from flowstone_dagster.resilience import deadline_scope

    url, stop = trickling_server()
    session = create_session(timeout=(10.0, 10.0))
    started = time.monotonic()
    try:
        with deadline_scope(1.0):
            response = session.get(url, stream=True)  # the headers arrive at once
            with pytest.raises(CallTimeout) as raised:
                session.read_body(response)
    finally:
        stop.set()
    elapsed = time.monotonic() - started
    assert 0.9 <= elapsed < 2.0
    assert "deadline" in str(raised.value)
    assert raised.value.timeout is not None
    assert raised.value.timeout <= 1.0


def test_verify_false_warns_once_per_origin(
    httpserver: HTTPServer, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flowstone_dagster.http

    monkeypatch.setattr(flowstone_dagster.http, "_insecure_warned", set())  # a fresh process
    httpserver.expect_request("/tls").respond_with_data("ok")
    url = httpserver.url_for("/tls")
    session = create_session(verify=False)
    with caplog.at_level("WARNING", logger="flowstone_dagster.http"):
        session.get(url)
        session.get(url)
        create_session(verify=False).get(url)
    warnings = [r for r in caplog.records if "verif" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].levelname == "WARNING"
    assert f"http://{httpserver.host}:{httpserver.port}" in warnings[0].getMessage()
