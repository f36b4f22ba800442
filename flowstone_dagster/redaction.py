"""Keeping secrets out of messages, errors, telemetry and ``repr``: the one place that knows
what a secret looks like.

Two kinds of knowledge combine:

- **Registered values.** A resource that holds a secret (an API key, a password, a webhook
  URL) calls :func:`register_secret` when it is set up; from then on every redaction in this
  process replaces the value, wherever it appears (a server that echoes the key, a proxy's
  error page, an SDK's exception).
- **Shapes.** Passwords in URLs, secret-looking query parameters, ``Bearer``/``Token``
  credentials, ``sk-...`` style API keys and Slack webhook paths are redacted even when
  nobody registered them.

:func:`redact_exception_chain` applies both to every link of an exception chain before it
reaches Dagster's event log (see :func:`flowstone_dagster.resilience.to_dagster_error`).
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterable, Mapping
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

__all__ = [
    "REDACTED",
    "SECRET_HEADERS",
    "SECRET_QUERY_PARAMS",
    "RedactedError",
    "redact_exception_chain",
    "redact_headers",
    "redact_text",
    "redact_url",
    "register_secret",
]

REDACTED = "***"

#: Query parameters whose values are secrets (compared case-insensitively).
SECRET_QUERY_PARAMS = frozenset(
    {
        "access_token",
        "api_key",
        "api-key",
        "apikey",
        "auth",
        "client_secret",
        "code",
        "key",
        "password",
        "secret",
        "sig",
        "signature",
        "token",
        "x-amz-signature",
        "x-goog-signature",
    }
)

#: Headers whose values are secrets (compared case-insensitively).
SECRET_HEADERS = frozenset(
    {
        "authorization",
        "proxy-authorization",
        "cookie",
        "set-cookie",
        "x-api-key",
        "api-key",
        "x-auth-token",
    }
)

#: Secrets shorter than this are not registered: replacing "a" or "1" everywhere would
#: destroy messages and hide nothing.
MIN_SECRET_LENGTH = 6

#: The shortest path tail of a registered URL that is redacted on its own.
MIN_PATH_TAIL = 16

_registered: set[str] = set()
_registered_lock = threading.Lock()
#: The registered secrets, longest first (a secret that contains another is replaced whole),
#: sorted once per registration rather than on every redaction.
_registered_longest_first: tuple[str, ...] = ()


def register_secret(value: str | None) -> None:
    """Redact ``value`` from every message this process redacts from now on.

    A URL also registers its path and its query (a Slack webhook's secret is its path, and a
    server echoing the request line shows the path alone).
    """
    if not value or len(value) < MIN_SECRET_LENGTH:
        return
    values = {value}
    if "://" in value:
        try:
            parts = urlsplit(value)
            password = parts.password
        except ValueError:
            parts, password = None, None
        if parts is not None:
            values.update(p for p in (parts.path, parts.query, password) if p)
            # A server may echo only the end of the path (a Slack webhook's T.../B.../token):
            # every tail of at least MIN_PATH_TAIL characters is a secret too.
            segments = [segment for segment in parts.path.split("/") if segment]
            for start in range(1, len(segments)):
                tail = "/".join(segments[start:])
                if len(tail) >= MIN_PATH_TAIL:
                    values.add(tail)
    values = {v for v in values if len(v) >= MIN_SECRET_LENGTH}
    global _registered_longest_first  # noqa: PLW0603 - replaced whole, read without the lock
    with _registered_lock:
        _registered.update(values)
        _registered_longest_first = tuple(sorted(_registered, key=len, reverse=True))


# Shapes of secrets that are redacted even when nobody registered them.
_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # Authorization header values echoed back: "Bearer sk-...", "Token abc...", "Basic ..."
    (re.compile(r"(?i)\b(bearer|token|basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2" + "***"),
    # Provider-style API keys: sk-..., sk-ant-..., xoxb-/xoxp- Slack tokens
    (re.compile(r"\b(?:sk|rk|pk)-[A-Za-z0-9_-]{8,}"), "***"),
    (re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{8,}"), "***"),
    # Slack incoming-webhook paths (the path is the secret), with or without /services/
    (re.compile(r"\bT[A-Z0-9]{6,}/B[A-Z0-9]{6,}/[A-Za-z0-9]{12,}"), "***"),
)

_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\")<>]+")


def redact_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with each of ``secrets``, every registered secret (:func:`register_secret`),
    URL passwords and secret query values, and secret-shaped tokens replaced by ``***``."""
    known = _registered_longest_first
    for secret in [*secrets, *known]:
        if secret and secret in text:
            text = text.replace(secret, REDACTED)
    if "://" in text:
        text = _URL_IN_TEXT.sub(lambda match: _redact_url_shape(match.group(0)), text)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def redact_url(url: str, secrets: Iterable[str] = ()) -> str:
    """``url`` without its password, secret-looking query values and the given ``secrets``.

    >>> redact_url("https://user:pw@api.example.com/x?token=abc&day=1")
    'https://user:***@api.example.com/x?token=***&day=1'
    """
    return redact_text(_redact_url_shape(url), secrets)


