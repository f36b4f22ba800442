"""REST I/O manager: an asset's value per partition, loaded from and stored to an HTTP API.

::

    import dagster as dg
    from flowstone_dagster import BearerAuth, RestIOManager

    daily = dg.DailyPartitionsDefinition(start_date="2025-01-01")

    @dg.asset(partitions_def=daily, io_manager_key="rest")
    def orders() -> list[dict]:
        return [{"id": 1, "total": 9.5}]        # POST {base_url}/orders/2025-01-15

    @dg.asset(partitions_def=daily)
    def order_totals(orders: list[dict]) -> float:   # GET {base_url}/orders/2025-01-15
        return sum(o["total"] for o in orders)

    defs = dg.Definitions(
        assets=[orders, order_totals],
        resources={"rest": RestIOManager(
            base_url="https://api.example.com/v1",
            auth=BearerAuth(token=dg.EnvVar("ORDERS_API_TOKEN")),
        )},
    )

Outside an I/O manager, :class:`RestClient` does the same for any ``url_fn(partition)``::

    client = RestClient(lambda day: f"https://api.example.com/data/{day}")
    client.load("2025-01-15")
    client.store({"value": 42}, "2025-01-15")

Every status has one outcome (the table in ``docs/rest.md``): 2xx success (204 loads as
``None``), a load's redirects followed up to ``max_redirects`` (a store never follows
301/302/303, and 307/308 only to the same origin), 401 ``Unauthorized``, 403 ``Forbidden``,
404/410 ``NotFound`` naming the asset and partition, other 4xx ``HTTPError`` with the server's
message, 408/429/5xx retryable errors: retried through ``resilience`` when one is configured,
else raised after exactly one request.

The resilience service (breaker, rate limit, policy name) defaults to the origin of the URL,
what fails together: ``rest:https://api.example.com`` (scheme, host and a non-default port; no
path, no credentials). Two I/O managers on different origins never share a breaker.
"""

from __future__ import annotations

import email.message
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import unquote, urljoin, urlsplit

import requests

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
    DecodeError,
    ExternalServiceError,
    FlowstoneError,
    NotFound,
)
from flowstone_dagster.formats import (
    FORMATS,
    MEDIA_TYPES,
    decode,
    encode,
    require_pandas,
)
from flowstone_dagster.http import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_READ_TIMEOUT,
    HeaderAuth,
    HttpSession,
    create_session,
    is_secret_header,
)
from flowstone_dagster.redaction import register_secret
from flowstone_dagster.resilience import ResilienceResource, resolve

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "HeadInfo",
    "RestClient",
    "StoreResult",
    "check_partition_key",
    "rest_service",
]

T = TypeVar("T")

#: Largest response body read by default (100 MiB); ``max_body_bytes`` changes it.
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
_CHUNK = 1024 * 1024

Pagination = Literal["none", "link", "cursor"]
StoreMethod = Literal["POST", "PUT", "PATCH"]


@dataclass(frozen=True)
class HeadInfo:
    """What a ``HEAD`` request says about a stored value."""

    status: int
    content_type: str | None
    content_length: int | None
    etag: str | None
    last_modified: str | None


@dataclass(frozen=True)
class StoreResult:
    """The outcome of :meth:`RestClient.store`."""

    url: str
    method: str
    status: int
    bytes: int
    etag: str | None = None
    location: str | None = None


def rest_service(url: str) -> str:
    """The default service name of requests to ``url``: its origin, what fails together.

    ::

        >>> rest_service("https://user:secret@API.example.com/v1/orders?day=1")
        'rest:https://api.example.com'
        >>> rest_service("http://127.0.0.1:8080/x")
        'rest:http://127.0.0.1:8080'

    Scheme, host and port (only when it is not the scheme's default); never the path, the query
    or credentials.
    """
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if ":" in host:
        host = f"[{host}]"  # IPv6
    try:
        port = parts.port
    except ValueError:
        raise ConfigurationError(
            f"{scheme}://{host}... has an invalid port", field="base_url"
        ) from None
    default_port = {"http": 80, "https": 443}.get(scheme)
    shown_port = f":{port}" if port is not None and port != default_port else ""
    return f"rest:{scheme}://{host}{shown_port}"


