"""OAuth2 client credentials against a loopback token endpoint and an API that checks tokens the
way real ones do (RFC 6749 section 4.4 and 5; RFC 6750 bearer tokens)."""

import base64
import itertools
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import parse_qs, unquote_plus

import dagster as dg
import pytest
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from flowstone_dagster import (
    CursorPagination,
    LinkPagination,
    OAuth2ClientCredentials,
    RestClient,
    RestIOManager,
    telemetry,
)
from flowstone_dagster.errors import DecodeError, ExternalServiceError, Unauthorized

SECRET = "client 5ecr3t+value/424242"  # characters RFC 6749's form-encoding must escape


class TokenEndpoint:
    """``POST /oauth/token``: client credentials in basic auth or the form; issues
    ``access-<n>-<random>`` tokens lasting ``expires_in`` seconds."""

    def __init__(self, server: HTTPServer, *, expires_in: int | None = 3600) -> None:
        self.server = server
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.forms: list[dict[str, str]] = []
        self.authorizations: list[str | None] = []
        self.refuse = False
        self._serial = itertools.count(1)
        server.expect_request("/oauth/token", method="POST").respond_with_handler(self)

    @property
    def url(self) -> str:
        return self.server.url_for("/oauth/token")

    def __call__(self, request: Request) -> Response:
        form = {k: v[0] for k, v in parse_qs(request.get_data(as_text=True)).items()}
        self.forms.append(form)
        self.authorizations.append(request.headers.get("Authorization"))
        secret = form.get("client_secret")
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Basic "):
            pair = base64.b64decode(authorization[6:]).decode()
            secret = unquote_plus(pair.partition(":")[2])
        if self.refuse or secret != SECRET or form.get("grant_type") != "client_credentials":
            refusal = {"error": "invalid_client", "error_description": "unknown client"}
            return Response(json.dumps(refusal), status=401, content_type="application/json")
        token = f"access-{next(self._serial)}-{uuid.uuid4().hex}"
        self.issued.append(token)
        body: dict[str, Any] = {"access_token": token, "token_type": "Bearer"}
        if self.expires_in is not None:
            body["expires_in"] = self.expires_in
        return Response(json.dumps(body), content_type="application/json")


class Api:
    """A paged API (``?cursor=``) that accepts only tokens the endpoint issued and not revoked,
    and can revoke the current token after a given number of pages."""

    def __init__(self, server: HTTPServer, tokens: TokenEndpoint) -> None:
        self.tokens = tokens
        self.revoked: set[str] = set()
        self.revoke_after: int | None = None
        self.seen: list[str | None] = []
        server.expect_request("/api/rows").respond_with_handler(self)

    def __call__(self, request: Request) -> Response:
        authorization = request.headers.get("Authorization")
        self.seen.append(authorization)
        token = (authorization or "").removeprefix("Bearer ")
        if token not in self.tokens.issued or token in self.revoked:
            return Response(
                "", status=401, headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
            )
        page = int(request.args.get("cursor", "0"))
        if self.revoke_after is not None and page + 1 == self.revoke_after:
            self.revoked.add(token)  # expires server-side after this page
        body = {"data": [{"page": page}], "next": page + 1 if page < 3 else None}
        return Response(json.dumps(body), content_type="application/json")


@pytest.fixture
def token_server() -> Iterator[HTTPServer]:
    server = HTTPServer(host="127.0.0.1")  # its own origin, like a real identity provider
    server.start()
    yield server
    server.clear()
    server.stop()


def oauth(tokens: TokenEndpoint, **kwargs: Any) -> OAuth2ClientCredentials:
    # A client id of its own per test: the token cache is per process, keyed by client.
    return OAuth2ClientCredentials(
        token_url=tokens.url,
        client_id=kwargs.pop("client_id", f"etl-{uuid.uuid4().hex[:8]}"),
        client_secret=kwargs.pop("client_secret", SECRET),
        **kwargs,
    )


PAGES = CursorPagination(cursor_path="next", items_path="data")
ALL_ROWS = [{"page": n} for n in range(4)]


