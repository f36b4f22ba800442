"""How ``RestIOManager`` authenticates: one Dagster config class per kind, chosen by ``kind``.

::

    RestIOManager(base_url=..., auth=BearerAuth(token=dg.EnvVar("API_TOKEN")))
    RestIOManager(base_url=..., auth=BasicAuth(username="bot", password=dg.EnvVar("API_PW")))
    RestIOManager(base_url=..., auth=ApiKeyAuth(key=dg.EnvVar("API_KEY"), header="X-Key"))
    RestIOManager(base_url=..., auth=ApiKeyAuth(key=dg.EnvVar("API_KEY"), query_param="key"))
    RestIOManager(base_url=...)  # no auth: NoAuth(), the default

In run config the union is a selector keyed by ``kind``:
``auth: {bearer: {token: {env: API_TOKEN}}}``. Each class holds exactly the fields its kind
needs, all required, so an incomplete one fails when it is built, naming the field. Secrets are
left out of ``repr``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Literal

import dagster as dg
from pydantic import Field

__all__ = ["ApiKeyAuth", "BasicAuth", "BearerAuth", "Credentials", "NoAuth", "RestAuth"]


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


#: The ``auth`` field's type: one of these, chosen by ``kind``.
RestAuth = NoAuth | BearerAuth | BasicAuth | ApiKeyAuth