def check_partition_key(key: Any, *, what: str = "partition key") -> None:
    """Refuse a partition key that would move the URL: a dot segment (``.``, ``..``, also
    percent-encoded like ``%2e%2e`` or ``.%2E``, or as one ``/``- or ``\\``-separated part of the
    key) or an empty key (an empty path segment). Raises ``ConfigurationError`` naming the key,
    before any request."""
    text = str(key)
    if text == "":
        raise ConfigurationError(
            f"{what} {text!r} is empty: it would make an empty URL path segment",
            field="partition_key",
        )
    decoded = text
    for _ in range(3):  # a doubly encoded %252e%252e is still a dot segment to some servers
        decoded = unquote(decoded)
    for candidate in (text, decoded):
        parts = candidate.replace("\\", "/").split("/")
        if any(part in (".", "..") for part in parts):
            raise ConfigurationError(
                f"{what} {text!r} is a dot segment (. or ..): it would move the URL to another "
                "path; rename the partition",
                field="partition_key",
            )


def _declared_charset(response: requests.Response) -> str | None:
    """The charset the server declared, if any (``requests`` would guess ISO-8859-1 for any
    ``text/*`` without one; the formats default to UTF-8 instead)."""
    content_type = response.headers.get("Content-Type")
    if not content_type:
        return None
    message = email.message.Message()
    message["Content-Type"] = content_type
    charset = message.get_param("charset")
    return charset if isinstance(charset, str) else None


def _dig(value: Any, path: str) -> Any:
    """``value["a"]["b"]`` for ``path="a.b"``; ``None`` when a step is missing."""
    for part in path.split("."):
        if isinstance(value, Mapping):
            value = value.get(part)
        elif isinstance(value, list) and part.isdigit() and int(part) < len(value):
            value = value[int(part)]
        else:
            return None
    return value


