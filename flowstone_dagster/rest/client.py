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

import contextlib
import email.message
import itertools
from collections.abc import Callable, Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, get_args
from urllib.parse import unquote, urlsplit

import requests

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
    DecodeError,
    ExternalServiceError,
    FlowstoneError,
    NotFound,
    Unauthorized,
)
from flowstone_dagster.formats import (
    FORMATS,
    MEDIA_TYPES,
    NonFinite,
    OwnedBody,
    decode,
    encode,
    gc_paused,
    iter_records,
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
from flowstone_dagster.rest.auth import OAuth2ClientCredentials, OAuth2TokenSource
from flowstone_dagster.rest.pagination import (
    NoPagination,
    PageRequest,
    Paginated,
    RestPagination,
    dig,
)

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "STREAM_PAGE_ITEMS",
    "HeadInfo",
    "RestClient",
    "StoreResult",
    "check_partition_key",
    "rest_service",
]

T = TypeVar("T")

#: Largest response body read by default (100 MiB); ``max_body_bytes`` changes it.
DEFAULT_MAX_BODY_BYTES = 100 * 1024 * 1024
#: Records per page when :meth:`RestClient.iter_pages` streams an unpaginated ndjson/csv body.
STREAM_PAGE_ITEMS = 10_000
_PAGINATED_KINDS = get_args(Paginated)


