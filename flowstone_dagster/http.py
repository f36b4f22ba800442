"""The one HTTP session factory of flowstone-dagster.

Every integration that speaks HTTP through ``requests`` gets its session from
:func:`create_session`, so that all of them share the same guarantees::

    from flowstone_dagster.http import create_session

    session = create_session(timeout=(3.05, 30), ca_bundle="/etc/ssl/internal-ca.pem")
    orders = session.get("https://api.example.com/orders", params={"day": "2025-01-15"}).json()

- **Timeouts always set.** A request without ``timeout=`` uses the session's
  ``(connect, read)`` default; there is no way to wait forever by accident.
- **TLS verified** by default; ``ca_bundle`` trusts a private CA.
- **Connection pooling** per host (``pool_size`` connections kept alive).
- **No hidden retries.** urllib3 retries nothing; retrying is the resilience layer's job.
- **Errors from the taxonomy.** A timeout raises :class:`~flowstone_dagster.errors.CallTimeout`,
  a refused or broken connection :class:`~flowstone_dagster.errors.TransportError`, a failing
  status the matching :class:`~flowstone_dagster.errors.HTTPError` subclass (pass
  ``raise_for_status=False`` to a request to get the response instead).
- **No secrets in errors or telemetry.** Passwords in URLs, secret-looking query parameters and
  any value listed in ``secrets`` are replaced by ``***``.
- **Telemetry.** Each request emits ``flowstone.http.request`` (method, host, status, bytes).
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections.abc import Generator, Iterable, Mapping
from contextlib import AbstractContextManager, nullcontext, suppress
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests
import requests.auth
import urllib3
from requests.adapters import HTTPAdapter

from flowstone_dagster import telemetry
from flowstone_dagster._version import __version__
from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    DecodeError,
    ExternalServiceError,
    FlowstoneError,
    RedirectRefused,
    ResponseTooLarge,
    TransportError,
    error_for_status,
    parse_retry_after,
)
from flowstone_dagster.redaction import (
    _URL_IN_TEXT,
    SECRET_HEADERS,
    redact_headers,
    redact_text,
    redact_url,
)
from flowstone_dagster.resilience.timeouts import current_deadline

Timeout = float | tuple[float, float]

__all__ = [
    "DEFAULT_CONNECT_TIMEOUT",
    "DEFAULT_READ_TIMEOUT",
    "DEFAULT_USER_AGENT",
    "HeaderAuth",
    "HttpSession",
    "is_secret_header",
    "create_session",
    "origin_of",
    "redact_headers",
    "redact_text",
    "redact_url",
]

#: Seconds to wait for a TCP (and TLS) connection.
DEFAULT_CONNECT_TIMEOUT = 10.0
#: Seconds to wait between bytes of the response.
DEFAULT_READ_TIMEOUT = 60.0
#: Redirects a request with a body never follows: they turn it into a GET or drop the body.
REFUSED_BODY_REDIRECTS = frozenset({301, 302, 303})
#: Redirects a request with a body follows, to the same origin only, re-sending method and body.
FOLLOWED_BODY_REDIRECTS = frozenset({307, 308})


#: Header names whose values are credentials, besides any name containing one of
#: ``SECRET_HEADER_WORDS`` and the ``secret_headers`` a session or client is given.
DEFAULT_SECRET_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "x-api-key", "api-key", "x-auth-token", "cookie"}
)
#: A header whose name contains one of these words carries a credential (``X-Custom-Token``).
SECRET_HEADER_WORDS = ("token", "secret", "key")


def is_secret_header(name: str, extra: Iterable[str] = ()) -> bool:
    """Whether header ``name`` carries a credential: one of ``DEFAULT_SECRET_HEADERS`` (or
    redaction's ``SECRET_HEADERS``), a name containing ``token``, ``secret`` or ``key``, or one
    of ``extra`` (compared case-insensitively)."""
    lowered = name.lower()
    return (
        lowered in DEFAULT_SECRET_HEADERS
        or lowered in SECRET_HEADERS
        or any(word in lowered for word in SECRET_HEADER_WORDS)
        or lowered in {n.lower() for n in extra}
    )


logger = logging.getLogger("flowstone_dagster.http")
_insecure_warned: set[tuple[str, str, int | None]] = set()
_insecure_lock = threading.Lock()


def _warn_insecure(url: str) -> None:
    """Log a WARNING, once per origin per process, that TLS verification is off for it."""
    origin = origin_of(url)
    if origin in _insecure_warned:
        return
    with _insecure_lock:
        if origin in _insecure_warned:
            return
        _insecure_warned.add(origin)
    logger.warning(
        "TLS certificate verification is off (verify=False / verify_tls=False) for requests to "
        "%s: anyone on the network path can impersonate it; set ca_bundle to trust a private CA "
        "instead",
        _origin_text(origin),
    )


DEFAULT_USER_AGENT = f"flowstone-dagster/{__version__} python-requests/{requests.__version__}"


def _reason(exc: requests.RequestException, secrets: Iterable[str]) -> str:
    """The underlying cause of a requests error, with URLs in it redacted."""
    cause: Any = exc.args[0] if exc.args else exc
    cause = getattr(cause, "reason", cause)  # urllib3's MaxRetryError wraps the real reason
    text = str(cause)
    secrets = tuple(secrets)
    return _URL_IN_TEXT.sub(lambda m: redact_url(m.group(0), secrets), redact_text(text, secrets))


class HttpSession(requests.Session):
    """A ``requests.Session`` with default timeouts, taxonomy errors, redaction and telemetry.

    Build it with :func:`create_session`. ``request`` (and so ``get``, ``post``, ...) accepts
    one extra keyword, ``raise_for_status`` (default ``True``).
    """

    def __init__(
        self,
        *,
        timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
        secrets: Iterable[str] = (),
        service: str | None = None,
        telemetry_event: str | None = "flowstone.http.request",
        secret_headers: Iterable[str] = (),
    ) -> None:
        super().__init__()
        self.telemetry_event = telemetry_event
        self.secret_headers = frozenset(name.lower() for name in secret_headers)
        self.timeout = timeout
        self.secrets: tuple[str, ...] = tuple(s for s in secrets if s)
        self.service = service

    def __repr__(self) -> str:
        return f"<HttpSession service={self.service!r} timeout={self.timeout!r}>"

    def redact(self, url: str) -> str:
        """``url`` as it may appear in errors, logs and metadata."""
        return redact_url(url, self.secrets)

    def request(
        self,
        method: str | bytes,
        url: str | bytes,
        *args: Any,
        raise_for_status: bool = True,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request; see ``requests.Session.request``.

        Raises :class:`CallTimeout`, :class:`TransportError`, or (with ``raise_for_status``)
        the taxonomy error for a status >= 400.
        """
        method_name = method.decode() if isinstance(method, bytes) else str(method)
        method_name = method_name.upper()
        url_text = url.decode() if isinstance(url, bytes) else str(url)
        if kwargs.get("timeout") is None:
            kwargs["timeout"] = self.timeout
        if kwargs.get("verify") is None:
            # requests lets REQUESTS_CA_BUNDLE override a session's verify; ours wins.
            kwargs["verify"] = self.verify
        if kwargs["verify"] is False:
            _warn_insecure(url_text)
        budget = _Budget.start(kwargs["timeout"])
        kwargs["timeout"] = budget.socket_timeout(kwargs["timeout"])
        stream = bool(kwargs.get("stream"))
        kwargs["stream"] = True  # the body is read here, against the request's total limit
        host = urlsplit(url_text).hostname or ""
        with self._span(method_name, host) as call:
            try:
                response = super().request(method_name, url_text, *args, **kwargs)
            except requests.exceptions.RequestException as exc:
                raise self.translate(exc, method_name, url_text, kwargs["timeout"]) from None
            response._flowstone_budget = budget  # type: ignore[attr-defined]
            call.set(status=response.status_code)
            if not stream:
                content = self.read_body(response)
                response._content = content
                response._content_consumed = True  # type: ignore[attr-defined]
                call.set(bytes=len(content))
            elif budget.expired:
                response.close()
                raise self._over_budget(budget, method_name, url_text)
            if raise_for_status and response.status_code >= 400:
                raise self.error_for(response)
        return response

    def send_body(
        self,
        method: str,
        url: str,
        *,
        raise_for_status: bool = True,
        follow_301: bool = False,
        **kwargs: Any,
    ) -> requests.Response:
        """Send a request with a body (``POST``/``PUT``/``PATCH``) that never follows a redirect
        silently.

        301/302/303 raise :class:`RedirectRefused` naming the status and the (redacted)
        ``Location``; 307/308 are followed up to ``max_redirects`` times, re-sending the same
        method and the same ``data``, but only to the origin (scheme, host, port) of ``url``;
        to another origin they raise :class:`RedirectRefused` naming both. With ``follow_301``
        a 301 (a route moved for good) is followed like a 308: same origin only, same method
        and body. ``data`` must be bytes or a str (a stream could not be sent twice).
        """
        method = method.upper()
        kwargs["allow_redirects"] = False
        start = origin_of(url)
        current = url
        for _ in range(self.max_redirects + 1):
            response = self.request(method, current, raise_for_status=raise_for_status, **kwargs)
            status = response.status_code
            if status not in REFUSED_BODY_REDIRECTS | FOLLOWED_BODY_REDIRECTS:
                return response
            location = response.headers.get("Location")
            response.close()
            target = urljoin(current, location) if location else None
            where = f"{method} {self.redact(current)}"
            if target is None:
                raise self._refused(
                    status, current, method, f"HTTP {status} from {where} without a Location header"
                )
            shown = self.redact(target)
            if status in REFUSED_BODY_REDIRECTS and not (follow_301 and status == 301):
                raise self._refused(
                    status,
                    current,
                    method,
                    f"HTTP {status} from {where} redirects to {shown}: not followed, it would "
                    f"re-send the {method} as a GET or without its body; point the URL at the "
                    "new location (or have the server answer 307/308)",
                )
            if origin_of(target) != start:
                raise self._refused(
                    status,
                    current,
                    method,
                    f"HTTP {status} from {where} redirects to another origin, {shown}: not "
                    f"followed ({_origin_text(start)} != {_origin_text(origin_of(target))}); "
                    "point the URL at the new location",
                )
            current = target
        raise ExternalServiceError(
            f"{method} {self.redact(url)}: more than {self.max_redirects} redirects",
            service=self.service,
        )

    def _refused(self, status: int, url: str, method: str, message: str) -> RedirectRefused:
        return RedirectRefused(
            message, status=status, url=self.redact(url), method=method, service=self.service
        )

    def translate(
        self,
        exc: requests.exceptions.RequestException,
        method: str,
        url: str,
        timeout: Timeout | None = None,
    ) -> FlowstoneError:
        """The taxonomy error for a ``requests`` failure (redacted; the caller raises it).

        The one mapping, for sending a request and for reading its body afterwards.
        """
        where = f"{method} {self.redact(url)}"
        # While a body streams, requests reports a read timeout as a ConnectionError wrapping
        # urllib3's ReadTimeoutError: it is a timeout all the same.
        cause = exc.args[0] if exc.args else None
        if isinstance(exc, requests.exceptions.Timeout) or isinstance(
            cause, urllib3.exceptions.TimeoutError
        ):
            limit = timeout if timeout is not None else self.timeout
            return CallTimeout(
                f"{where} timed out after {limit} s ({type(exc).__name__})",
                timeout=_total_seconds(limit),
                service=self.service,
            )
        if isinstance(exc, requests.exceptions.SSLError):
            return TransportError(
                f"{where}: TLS failure: {_reason(exc, self.secrets)} "
                "(set ca_bundle to trust a private CA)",
                service=self.service,
                tls=True,
            )
        if isinstance(
            exc, (requests.exceptions.ConnectionError, requests.exceptions.ChunkedEncodingError)
        ):
            # ChunkedEncodingError: the connection broke in the middle of the body.
            return TransportError(f"{where}: {_reason(exc, self.secrets)}", service=self.service)
        if isinstance(exc, requests.exceptions.ContentDecodingError):
            return DecodeError(
                f"{where}: the body's Content-Encoding does not decode: "
                f"{_reason(exc, self.secrets)}",
                url=self.redact(url),
                service=self.service,
            )
        if isinstance(exc, requests.exceptions.TooManyRedirects):
            return ExternalServiceError(
                f"{where}: more than {self.max_redirects} redirects", service=self.service
            )
        if isinstance(
            exc,
            (
                requests.exceptions.InvalidURL,
                requests.exceptions.MissingSchema,
                requests.exceptions.InvalidSchema,
            ),
        ):
            return ConfigurationError(
                f"invalid URL {self.redact(url)}: {type(exc).__name__}",
                field="url",
                service=self.service,
            )
        return ExternalServiceError(
            f"{where}: {type(exc).__name__}: {_reason(exc, self.secrets)}", service=self.service
        )

    def read_body(self, response: requests.Response, *, max_bytes: int | None = None) -> bytes:
        """The body of a streamed ``response``, reading at most ``max_bytes``.

        Raises :class:`ResponseTooLarge` when the body (declared or received) is larger, and the
        taxonomy error when the connection fails while reading (a timeout between bytes, a
        dropped connection). Always releases the connection.
        """
        # One growing buffer whose getvalue() hands over its bytes without a copy: the peak is
        # about the body's size (a list of chunks joined at the end needed twice the body).
        buffer = io.BytesIO()
        for chunk in self.iter_body(response, max_bytes=max_bytes):
            buffer.write(chunk)
        return buffer.getvalue()

    def iter_body(
        self,
        response: requests.Response,
        *,
        max_bytes: int | None = None,
        consumer_time_counts: bool = True,
    ) -> Generator[bytes, None, None]:
        """The body of a streamed ``response`` chunk by chunk (at most 1 MiB each), with the
        checks of :meth:`read_body`; the connection is released when the body ends, fails, or
        the iterator is closed.

        With ``consumer_time_counts=False`` the request's total time limit counts only the
        time spent waiting for the server, not the time the caller spends between chunks (a
        slow consumer of a streamed load is not a slow server).
        """
        url = response.url or ""
        method = (response.request.method if response.request else None) or "GET"
        budget: _Budget | None = getattr(response, "_flowstone_budget", None)
        with response:
            declared = response.headers.get("Content-Length", "")
            if max_bytes is not None and declared.isdigit() and int(declared) > max_bytes:
                raise self._too_large(url, f"declares {int(declared)} bytes", max_bytes)
            size = 0
            chunks = self._chunks(response, budget, method, url)
            try:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise self._too_large(url, f"sent more than {max_bytes} bytes", max_bytes)
                    if consumer_time_counts or budget is None:
                        yield chunk
                    else:
                        handed = time.monotonic()
                        yield chunk
                        budget.at += time.monotonic() - handed
            except requests.exceptions.RequestException as exc:
                raise self.translate(exc, method, url) from None
            finally:
                chunks.close()

    def _chunks(
        self, response: requests.Response, budget: _Budget | None, method: str, url: str
    ) -> Generator[bytes, None, None]:
        """The body's chunks; with a budget, each socket read waits at most the time left and
        the total is checked between reads (a server trickling bytes cannot hold the call)."""
        raw = response.raw
        if budget is None or not isinstance(raw, urllib3.response.HTTPResponse):
            yield from response.iter_content(_READ_CHUNK)
            return
        while True:
            remaining = budget.remaining()
            if remaining <= 0:
                raise self._over_budget(budget, method, url)
            _set_read_timeout(raw, remaining)
            try:
                # read1: at most one socket read, so the check above runs between reads.
                chunk = raw.read1(_READ_CHUNK, decode_content=True)
            except urllib3.exceptions.ReadTimeoutError as exc:
                if budget.expired:
                    raise self._over_budget(budget, method, url) from None
                raise requests.exceptions.ConnectionError(exc) from None
            except urllib3.exceptions.SSLError as exc:
                raise requests.exceptions.SSLError(exc) from None
            except urllib3.exceptions.DecodeError as exc:
                raise requests.exceptions.ContentDecodingError(exc) from None
            except urllib3.exceptions.ProtocolError as exc:
                raise requests.exceptions.ChunkedEncodingError(exc) from None
            if not chunk:
                return
            yield chunk

    def _over_budget(self, budget: _Budget, method: str, url: str) -> CallTimeout:
        return CallTimeout(
            f"{method} {self.redact(url)} did not finish within {budget.limit:.3g} s, "
            f"{budget.reason} (connect, send and the whole body)",
            timeout=budget.limit,
            service=self.service,
        )

    def _too_large(self, url: str, what: str, limit: int) -> ResponseTooLarge:
        return ResponseTooLarge(
            f"response from {self.redact(url)} {what}; max_body_bytes is {limit} "
            "(raise it if the response should be that large)",
            limit=limit,
            url=self.redact(url),
            service=self.service,
        )

    def rebuild_auth(
        self, prepared_request: requests.PreparedRequest, response: requests.Response
    ) -> None:
        """On a redirect to another origin (scheme, host or port), drop every credential header
        (:func:`is_secret_header`: API keys, cookies, ``*token*``, ``secret_headers``), not only
        ``Authorization`` to another host as ``requests`` does."""
        super().rebuild_auth(prepared_request, response)
        original = response.request.url if response.request else None
        if (
            original
            and prepared_request.url
            and (
                origin_of(original) != origin_of(prepared_request.url)
                or self.should_strip_auth(original, prepared_request.url)
            )
        ):
            for name in list(prepared_request.headers):
                if is_secret_header(name, self.secret_headers):
                    del prepared_request.headers[name]

    def _span(self, method: str, host: str) -> AbstractContextManager[telemetry.Span]:
        if self.telemetry_event is None:  # the integration reports the call itself
            return nullcontext(telemetry.Span("", {}))
        return telemetry.span(self.telemetry_event, method=method, host=host)

    def error_for(self, response: requests.Response) -> ExternalServiceError:
        """The taxonomy error for a failing ``response`` (redacted; the caller raises it)."""
        body = redact_text(_error_body(response), self.secrets)
        return error_for_status(
            response.status_code,
            url=self.redact(response.url or ""),
            method=response.request.method if response.request else None,
            body=body,
            retry_after=parse_retry_after(response.headers.get("Retry-After")),
            service=self.service,
        )


_READ_CHUNK = 1024 * 1024


class _Budget:
    """The total time of one request (connect, send, the whole body): the smaller of the
    timeout's total and the remaining resilience deadline (:func:`current_deadline`)."""

    __slots__ = ("at", "limit", "reason")

    def __init__(self, limit: float, reason: str) -> None:
        self.limit = limit
        self.reason = reason
        self.at = time.monotonic() + limit

    @classmethod
    def start(cls, timeout: Timeout) -> _Budget:
        total = _total_seconds(timeout)
        deadline = current_deadline()
        if deadline is not None and deadline.remaining() < total:
            return cls(deadline.remaining(), f"the call's {deadline.seconds:g} s deadline")
        return cls(total, f"the total of its timeout {timeout!r}")

    def remaining(self) -> float:
        return self.at - time.monotonic()

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.at

    def socket_timeout(self, timeout: Timeout) -> Timeout:
        """``timeout`` with each part cut to the time left (never 0: that would not block)."""
        left = max(self.remaining(), 0.001)
        if isinstance(timeout, tuple):
            return (min(timeout[0], left), min(timeout[1], left))
        return min(timeout, left)


def _set_read_timeout(raw: urllib3.response.HTTPResponse, seconds: float) -> None:
    """Make the next socket read of ``raw`` wait at most ``seconds``."""
    connection = raw.connection
    sock = getattr(connection, "sock", None) if connection is not None else None
    if sock is not None:
        with suppress(OSError):  # already closed: the read reports it
            sock.settimeout(max(seconds, 0.001))


class HeaderAuth(requests.auth.AuthBase):
    """Credential headers (and query parameters) sent only to one origin (scheme, host, port).

    A next-page link or a redirect to another host never receives them::

        session.get(url, auth=HeaderAuth({"X-API-Key": key}, origin="https://api.example.com"))
        session.get(url, auth=HeaderAuth({}, origin=url, params={"api_key": key}))
    """

    def __init__(
        self,
        headers: Mapping[str, str],
        origin: str,
        *,
        params: Mapping[str, str] | None = None,
    ) -> None:
        self.headers = dict(headers)
        self.params = dict(params or {})
        self.origin = origin_of(origin)

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        if request.url and origin_of(request.url) == self.origin:
            request.headers.update(self.headers)
            if self.params:
                request.prepare_url(request.url, self.params)
        return request

    def __repr__(self) -> str:
        return f"<HeaderAuth {sorted(self.headers)} {sorted(self.params)} for {self.origin}>"


def _origin_text(origin: tuple[str, str, int | None]) -> str:
    scheme, host, port = origin
    host = f"[{host}]" if ":" in host else host
    return f"{scheme}://{host}:{port}" if port is not None else f"{scheme}://{host}"


def origin_of(url: str) -> tuple[str, str, int | None]:
    """``(scheme, host, port)`` of ``url``, with the scheme's default port filled in."""
    parts = urlsplit(url)
    default = {"http": 80, "https": 443}.get(parts.scheme)
    return parts.scheme, (parts.hostname or "").lower(), parts.port or default


#: How much of a streamed error response is read to explain the error.
ERROR_BODY_READ_LIMIT = 64 * 1024


def _error_body(response: requests.Response) -> str:
    """The error body, reading at most ``ERROR_BODY_READ_LIMIT`` bytes of a streamed one."""
    if getattr(response, "_content", False) is not False:  # already read (not streamed)
        return response.text
    try:
        chunk = response.raw.read(ERROR_BODY_READ_LIMIT, decode_content=True)
    except Exception:  # the body is only an explanation; never mask the status error
        return ""
    finally:
        response.close()
    return chunk.decode(response.encoding or "utf-8", errors="replace")


def _total_seconds(timeout: Timeout) -> float:
    return float(sum(timeout)) if isinstance(timeout, tuple) else float(timeout)


def create_session(
    *,
    timeout: Timeout = (DEFAULT_CONNECT_TIMEOUT, DEFAULT_READ_TIMEOUT),
    verify: bool = True,
    ca_bundle: str | None = None,
    headers: Mapping[str, str] | None = None,
    user_agent: str | None = None,
    pool_size: int = 10,
    max_redirects: int = 10,
    secrets: Iterable[str] = (),
    service: str | None = None,
    telemetry_event: str | None = "flowstone.http.request",
    secret_headers: Iterable[str] = (),
) -> HttpSession:
    """Build the :class:`HttpSession` every integration uses.

    Args:
        timeout: default ``(connect, read)`` seconds (or one number for both) for requests
            that pass none.
        verify: verify TLS certificates. Turn off only for a test server you own.
        ca_bundle: path to a PEM file of CA certificates to trust instead of the system's.
        headers: headers sent with every request.
        user_agent: replaces the default ``flowstone-dagster/<version> ...`` User-Agent.
        pool_size: connections kept alive per host.
        max_redirects: redirects followed before failing.
        secrets: values (tokens, keys, webhook URLs) to hide wherever they would appear in an
            error message or telemetry.
        service: a name for the external system, carried by errors.
        telemetry_event: the event each request emits; ``None`` for an integration that emits
            its own event per call (``flowstone.rest.load``, ...) and so avoids counting twice.
        secret_headers: more header names (besides ``Authorization``, ``X-API-Key``, cookies,
            ...) that carry credentials and are dropped on a redirect to another host.
    """
    if isinstance(timeout, tuple):
        if len(timeout) != 2 or any(t <= 0 for t in timeout):
            raise ConfigurationError("must be positive seconds", field="timeout")
    elif timeout <= 0:
        raise ConfigurationError("must be positive seconds", field="timeout")
    if pool_size < 1:
        raise ConfigurationError("must be at least 1", field="pool_size")
    session = HttpSession(
        timeout=timeout,
        secrets=secrets,
        service=service,
        telemetry_event=telemetry_event,
        secret_headers=secret_headers,
    )
    # max_retries=0: urllib3 retries nothing, not even reads, so retrying stays in one layer.
    adapter = HTTPAdapter(pool_connections=pool_size, pool_maxsize=pool_size, max_retries=0)
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    session.max_redirects = max_redirects
    session.verify = ca_bundle if ca_bundle else verify
    session.headers["User-Agent"] = user_agent or DEFAULT_USER_AGENT
    if headers:
        session.headers.update(headers)
    return session