class RestClient:
    """Load and store values at URLs given by ``url_fn(partition)``.

    Args:
        url_fn: the URL of a partition (``partition`` is whatever the caller passes).
        format: body format, one of ``json``, ``ndjson``, ``csv``, ``text``, ``bytes``.
        method: ``POST``, ``PUT`` or ``PATCH`` for :meth:`store`.
        headers: extra headers for every request (``Content-Type``/``Accept`` follow the
            format unless given here). Those carrying credentials (``Authorization``,
            ``Proxy-Authorization``, ``X-API-Key``, ``API-Key``, ``X-Auth-Token``, ``Cookie``, any
            name containing ``token``, ``secret`` or ``key``, and ``secret_headers``) are treated
            like ``auth_headers``: sent only to the URL's origin, their values redacted.
        secret_headers: more header names whose values are credentials.
        auth_headers: credential headers (``Authorization``, an API key): sent only to the
            origin of the URL a load or store starts at, never to a redirect or a next page on
            another host; their values are redacted like ``secrets``.
        auth_params: credential query parameters (an API key sent as ``?api_key=...``), with
            the same origin rule and redaction as ``auth_headers``.
        secrets: values never to show in errors (tokens, passwords).
        timeout: ``(connect, read)`` seconds.
        max_body_bytes: a larger response raises ``ResponseTooLarge``.
        max_redirects: redirects followed before failing.
        pagination: ``none``, ``link`` (RFC 8288 ``Link: <...>; rel="next"``) or ``cursor``
            (the next cursor read from the body at ``cursor_path``, sent as ``cursor_param``).
        items_path: where a page's items are in its body (``"data"``); by default a page that
            is a list is its items. Paginated loads return all items in one list.
        max_pages: more pages than this is an error (nothing is silently dropped).
        resilience: a :class:`ResilienceResource`; each request then goes through its policy
            for the service (retries honouring ``Retry-After``, breaker, rate limit), and its
            ``dagster_errors`` decides the I/O manager's mapping. Without it a request is made
            exactly once.
        service: the service name for errors, telemetry and the resilience policy. Default:
            each request's origin (:func:`rest_service`, ``rest:https://api.example.com``).
        session: an :class:`~flowstone_dagster.http.HttpSession` to use instead of a new one.
    """

    def __init__(
        self,
        url_fn: Callable[[Any], str],
        *,
        format: str = "json",
        method: str = "POST",
        headers: Mapping[str, str] | None = None,
        secret_headers: Iterable[str] = (),
        auth_headers: Mapping[str, str] | None = None,
        auth_params: Mapping[str, str] | None = None,
        secrets: Iterable[str] = (),
        timeout: tuple[float, float] = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        max_redirects: int = 10,
        pagination: str = "none",
        cursor_path: str | None = None,
        cursor_param: str = "cursor",
        items_path: str | None = None,
        max_pages: int = 100,
        verify: bool = True,
        ca_bundle: str | None = None,
        resilience: ResilienceResource | None = None,
        service: str | None = None,
        session: HttpSession | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ConfigurationError(f"must be one of {', '.join(FORMATS)}", field="format")
        if method.upper() not in ("POST", "PUT", "PATCH"):
            raise ConfigurationError("must be POST, PUT or PATCH", field="method")
        if pagination not in ("none", "link", "cursor"):
            raise ConfigurationError("must be none, link or cursor", field="pagination")
        if pagination == "cursor" and not cursor_path:
            raise ConfigurationError("is required when pagination is 'cursor'", field="cursor_path")
        if pagination != "none" and format not in ("json", "ndjson"):
            raise ConfigurationError("pagination needs the json or ndjson format", field="format")
        if max_body_bytes < 1:
            raise ConfigurationError("must be positive", field="max_body_bytes")
        if max_pages < 1:
            raise ConfigurationError("must be at least 1", field="max_pages")
        self.url_fn = url_fn
        self.format = format
        self.method = method.upper()
        self.max_body_bytes = max_body_bytes
        self.pagination = pagination
        self.cursor_path = cursor_path
        self.cursor_param = cursor_param
        self.items_path = items_path
        self.max_pages = max_pages
        self.resilience = resilience
        self.service = service
        secret_names = tuple(secret_headers)
        given = dict(headers or {})
        # Credentials set through `headers` get the same origin rule as `auth_headers`.
        credentials = {k: v for k, v in given.items() if is_secret_header(k, secret_names)}
        plain = {k: v for k, v in given.items() if k not in credentials}
        self.headers = {"Accept": MEDIA_TYPES[format], **plain}
        self.auth_headers = {**credentials, **dict(auth_headers or {})}
        self.auth_params = dict(auth_params or {})
        for value in (*self.auth_headers.values(), *self.auth_params.values()):
            register_secret(value)
            scheme, _, credential = value.partition(" ")  # "Token abc": abc alone is secret too
            if credential and scheme.isalpha():
                register_secret(credential)
        self.session = session or create_session(
            timeout=timeout,
            verify=verify,
            ca_bundle=ca_bundle,
            max_redirects=max_redirects,
            secrets=[*secrets, *self.auth_headers.values(), *self.auth_params.values()],
            service=service,
            telemetry_event=None,  # flowstone.rest.load / .store report each call
            secret_headers=[*secret_names, *self.auth_headers],
        )

    def __repr__(self) -> str:
        service = self.service or "<origin>"
        return f"<RestClient service={service!r} format={self.format!r}>"

    def _url(self, partition: Any) -> str:
        if partition is not None:
            check_partition_key(partition)
        return self.url_fn(partition)

    def service_for(self, url: str) -> str:
        """The service of a request to ``url``: ``service``, else the URL's origin."""
        return self.service or rest_service(url)

    # -- requests, each through the resilience policy when there is one ------------------------

    def _send(
        self, attempts: list[int], method: str, url: str, *, origin: str, **kwargs: Any
    ) -> tuple[requests.Response, bytes]:
        """One request and its body, as one attempt of the resilience policy (so a connection
        that breaks while the body streams is retried like one that breaks before it)."""
        if self.auth_headers or self.auth_params:
            kwargs["auth"] = HeaderAuth(self.auth_headers, origin, params=self.auth_params)

        service = self.service_for(url)

        def once() -> tuple[requests.Response, bytes]:
            attempts[0] += 1
            try:
                if method in ("POST", "PUT", "PATCH"):  # never a silent redirect of a store
                    response = self.session.send_body(method, url, stream=True, **kwargs)
                else:
                    response = self.session.request(method, url, stream=True, **kwargs)
                return response, self.session.read_body(response, max_bytes=self.max_body_bytes)
            except FlowstoneError as exc:
                if exc.service is None:  # a session shared by origins names none
                    exc.service = service
                raise

        return resolve(self.resilience).call(service, once, dagster_errors=False)

    # -- load ----------------------------------------------------------------------------------

    def load(
        self, partition: Any = None, *, asset: str | None = None, as_dataframe: bool = False
    ) -> Any:
        """GET the value at ``url_fn(partition)``, following pagination.

        Returns the decoded body (``None`` for 204). Raises ``NotFound`` (saying which asset and
        partition), ``Unauthorized``, ``Forbidden``, ``HTTPError``, ``DecodeError``,
        ``ResponseTooLarge``, ``CallTimeout``, ``TransportError``, or with ``resilience``
        ``MaxAttemptsExceeded`` / ``CircuitOpen``.
        """
        url = self._url(partition)
        attempts = [0]
        with telemetry.span(
            "flowstone.rest.load", method="GET", format=self.format, service=self.service_for(url)
        ) as call:
            try:
                value, status, size, pages = self._load_pages(url, attempts, as_dataframe)
            except NotFound as exc:
                what = f"asset {asset!r} " if asset else ""
                where = f"partition {partition!s}" if partition is not None else "(unpartitioned)"
                raise NotFound(
                    f"no data for {what}{where}: {exc.message}",
                    status=exc.status,
                    url=exc.url,
                    method=exc.method,
                    body=exc.body,
                    service=exc.service,
                ) from None
            finally:
                call.attempts = max(attempts[0], 1)
            call.set(status=status, bytes=size, pages=pages)
        return value

    def _load_pages(
        self, url: str, attempts: list[int], as_dataframe: bool
    ) -> tuple[Any, int, int, int]:
        if self.pagination == "none":
            response, body = self._send(attempts, "GET", url, origin=url, headers=self.headers)
            if response.status_code == 204 or not body:
                return None, response.status_code, 0, 1
            value = self._decode(body, url, response, as_dataframe)
            return value, response.status_code, len(body), 1

        items: list[Any] = []
        total, pages, status = 0, 0, 200
        next_url: str | None = url
        params: dict[str, str] | None = None
        seen: set[tuple[str, str | None]] = set()
        while next_url is not None:
            marker = (next_url, params[self.cursor_param] if params else None)
            if marker in seen:
                raise ExternalServiceError(
                    f"pagination loop at {self.session.redact(next_url)}: the same page was "
                    "returned as the next one",
                    service=self.service_for(next_url),
                )
            seen.add(marker)
            pages += 1
            if pages > self.max_pages:
                raise ExternalServiceError(
                    f"{self.session.redact(url)} has more than max_pages={self.max_pages} pages; "
                    "raise max_pages to load them all",
                    service=self.service_for(url),
                )
            # Credentials go to the first page's origin only, never to a next link elsewhere.
            response, body = self._send(
                attempts, "GET", next_url, origin=url, headers=self.headers, params=params
            )
            status = response.status_code
            total += len(body)
            page = self._decode(body, next_url, response, False) if body else None
            items.extend(self._items_of(page, next_url))
            next_url, params = self._next_page(url, next_url, response, page)
        if as_dataframe:
            return require_pandas().DataFrame(items), status, total, pages
        return items, status, total, pages

    def _items_of(self, page: Any, url: str) -> list[Any]:
        if page is None:
            return []
        items = _dig(page, self.items_path) if self.items_path else page
        if items is None:
            return []
        if not isinstance(items, list):
            where = f" at items_path {self.items_path!r}" if self.items_path else ""
            raise DecodeError(
                f"page from {self.session.redact(url)} has no list of items{where} "
                f"(found {type(items).__name__}); set items_path",
                url=self.session.redact(url),
                fmt=self.format,
                service=self.service_for(url),
            )
        return items

    def _next_page(
        self, first_url: str, url: str, response: requests.Response, page: Any
    ) -> tuple[str | None, dict[str, str] | None]:
        if self.pagination == "link":
            target = response.links.get("next", {}).get("url")
            return (urljoin(url, target), None) if target else (None, None)
        cursor = _dig(page, self.cursor_path or "") if page is not None else None
        if cursor in (None, ""):
            return None, None
        return first_url, {self.cursor_param: str(cursor)}

    def _decode(
        self, body: bytes, url: str, response: requests.Response, as_dataframe: bool
    ) -> Any:
        try:
            return decode(
                body,
                self.format,
                url=self.session.redact(url),
                encoding=_declared_charset(response),
                as_dataframe=as_dataframe,
            )
        except DecodeError as exc:
            exc.service = self.service_for(url)
            raise

    # -- store and head ------------------------------------------------------------------------

    def store(self, data: Any, partition: Any = None, *, asset: str | None = None) -> StoreResult:
        """Send ``data`` to ``url_fn(partition)`` with the configured method.

        Raises ``TypeError`` when ``data`` does not fit the format (nothing is sent), else the
        same errors as :meth:`load`.
        """
        url = self._url(partition)
        try:
            body = encode(data, self.format)
        except TypeError as exc:
            what = f"asset {asset!r}" if asset else "the value"
            raise TypeError(f"cannot store {what} as {self.format}: {exc}") from None
        headers = {"Content-Type": MEDIA_TYPES[self.format], **self.headers}
        attempts = [0]
        with telemetry.span(
            "flowstone.rest.store",
            method=self.method,
            format=self.format,
            service=self.service_for(url),
        ) as call:
            try:
                response, _ = self._send(
                    attempts, self.method, url, origin=url, data=body, headers=headers
                )
            finally:
                call.attempts = max(attempts[0], 1)
            call.set(status=response.status_code, bytes=len(body))
        return StoreResult(
            url=self.session.redact(response.url or url),
            method=self.method,
            status=response.status_code,
            bytes=len(body),
            etag=response.headers.get("ETag"),
            location=response.headers.get("Location"),
        )

    def head(self, partition: Any = None) -> HeadInfo | None:
        """``HEAD`` the partition's URL: ``None`` when the value does not exist (404/410) or
        the server does not support ``HEAD`` (405/501)."""
        url = self._url(partition)
        attempts = [0]
        response, _ = self._send(
            attempts, "HEAD", url, origin=url, headers=self.headers, raise_for_status=False
        )
        if response.status_code in (404, 405, 410, 501):
            return None
        if response.status_code >= 400:
            error = self.session.error_for(response)
            error.service = error.service or self.service_for(url)
            raise error
        length = response.headers.get("Content-Length")
        return HeadInfo(
            status=response.status_code,
            content_type=response.headers.get("Content-Type"),
            content_length=int(length) if length and length.isdigit() else None,
            etag=response.headers.get("ETag"),
            last_modified=response.headers.get("Last-Modified"),
        )

    def exists(self, partition: Any = None) -> bool:
        """Whether the partition's value exists, by ``HEAD``."""
        return self.head(partition) is not None


# -- the I/O manager --------------------------------------------------------------------------