@dataclass
class _LoadStats:
    """What one load's telemetry event reports (all pages and attempts)."""

    attempts: list[int] = field(default_factory=lambda: [0])
    status: int | None = None
    bytes: int = 0
    pages: int = 0


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
    if not content_type or "charset" not in content_type.lower():
        return None  # the common case, without building an email message for it
    message = email.message.Message()
    message["Content-Type"] = content_type
    charset = message.get_param("charset")
    return charset if isinstance(charset, str) else None


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
        oauth2: OAuth2 client credentials: each request then carries ``Authorization: Bearer``
            with a token from its ``token_url`` (cached per process, fetched again before it
            expires and once on a 401; :class:`~flowstone_dagster.rest.auth.OAuth2TokenSource`),
            to the URL's origin only.
        timeout: ``(connect, read)`` seconds.
        max_body_bytes: a larger response raises ``ResponseTooLarge``.
        max_redirects: redirects followed before failing.
        non_finite: ``null`` (the default) stores NaN and infinities in ``json``/``ndjson`` as
            ``null``; ``error`` refuses such a value with ``TypeError`` before sending.
        store_follows_301: a store answered 301 to the same origin re-sends its method and body
            to the new location (a route moved for good) instead of raising ``RedirectRefused``;
            302/303 are always refused, and any redirect to another origin.
        pagination: how a load follows pages, one of the kinds of
            :mod:`~flowstone_dagster.rest.pagination` (``LinkPagination()``,
            ``CursorPagination(cursor_path="meta.next")``, ``JsonLinkPagination``,
            ``OffsetPagination``, ``PageNumberPagination``, ``HeaderCursorPagination``), each
            with ``items_path`` and ``max_pages``; default ``NoPagination()``. Paginated loads
            return all items in one list; :meth:`iter_pages` and :meth:`iter_items` stream them.
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
        store_follows_301: bool = False,
        non_finite: NonFinite = "null",
        pagination: RestPagination | None = None,
        verify: bool = True,
        ca_bundle: str | None = None,
        oauth2: OAuth2ClientCredentials | None = None,
        resilience: ResilienceResource | None = None,
        service: str | None = None,
        session: HttpSession | None = None,
    ) -> None:
        if format not in FORMATS:
            raise ConfigurationError(f"must be one of {', '.join(FORMATS)}", field="format")
        if method.upper() not in ("POST", "PUT", "PATCH"):
            raise ConfigurationError("must be POST, PUT or PATCH", field="method")
        pagination = pagination if pagination is not None else NoPagination()
        if not isinstance(pagination, (NoPagination, *_PAGINATED_KINDS)):
            raise ConfigurationError(
                "must be a pagination kind (LinkPagination(), CursorPagination(...), ...), not "
                f"{pagination!r}",
                field="pagination",
            )
        if not isinstance(pagination, NoPagination) and format not in ("json", "ndjson"):
            raise ConfigurationError("pagination needs the json or ndjson format", field="format")
        if max_body_bytes < 1:
            raise ConfigurationError("must be positive", field="max_body_bytes")
        self.url_fn = url_fn
        self.format = format
        self.method = method.upper()
        self.max_body_bytes = max_body_bytes
        self.pagination: RestPagination = pagination
        self.store_follows_301 = store_follows_301
        if non_finite not in ("null", "error"):
            raise ConfigurationError("must be null or error", field="non_finite")
        self.non_finite: NonFinite = non_finite
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

        self.token_source: OAuth2TokenSource | None = None
        if oauth2 is not None:
            self.token_source = OAuth2TokenSource(
                oauth2,
                create_session(
                    timeout=timeout,
                    verify=verify,
                    ca_bundle=ca_bundle,
                    secrets=[oauth2.client_secret],
                    service=rest_service(oauth2.token_url),
                ),
            )

    def close(self) -> None:
        """Release the connections of the client (and of its token endpoint)."""
        self.session.close()
        if self.token_source is not None:
            self.token_source.session.close()

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
        self,
        attempts: list[int],
        method: str,
        url: str,
        *,
        origin: str,
        read: bool = True,
        **kwargs: Any,
    ) -> tuple[requests.Response, bytes]:
        """One request and its body, as one attempt of the resilience policy (so a connection
        that breaks while the body streams is retried like one that breaks before it). With
        ``read=False`` the body is left to the caller (streamed) and ``b""`` returned."""
        if self.auth_headers or self.auth_params:
            kwargs["auth"] = HeaderAuth(self.auth_headers, origin, params=self.auth_params)

        service = self.service_for(url)
        tokens = self.token_source

        def issue(token: str | None) -> requests.Response:
            if token is not None:  # the bearer token, like any credential, to `origin` only
                bearer = {**self.auth_headers, "Authorization": f"Bearer {token}"}
                kwargs["auth"] = HeaderAuth(bearer, origin, params=self.auth_params)
            if method in ("POST", "PUT", "PATCH"):  # never a silent redirect of a store
                return self.session.send_body(
                    method, url, stream=True, follow_301=self.store_follows_301, **kwargs
                )
            return self.session.request(method, url, stream=True, **kwargs)

        def once() -> tuple[requests.Response, bytes]:
            attempts[0] += 1
            try:
                token = tokens.token() if tokens is not None else None
                try:
                    response = issue(token)
                except Unauthorized:
                    if tokens is None or token is None:
                        raise
                    # A token revoked or expired early: one new token, one more try.
                    response = issue(tokens.refresh(token))
                if not read:
                    return response, b""
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

        Returns the decoded body (``None`` for 204); a paginated load returns all pages' items
        in one list (or one DataFrame). Raises ``NotFound`` (saying which asset and partition),
        ``Unauthorized``, ``Forbidden``, ``HTTPError``, ``DecodeError``, ``ResponseTooLarge``,
        ``CallTimeout``, ``TransportError``, or with ``resilience`` ``MaxAttemptsExceeded`` /
        ``CircuitOpen``.
        """
        url = self._url(partition)
        with self._load_span(url, partition, asset) as stats:
            if isinstance(self.pagination, NoPagination):
                return self._load_one(url, stats, as_dataframe)
            items: list[Any] = []
            for page in self._pages(url, stats, self.pagination):
                items.extend(page)
        return require_pandas().DataFrame(items) if as_dataframe else items

    def iter_pages(
        self, partition: Any = None, *, asset: str | None = None
    ) -> Generator[list[Any], None, None]:
        """The items of ``url_fn(partition)`` page by page, each page requested when the
        previous one has been consumed: memory holds one page, however many there are.

        Without pagination, a ``json`` array (element by element), ``ndjson`` or ``csv`` body
        is decoded as it arrives and yielded in pages of ``STREAM_PAGE_ITEMS`` records (memory
        stays about one page, whatever the body's size); another ``json`` value is a page of
        that one value, a ``text`` or ``bytes`` body a page of its value; 204 or an empty body
        yields nothing.

        Each page's request goes through the resilience policy; a streamed body that breaks
        midway raises (the records already yielded cannot be taken back), so a retry is the
        step's. Errors are those of :meth:`load`.
        """
        url = self._url(partition)
        with self._load_span(url, partition, asset) as stats:
            try:
                yield from self._iter_pages(url, stats)
            except GeneratorExit:
                return  # the consumer stopped early: the load ends there, not an error

    def _iter_pages(self, url: str, stats: _LoadStats) -> Generator[list[Any], None, None]:
        if not isinstance(self.pagination, NoPagination):
            yield from self._pages(url, stats, self.pagination)
            return
        if self.format not in ("json", "ndjson", "csv"):
            value = self._load_one(url, stats, False)
            if value is not None:
                yield value if isinstance(value, list) else [value]
            return
        response, _ = self._send(
            stats.attempts, "GET", url, origin=url, headers=self.headers, read=False
        )
        stats.status, stats.pages = response.status_code, 1
        chunks = self.session.iter_body(
            response, max_bytes=self.max_body_bytes, consumer_time_counts=False
        )

        def counted() -> Iterator[bytes]:
            for chunk in chunks:
                stats.bytes += len(chunk)
                yield chunk

        records = iter_records(
            counted(),
            self.format,
            url=self.session.redact(url),
            encoding=_declared_charset(response),
        )
        try:
            while True:
                with gc_paused():  # as in decode(): building many records, no cycles
                    page = list(itertools.islice(records, STREAM_PAGE_ITEMS))
                if not page:
                    break
                yield page
        except DecodeError as exc:
            exc.service = self.service_for(url)
            raise
        finally:
            chunks.close()  # the connection goes back (or is dropped) however the stream ends

    def iter_items(self, partition: Any = None, *, asset: str | None = None) -> Iterator[Any]:
        """The items of :meth:`iter_pages`, one by one."""
        for page in self.iter_pages(partition, asset=asset):
            yield from page

    def _load_one(self, url: str, stats: _LoadStats, as_dataframe: bool) -> Any:
        response, body = self._send(stats.attempts, "GET", url, origin=url, headers=self.headers)
        stats.status, stats.bytes, stats.pages = response.status_code, len(body), 1
        if response.status_code == 204 or not body:
            return None
        handle = OwnedBody(body)
        del body  # the decoder frees the bytes once it has their text
        return self._decode(handle, url, response, as_dataframe)

    @contextlib.contextmanager
    def _load_span(self, url: str, partition: Any, asset: str | None) -> Iterator[_LoadStats]:
        """One ``flowstone.rest.load`` event for a whole load (all pages), and ``NotFound``
        saying which asset and partition."""
        stats = _LoadStats()
        with telemetry.span(
            "flowstone.rest.load", method="GET", format=self.format, service=self.service_for(url)
        ) as call:
            try:
                yield stats
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
                call.attempts = max(stats.attempts[0], 1)
                if stats.status is not None:
                    call.set(status=stats.status)
                call.set(bytes=stats.bytes, pages=stats.pages)

    def _pages(self, url: str, stats: _LoadStats, pagination: Paginated) -> Iterator[list[Any]]:
        """Each page's items, following ``pagination`` with its guards: a next page already
        requested is a loop, more than ``max_pages`` pages is an error."""
        request: PageRequest | None = pagination.first_request(url)
        seen: set[tuple[str, tuple[tuple[str, str], ...]]] = set()
        while request is not None:
            page_url, params = request
            marker = (page_url, tuple(sorted(params.items())))
            if marker in seen:
                raise ExternalServiceError(
                    f"pagination loop at {self.session.redact(page_url)} "
                    f"{self._shown_params(params)}: the same page was returned as the next one",
                    service=self.service_for(page_url),
                )
            seen.add(marker)
            if stats.pages >= pagination.max_pages:
                raise ExternalServiceError(
                    f"{self.session.redact(url)} has more than max_pages={pagination.max_pages} "
                    "pages; raise max_pages to load them all",
                    service=self.service_for(url),
                )
            stats.pages += 1
            # Credentials go to the first page's origin only, never to a next link elsewhere.
            response, body = self._send(
                stats.attempts,
                "GET",
                page_url,
                origin=url,
                headers=self.headers,
                params=params or None,
            )
            stats.status = response.status_code
            stats.bytes += len(body)
            page = None
            if body:
                handle = OwnedBody(body)
                del body  # the decoder frees the bytes once it has their text
                page = self._decode(handle, page_url, response, False)
            items = self._items_of(page, page_url, pagination.items_path)
            try:
                request = pagination.next_request(request, response, page, items)
            except ValueError as exc:
                raise DecodeError(
                    f"page from {self.session.redact(page_url)}: {exc}",
                    url=self.session.redact(page_url),
                    fmt=self.format,
                    service=self.service_for(page_url),
                ) from None
            del page
            yield items

    def _shown_params(self, params: Mapping[str, str]) -> str:
        shown = {k: v for k, v in params.items() if k not in self.auth_params}
        return f"(params {shown})" if shown else ""

    def _items_of(self, page: Any, url: str, items_path: str | None) -> list[Any]:
        if page is None:
            return []
        items = dig(page, items_path) if items_path else page
        if items is None:
            return []
        if not isinstance(items, list):
            where = f" at items_path {items_path!r}" if items_path else ""
            raise DecodeError(
                f"page from {self.session.redact(url)} has no list of items{where} "
                f"(found {type(items).__name__}); set items_path",
                url=self.session.redact(url),
                fmt=self.format,
                service=self.service_for(url),
            )
        return items

    def _decode(
        self, body: OwnedBody, url: str, response: requests.Response, as_dataframe: bool
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
            body = encode(data, self.format, non_finite=self.non_finite)
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
            self._check_sent(response, body)
            call.set(status=response.status_code, bytes=len(body))
        return StoreResult(
            url=self.session.redact(response.url or url),
            method=self.method,
            status=response.status_code,
            bytes=len(body),
            etag=response.headers.get("ETag"),
            location=response.headers.get("Location"),
        )

    def _check_sent(self, response: requests.Response, body: bytes) -> None:
        """The request the server answered (after any redirect) carried the whole body with
        its length: never an empty or shortened re-send reported as stored."""
        sent = response.request
        length = sent.headers.get("Content-Length") if sent is not None else None
        sent_body = sent.body if sent is not None else None
        sent_size = len(sent_body) if isinstance(sent_body, (bytes, str)) else None
        if length != str(len(body)) or sent_size != len(body):
            raise ExternalServiceError(
                f"{self.method} {self.session.redact(response.url or '')} was answered "
                f"{response.status_code} for a request carrying {sent_size} bytes "
                f"(Content-Length {length}), not the {len(body)} bytes to store; nothing is "
                "reported as stored",
                service=self.service_for(response.url or ""),
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
