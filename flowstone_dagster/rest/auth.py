"""How ``RestIOManager`` authenticates: one Dagster config class per kind, chosen by ``kind``.

::

    RestIOManager(base_url=..., auth=BearerAuth(token=dg.EnvVar("API_TOKEN")))
    RestIOManager(base_url=..., auth=BasicAuth(username="bot", password=dg.EnvVar("API_PW")))
    RestIOManager(base_url=..., auth=ApiKeyAuth(key=dg.EnvVar("API_KEY"), header="X-Key"))
    RestIOManager(base_url=..., auth=ApiKeyAuth(key=dg.EnvVar("API_KEY"), query_param="key"))
    RestIOManager(base_url=..., auth=OAuth2ClientCredentials(
        token_url="https://auth.example.com/oauth/token",
        client_id="etl", client_secret=dg.EnvVar("CLIENT_SECRET"), scopes=["orders:read"]))
    RestIOManager(base_url=...)  # no auth: NoAuth(), the default

In run config the union is a selector keyed by ``kind``:
``auth: {bearer: {token: {env: API_TOKEN}}}``. Each class holds exactly the fields its kind
needs, all required, so an incomplete one fails when it is built, naming the field. Secrets are
left out of ``repr``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import quote_plus, urlsplit

import dagster as dg
from pydantic import Field, field_validator

from flowstone_dagster.errors import DecodeError, ExternalServiceError, HTTPError, Unauthorized
from flowstone_dagster.http import HttpSession
from flowstone_dagster.redaction import register_secret

__all__ = [
    "ApiKeyAuth",
    "BasicAuth",
    "BearerAuth",
    "Credentials",
    "NoAuth",
    "OAuth2ClientCredentials",
    "OAuth2TokenSource",
    "RestAuth",
]


@dataclass(frozen=True)
class Credentials:
    """What an auth kind adds to requests sent to the API's origin (never to another host)."""

    headers: dict[str, str] = field(default_factory=dict)
    params: dict[str, str] = field(default_factory=dict)
    #: values to redact from errors, logs and metadata
    secrets: tuple[str, ...] = ()


class NoAuth(dg.Config):
    """No credentials (the default)."""

    kind: Literal["none"] = "none"

    def credentials(self) -> Credentials:
        return Credentials()


class BearerAuth(dg.Config):
    """``Authorization: Bearer <token>``."""

    kind: Literal["bearer"] = "bearer"
    token: str = Field(min_length=1, repr=False, description="Bearer token. Use EnvVar('...').")

    def credentials(self) -> Credentials:
        return Credentials(headers={"Authorization": f"Bearer {self.token}"}, secrets=(self.token,))


class BasicAuth(dg.Config):
    """HTTP basic auth: ``Authorization: Basic base64(username:password)``."""

    kind: Literal["basic"] = "basic"
    username: str = Field(min_length=1, description="User name.")
    password: str = Field(repr=False, description="Password. Use EnvVar('...').")

    def credentials(self) -> Credentials:
        encoded = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        secrets = (self.password, encoded) if self.password else (encoded,)
        return Credentials(headers={"Authorization": f"Basic {encoded}"}, secrets=secrets)


class ApiKeyAuth(dg.Config):
    """An API key in a header (``X-API-Key`` by default) or, with ``query_param``, in the query
    string of each request."""

    kind: Literal["api_key"] = "api_key"
    key: str = Field(min_length=1, repr=False, description="The API key. Use EnvVar('...').")
    header: str = Field(default="X-API-Key", min_length=1, description="Header carrying the key.")
    query_param: str | None = Field(
        default=None,
        min_length=1,
        description="Send the key as this query parameter instead of the header.",
    )

    def credentials(self) -> Credentials:
        if self.query_param:
            return Credentials(params={self.query_param: self.key}, secrets=(self.key,))
        return Credentials(headers={self.header: self.key}, secrets=(self.key,))


class OAuth2ClientCredentials(dg.Config):
    """OAuth2 client credentials (RFC 6749 section 4.4): an access token fetched from
    ``token_url`` with ``client_id``/``client_secret``, sent as ``Authorization: Bearer``.

    The token is cached per process (shared by every client with the same endpoint, client and
    scopes), fetched again ``refresh_margin`` seconds before ``expires_in`` runs out, and once
    more when the API answers 401 (a token revoked early); a second 401 is the API's answer.
    The client secret goes only to ``token_url``, the token only to the API's origin.
    """

    kind: Literal["oauth2_client_credentials"] = "oauth2_client_credentials"
    token_url: str = Field(description="The token endpoint, e.g. https://auth.example.com/token.")
    client_id: str = Field(min_length=1, description="The OAuth2 client id.")
    client_secret: str = Field(
        min_length=1, repr=False, description="The OAuth2 client secret. Use EnvVar('...')."
    )
    scopes: list[str] = Field(
        default_factory=list, description="Scopes asked for (sent space-separated as scope)."
    )
    audience: str | None = Field(
        default=None, description="The audience parameter some providers require (Auth0...)."
    )
    client_auth: Literal["basic", "body"] = Field(
        default="basic",
        description="How the client authenticates to the token endpoint: basic "
        "(client_secret_basic, HTTP basic auth, the RFC's default) or body "
        "(client_secret_post, client_id and client_secret in the form).",
    )
    refresh_margin: float = Field(
        default=60.0,
        ge=0,
        description="Seconds before the token expires when it is fetched again (at most half "
        "its lifetime).",
    )

    @field_validator("token_url")
    @classmethod
    def _absolute_http_url(cls, value: str) -> str:
        if urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname:
            raise ValueError("token_url must be an absolute http(s) URL")
        return value

    def credentials(self) -> Credentials:
        """The static part: nothing is sent; the client secret is redacted everywhere."""
        return Credentials(secrets=(self.client_secret,))