def _redact_url_shape(url: str) -> str:
    """A URL's password and secret query values hidden (no registered secrets: the caller
    applied them already)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return url
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.split(":", 1)[0]
        netloc = f"{user}:{REDACTED}@{host}" if ":" in userinfo else f"{user}@{host}"
    query = parts.query
    if query:
        pairs = parse_qsl(query, keep_blank_values=True)
        if any(name.lower() in SECRET_QUERY_PARAMS for name, _ in pairs):
            query = urlencode(
                [
                    (name, REDACTED if name.lower() in SECRET_QUERY_PARAMS else value)
                    for name, value in pairs
                ],
                safe="*",
            )
    if netloc == parts.netloc and query == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def redact_headers(headers: Mapping[str, str], secrets: Iterable[str] = ()) -> dict[str, str]:
    """A copy of ``headers`` with secret values (``Authorization``, API keys, cookies) hidden."""
    secrets = tuple(secrets)
    return {
        name: REDACTED if name.lower() in SECRET_HEADERS else redact_text(str(value), secrets)
        for name, value in headers.items()
    }


class RedactedError(Exception):
    """Stands in for a third-party exception whose message held a secret.

    ``original_type`` is the qualified name of the exception it replaces; the message is that
    exception's message, redacted; the traceback is the original's.
    """

    def __init__(self, original_type: str, message: str) -> None:
        super().__init__(f"{original_type}: {message}")
        self.original_type = original_type


def _qualified(exc: BaseException) -> str:
    module = type(exc).__module__
    name = type(exc).__qualname__
    return name if module in ("builtins", "__main__") else f"{module}.{name}"


def _redact_args(exc: BaseException) -> None:
    """Redact a flowstone error in place (its message is ours; its attributes stay)."""
    message = getattr(exc, "message", None)
    if isinstance(message, str):
        clean = redact_text(message)
        if clean != message:
            exc.message = clean  # type: ignore[attr-defined]
    exc.args = tuple(redact_text(a) if isinstance(a, str) else a for a in exc.args)


def redact_exception_chain(exc: BaseException, *, is_ours: type[BaseException]) -> BaseException:
    """``exc`` with no secret in any link of its ``__cause__``/``__context__`` chain.

    Our own errors (instances of ``is_ours``) stay, with their messages redacted in place; a
    third-party error whose message (or whose chain) changes under redaction is replaced by a
    :class:`RedactedError` that carries its type name, redacted message and traceback. Returns
    the (possibly new) head of the chain.
    """
    seen: dict[int, BaseException] = {}

    def clean(link: BaseException) -> BaseException:
        if id(link) in seen:
            return seen[id(link)]
        seen[id(link)] = link  # cycles end here
        if isinstance(link, is_ours):
            _redact_args(link)
            result = link
        else:
            try:
                text = str(link)
            except Exception:  # a broken __str__ must not hide the real error
                text = f"<unprintable {type(link).__name__}>"
            redacted = redact_text(text)
            if redacted != text:
                result = RedactedError(_qualified(link), redacted).with_traceback(
                    link.__traceback__
                )
            else:
                result = link
        seen[id(link)] = result
        cause = link.__cause__
        context = None if link.__suppress_context__ else link.__context__
        if cause is not None:
            new_cause = clean(cause)
            if new_cause is not cause or result is not link:
                result.__cause__ = new_cause
        elif context is not None:
            new_context = clean(context)
            if new_context is not context or result is not link:
                result.__context__ = new_context
        return result

    return clean(exc)