def test_token_fetched_once_cached_and_sent_as_bearer(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    tokens = TokenEndpoint(token_server)
    api = Api(httpserver, tokens)
    auth = oauth(tokens, scopes=["rows:read", "rows:write"], audience="https://api")
    client = RestClient(lambda _: httpserver.url_for("/api/rows"), pagination=PAGES, oauth2=auth)
    events: list[telemetry.TelemetryEvent] = []
    remove = telemetry.add_listener(events.append)
    try:
        assert client.load() == ALL_ROWS
        assert client.load() == ALL_ROWS
    finally:
        remove()
    assert len(tokens.issued) == 1  # cached across requests and loads
    (token_event,) = [e for e in events if e.name == "flowstone.http.request"]
    assert token_event.measures["method"] == "POST"
    assert token_event.measures["status"] == 200
    assert [e.measures["pages"] for e in events if e.name == "flowstone.rest.load"] == [4, 4]
    assert set(api.seen) == {f"Bearer {tokens.issued[0]}"}
    assert tokens.forms == [
        {
            "grant_type": "client_credentials",
            "scope": "rows:read rows:write",
            "audience": "https://api",
        }
    ]
    pair = base64.b64decode(tokens.authorizations[0].removeprefix("Basic ")).decode()  # type: ignore[union-attr]
    assert pair == f"{auth.client_id}:client+5ecr3t%2Bvalue%2F424242"
    # Another client with the same credentials shares the process's token.
    other = RestClient(lambda _: httpserver.url_for("/api/rows"), pagination=PAGES, oauth2=auth)
    assert other.load() == ALL_ROWS
    assert len(tokens.issued) == 1


def test_client_secret_post_sends_the_credentials_in_the_form(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    tokens = TokenEndpoint(token_server)
    Api(httpserver, tokens)
    auth = oauth(tokens, client_auth="body")
    RestClient(lambda _: httpserver.url_for("/api/rows"), pagination=PAGES, oauth2=auth).load()
    assert tokens.authorizations == [None]
    assert tokens.forms[0]["client_id"] == auth.client_id
    assert tokens.forms[0]["client_secret"] == SECRET


def test_a_token_is_refreshed_before_it_expires(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    tokens = TokenEndpoint(token_server, expires_in=600)
    api = Api(httpserver, tokens)
    client = RestClient(
        lambda _: httpserver.url_for("/api/rows"), pagination=PAGES, oauth2=oauth(tokens)
    )
    now = [1000.0]
    assert client.token_source is not None
    client.token_source.clock = lambda: now[0]
    client.load()
    now[0] += 600 - 61  # still more than refresh_margin (60 s) left: cached
    client.load()
    assert len(tokens.issued) == 1
    now[0] += 2  # within the margin: fetched again before the API could refuse it
    client.load()
    assert len(tokens.issued) == 2
    assert api.seen[-1] == f"Bearer {tokens.issued[1]}"
    assert all(seen is not None for seen in api.seen)  # never a 401 on the way


def test_a_401_mid_pagination_refreshes_the_token_once_and_continues(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    tokens = TokenEndpoint(token_server)
    api = Api(httpserver, tokens)
    api.revoke_after = 2  # the token dies after page 2 of 4
    client = RestClient(
        lambda _: httpserver.url_for("/api/rows"), pagination=PAGES, oauth2=oauth(tokens)
    )
    assert client.load() == ALL_ROWS
    assert len(tokens.issued) == 2
    assert len(api.seen) == 5  # 4 pages + the refused one


def test_a_second_401_is_the_apis_answer(httpserver: HTTPServer, token_server: HTTPServer) -> None:
    tokens = TokenEndpoint(token_server)
    httpserver.expect_request("/api/rows").respond_with_data("", status=401)
    client = RestClient(lambda _: httpserver.url_for("/api/rows"), oauth2=oauth(tokens))
    with pytest.raises(Unauthorized):
        client.load()
    assert len(tokens.issued) == 2  # one refresh, no loop
    assert len(httpserver.log) == 2


def test_a_refused_client_is_unauthorized_naming_the_endpoint_not_the_secret(
    httpserver: HTTPServer, token_server: HTTPServer, caplog: pytest.LogCaptureFixture
) -> None:
    tokens = TokenEndpoint(token_server)
    tokens.refuse = True
    client = RestClient(lambda _: httpserver.url_for("/api/rows"), oauth2=oauth(tokens))
    caplog.set_level(logging.DEBUG)
    with pytest.raises(Unauthorized) as raised:
        client.load()
    message = str(raised.value)
    assert tokens.url in message
    assert "invalid_client" in message
    assert SECRET not in message
    assert SECRET not in caplog.text
    assert len(httpserver.log) == 0  # the API never saw a request


def test_a_token_response_without_a_token_is_a_decode_error(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    token_server.expect_request("/oauth/token").respond_with_json({"token_type": "Bearer"})
    auth = OAuth2ClientCredentials(
        token_url=token_server.url_for("/oauth/token"),
        client_id=f"etl-{uuid.uuid4().hex[:8]}",
        client_secret=SECRET,
    )
    with pytest.raises(DecodeError, match="access_token"):
        RestClient(lambda _: httpserver.url_for("/api/rows"), oauth2=auth).load()


def test_a_token_endpoint_redirect_is_not_followed(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    token_server.expect_request("/oauth/token").respond_with_data(
        "", status=302, headers={"Location": httpserver.url_for("/steal")}
    )
    auth = OAuth2ClientCredentials(
        token_url=token_server.url_for("/oauth/token"),
        client_id=f"etl-{uuid.uuid4().hex[:8]}",
        client_secret=SECRET,
    )
    with pytest.raises(ExternalServiceError, match="answered HTTP 302 instead of a token"):
        RestClient(lambda _: httpserver.url_for("/api/rows"), oauth2=auth).load()
    assert len(httpserver.log) == 0  # neither the redirect target nor the API was called


def test_the_token_stays_on_the_api_origin_and_the_secret_on_the_token_endpoint(
    httpserver: HTTPServer, token_server: HTTPServer
) -> None:
    tokens = TokenEndpoint(token_server)
    elsewhere = HTTPServer(host="127.0.0.1")
    elsewhere.start()
    try:
        elsewhere.expect_request("/page2").respond_with_json([2])
        httpserver.expect_request("/api/rows").respond_with_json(
            [1], headers={"Link": f'<{elsewhere.url_for("/page2")}>; rel="next"'}
        )
        client = RestClient(
            lambda _: httpserver.url_for("/api/rows"),
            pagination=LinkPagination(),
            oauth2=oauth(tokens),
        )
        assert client.load() == [1, 2]
        assert httpserver.log[0][0].headers["Authorization"] == f"Bearer {tokens.issued[0]}"
        assert "Authorization" not in elsewhere.log[0][0].headers
        for request, _ in [*httpserver.log, *elsewhere.log]:
            assert SECRET not in request.get_data(as_text=True)
            assert SECRET not in str(request.headers)
    finally:
        elsewhere.clear()
        elsewhere.stop()


def test_oauth2_config_repr_hides_the_secret(token_server: HTTPServer) -> None:
    auth = OAuth2ClientCredentials(
        token_url=token_server.url_for("/oauth/token"), client_id="etl", client_secret=SECRET
    )
    assert SECRET not in repr(auth)
    with pytest.raises(Exception, match="token_url"):
        OAuth2ClientCredentials(
            token_url="auth.example.com/token", client_id="a", client_secret="b"
        )


@dg.asset(io_manager_key="rest")
def rows() -> list[dict]:  # served by the API
    return []


@dg.asset
def row_count(rows: list[dict]) -> int:
    return len(rows)


@pytest.mark.dagster
def test_oauth2_inside_materialize_from_run_config_with_expiry_mid_pagination(
    httpserver: HTTPServer,
    token_server: HTTPServer,
    dagster_instance: dg.DagsterInstance,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tokens = TokenEndpoint(token_server)
    api = Api(httpserver, tokens)
    api.revoke_after = 1
    monkeypatch.setenv("ROWS_CLIENT_SECRET", SECRET)
    result = dg.materialize(
        [rows, row_count],
        selection=[row_count],
        resources={"rest": RestIOManager.configure_at_launch()},
        instance=dagster_instance,
        run_config={
            "resources": {
                "rest": {
                    "config": {
                        "base_url": httpserver.url_for("/api"),
                        "pagination": {"cursor": {"cursor_path": "next", "items_path": "data"}},
                        "auth": {
                            "oauth2_client_credentials": {
                                "token_url": tokens.url,
                                "client_id": f"etl-{uuid.uuid4().hex[:8]}",
                                "client_secret": {"env": "ROWS_CLIENT_SECRET"},
                                "scopes": ["rows:read"],
                            }
                        },
                    }
                }
            }
        },
    )
    assert result.success
    assert result.output_for_node("row_count") == 4
    assert len(tokens.issued) == 2
    logs = "\n".join(str(e.message) for e in result.all_events if e.message)
    assert SECRET not in logs
    assert all(token not in logs for token in tokens.issued)