@dataclass
class _Token:
    value: str
    refresh_at: float | None  # monotonic; None: until the API refuses it


_tokens: dict[str, _Token] = {}
_tokens_lock = threading.Lock()


class OAuth2TokenSource:
    """The access token of an :class:`OAuth2ClientCredentials`, fetched through ``session``
    (from the package's session factory, so with its timeouts, TLS settings, telemetry and
    errors), cached per process. ``clock`` is the monotonic clock (injected in tests).

    A client fetches the token inside the attempt of the request that needs it, so the
    resilience policy of the API bounds and retries the fetch too.
    """

    def __init__(
        self,
        config: OAuth2ClientCredentials,
        session: HttpSession,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self.session = session
        self.clock = clock
        register_secret(config.client_secret)
        identity = "\0".join(
            [
                config.token_url,
                config.client_id,
                hashlib.sha256(config.client_secret.encode()).hexdigest(),
                " ".join(sorted(config.scopes)),
                config.audience or "",
            ]
        )
        self.cache_key = hashlib.sha256(identity.encode()).hexdigest()

    def __repr__(self) -> str:
        return f"<OAuth2TokenSource {self.session.redact(self.config.token_url)} client_id=...>"

    def token(self) -> str:
        """The cached token, fetched first when there is none or it is about to expire."""
        with _tokens_lock:
            cached = _tokens.get(self.cache_key)
        if cached is not None and (cached.refresh_at is None or self.clock() < cached.refresh_at):
            return cached.value
        return self._fetch(stale=cached.value if cached else None)

    def refresh(self, refused: str) -> str:
        """A new token after the API refused ``refused`` with 401 (unless another caller
        already replaced it)."""
        return self._fetch(stale=refused)

    def _fetch(self, stale: str | None) -> str:
        with _tokens_lock:
            cached = _tokens.get(self.cache_key)
        # Another caller may have replaced the refused or expiring token meanwhile.
        if (
            cached is not None
            and cached.value != stale
            and (cached.refresh_at is None or self.clock() < cached.refresh_at)
        ):
            return cached.value
        value, expires_in = self._request()
        register_secret(value)
        refresh_at = None
        if expires_in is not None:
            lifetime = max(expires_in - self.config.refresh_margin, expires_in / 2)
            refresh_at = self.clock() + lifetime
        with _tokens_lock:
            _tokens[self.cache_key] = _Token(value, refresh_at)
        return value

    def _request(self) -> tuple[str, float | None]:
        config = self.config
        form = {"grant_type": "client_credentials"}
        if config.scopes:
            form["scope"] = " ".join(config.scopes)
        if config.audience:
            form["audience"] = config.audience
        headers = {"Accept": "application/json"}
        if config.client_auth == "basic":
            # RFC 6749 section 2.3.1: each part form-encoded before the basic encoding.
            pair = f"{quote_plus(config.client_id)}:{quote_plus(config.client_secret)}"
            encoded = base64.b64encode(pair.encode()).decode()
            register_secret(encoded)
            headers["Authorization"] = f"Basic {encoded}"
        else:
            form |= {"client_id": config.client_id, "client_secret": config.client_secret}
        where = self.session.redact(config.token_url)
        try:
            response = self.session.request(
                "POST", config.token_url, data=form, headers=headers, allow_redirects=False
            )
        except HTTPError as exc:
            if exc.status in (400, 401):  # RFC 6749 section 5.2: invalid_client, invalid_scope
                raise Unauthorized(
                    f"the token endpoint {where} refused the client credentials of "
                    f"{config.client_id!r}: {exc.body or exc.message}",
                    status=exc.status,
                    url=exc.url,
                    method="POST",
                    body=exc.body,
                    service=exc.service,
                ) from None
            raise
        if response.status_code != 200:  # a redirect (never followed: it would move the secret)
            raise ExternalServiceError(
                f"the token endpoint {where} answered HTTP {response.status_code} instead of a "
                "token; point token_url at the endpoint itself",
                service=self.session.service,
            )
        try:
            body = json.loads(response.content)
            token = body["access_token"]
            if not isinstance(token, str) or not token:
                raise ValueError("access_token is empty")
            expires_in = body.get("expires_in")
            expires = float(expires_in) if expires_in is not None else None
        except (ValueError, KeyError, TypeError) as exc:
            raise DecodeError(
                f"the token endpoint {where} answered without a usable access_token "
                f"({type(exc).__name__}: {exc})",
                url=where,
                fmt="json",
                service=self.session.service,
            ) from None
        token_type = str(body.get("token_type", "Bearer"))
        if token_type.lower() != "bearer":
            raise DecodeError(
                f"the token endpoint {where} issued a {token_type!r} token; only Bearer "
                "tokens are supported",
                url=where,
                fmt="json",
                service=self.session.service,
            )
        return token, expires


#: The ``auth`` field's type: one of these, chosen by ``kind``.
RestAuth = NoAuth | BearerAuth | BasicAuth | ApiKeyAuth | OAuth2ClientCredentials
