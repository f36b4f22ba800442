"""What went wrong in an LLM call, in the package's error taxonomy.

The SDKs raise their own exception types; :func:`to_taxonomy` turns each into the matching
:mod:`flowstone_dagster.errors` exception, so that retrying, circuit breaking and Dagster's
step retries all decide on one vocabulary:

=====================================  ===============================================  =========
SDK failure                            raised                                           retried
=====================================  ===============================================  =========
429 (``rate_limit_error``)             ``RateLimited`` (``retry_after`` from headers)   yes
500, 502, 503, 504, 529 (overloaded)   ``HTTPError`` with the status                    yes
400, 404, 413, 422, ...                ``HTTPError`` / ``NotFound``, provider message   no
401 / 403                              ``Unauthorized`` / ``Forbidden``                 no
timeout (``APITimeoutError``)          ``CallTimeout``                                  yes
connection refused / reset             ``TransportError``                               yes
=====================================  ===============================================  =========

The wait a failure asks for is the largest of ``retry-after-ms``, ``retry-after`` (seconds or
an HTTP date) and the reset time of each rate limit the provider reports as exhausted
(Anthropic's ``anthropic-ratelimit-*-reset`` RFC 3339 times, OpenAI's
``x-ratelimit-reset-*`` durations such as ``6m0s``); see :func:`rate_limit_wait`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterable, Mapping
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import anthropic
import httpx2
import openai

from flowstone_dagster.errors import (
    CallTimeout,
    ExternalServiceError,
    FlowstoneError,
    TransportError,
    error_for_status,
    is_retryable,
    parse_retry_after,
    truncate,
)
from flowstone_dagster.http import redact_text, redact_url
from flowstone_dagster.llm.deadlines import WholeRequestTimeout

__all__ = [
    "StreamInterrupted",
    "parse_duration",
    "provider_message",
    "rate_limit_wait",
    "to_taxonomy",
]

#: The HTTP status each provider error ``type`` stands for, for errors that arrive inside a
#: stream (the HTTP status of a stream is 200 by then). Anthropic's types, then OpenAI's.
ERROR_TYPE_STATUS: Mapping[str, int] = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
    "server_error": 500,
    "rate_limit_exceeded": 429,
    "insufficient_quota": 429,
}

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


class StreamInterrupted(TransportError):
    """A stream broke after text had been delivered: never a silent truncation.

    ``partial_text`` is what arrived before the break, ``error`` the failure that broke it
    (also ``__cause__``; ``None`` when the stream just ended without its final event).
    Retryable when its cause is, by starting the call again: text already handed to the
    caller is never repeated inside one stream.
    """

    def __init__(
        self,
        message: str,
        *,
        partial_text: str,
        error: BaseException | None = None,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.partial_text = partial_text
        self.error = error
        self.retryable = True if error is None else is_retryable(error)


def parse_duration(value: str) -> float | None:
    """Seconds in an OpenAI reset duration: ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"``.

    ::

        >>> parse_duration("6m0s")
        360.0
        >>> parse_duration("20ms")
        0.02
    """
    value = value.strip()
    parts = _DURATION_PART.findall(value)
    if not parts or "".join(number + unit for number, unit in parts) != value:
        try:
            return max(float(value), 0.0)
        except ValueError:
            return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def _reset_seconds(value: str, now: float) -> float | None:
    """A reset header as seconds from ``now``: an RFC 3339 time or an OpenAI duration."""
    if "T" in value and "-" in value:
        try:
            when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            return None
        return max(when.timestamp() - now, 0.0)
    return parse_duration(value)


def rate_limit_wait(headers: Mapping[str, str], *, now: float | None = None) -> float | None:
    """The seconds a response's headers ask to wait before the next request, if any.

    The largest of ``retry-after-ms``, ``retry-after`` and the reset of every rate limit whose
    ``remaining`` header is 0 (``anthropic-ratelimit-<limit>-remaining/-reset``,
    ``x-ratelimit-remaining-<limit>``/``x-ratelimit-reset-<limit>``). When no limit says it is
    exhausted and there is no ``retry-after``, the largest reset. ``None`` when nothing says.
    """
    now = time.time() if now is None else now
    lowered = {key.lower(): value for key, value in headers.items()}
    waits: list[float] = []
    milliseconds = lowered.get("retry-after-ms")
    if milliseconds is not None:
        with suppress(ValueError):
            waits.append(max(float(milliseconds) / 1000.0, 0.0))
    retry_after = parse_retry_after(lowered.get("retry-after"), now=now)
    if retry_after is not None:
        waits.append(retry_after)
    stated = provider_limits(lowered, now=now).values()
    resets = [limit.reset for limit in stated if limit.reset is not None]
    waits.extend(
        limit.reset for limit in stated if limit.reset is not None and limit.remaining == 0
    )
    if not waits and resets:
        waits.append(max(resets))
    return max(waits) if waits else None


@dataclass(frozen=True, slots=True)
class ProviderLimit:
    """One rate limit as a provider's response headers state it: its ``limit`` (per minute),
    what ``remaining`` of it, and the seconds until it is fully ``reset``; ``None`` when a
    header is absent or unreadable."""

    limit: float | None
    remaining: float | None
    reset: float | None


def provider_limits(
    headers: Mapping[str, str], *, now: float | None = None
) -> dict[str, ProviderLimit]:
    """The rate limits a response's headers state, by kind (``requests``, ``tokens``, and
    Anthropic's ``input-tokens``/``output-tokens``): ``anthropic-ratelimit-<kind>-limit``,
    ``-remaining`` and ``-reset`` (an RFC 3339 time), or OpenAI's
    ``x-ratelimit-limit-<kind>``, ``x-ratelimit-remaining-<kind>`` and
    ``x-ratelimit-reset-<kind>`` (a duration such as ``6m0s``)."""
    now = time.time() if now is None else now
    found: dict[str, dict[str, str]] = {}
    for name, value in headers.items():
        lowered = name.lower()
        for prefix in ("anthropic-ratelimit-", "x-ratelimit-"):
            if not lowered.startswith(prefix):
                continue
            rest = lowered.removeprefix(prefix)
            if prefix == "anthropic-ratelimit-":
                kind, _, field = rest.rpartition("-")
            else:
                field, _, kind = rest.partition("-")
            if kind and field in ("limit", "remaining", "reset"):
                found.setdefault(kind, {})[field] = value
    return {
        kind: ProviderLimit(
            limit=_number(fields.get("limit")),
            remaining=_number(fields.get("remaining")),
            reset=_reset_seconds(fields["reset"], now) if "reset" in fields else None,
        )
        for kind, fields in found.items()
    }


def _number(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except ValueError:
        return None


def provider_message(body: Any) -> tuple[str | None, str | None]:
    """``(error type, message)`` from a provider's error body (Anthropic's or OpenAI's shape)."""
    if isinstance(body, Mapping):
        error = body.get("error", body)
        if isinstance(error, Mapping):
            kind = error.get("type") or error.get("code")
            message = error.get("message")
            return (
                str(kind) if kind is not None else None,
                str(message) if message is not None else None,
            )
    if isinstance(body, str) and body.strip():
        return None, body.strip()
    return None, None


def _url_of(exc: Any) -> str | None:
    try:
        url = getattr(getattr(exc, "request", None), "url", None)
    except RuntimeError:  # httpx raises when an error or response was built without a request
        url = None
    return redact_url(str(url)) if url is not None else None


def to_taxonomy(
    exc: BaseException, *, service: str, secrets: Iterable[str] = (), timeout: float | None = None
) -> BaseException:
    """The taxonomy exception for ``exc`` raised by an SDK (others are returned unchanged).

    The result carries what the provider said (``retry_after`` from :func:`rate_limit_wait`,
    the status, the provider's message) with ``secrets`` and every registered secret redacted;
    raise it from a redacted chain, never from ``exc`` (whose message may echo the key).
    """
    if isinstance(exc, FlowstoneError):
        return exc
    secrets = [secret for secret in secrets if secret]
    if isinstance(exc, WholeRequestTimeout):
        return CallTimeout(
            f"{_url_of(exc) or service} did not finish answering within {timeout:g} s "
            "(timeout: the whole request, not one read)"
            if timeout is not None
            else f"{_url_of(exc) or service} did not finish answering in time (timeout)",
            timeout=timeout,
            service=service,
        )
    if isinstance(
        exc, (anthropic.APITimeoutError, openai.APITimeoutError, httpx2.TimeoutException)
    ):
        where = _url_of(exc) or service
        return CallTimeout(
            f"no answer from {where} within {timeout:g} s (timeout)"
            if timeout is not None
            else f"no answer from {where} (timeout)",
            timeout=timeout,
            service=service,
        )
    if isinstance(
        exc, (anthropic.APIConnectionError, openai.APIConnectionError, httpx2.TransportError)
    ):
        cause = exc.__cause__ or exc
        if isinstance(cause, FlowstoneError):
            # Raised by our own hook before anything was sent (a rate admission taken again
            # at the wire that cannot wait long enough): the SDK wrapped it, we unwrap it.
            return cause
        reason = redact_text(f"{type(cause).__name__}: {cause}", secrets)
        return TransportError(
            f"connection to {_url_of(exc) or service} failed: {truncate(reason, 300)}",
            service=service,
        )
    if isinstance(exc, (anthropic.APIStatusError, openai.APIStatusError)):
        response = exc.response
        kind, message = provider_message(exc.body)
        status = response.status_code
        if status < 400:  # an error event inside a stream: the status line said 200
            status = ERROR_TYPE_STATUS.get(kind or "", 500)
        detail = redact_text(f"{kind}: {message}" if kind else (message or ""), secrets)
        return error_for_status(
            status,
            url=redact_url(str(response.request.url)),
            method=response.request.method,
            body=detail or None,
            retry_after=rate_limit_wait(response.headers),
            service=service,
        )
    if isinstance(exc, (anthropic.APIError, openai.APIError)):  # e.g. an error event in a stream
        kind, message = provider_message(getattr(exc, "body", None))
        detail = redact_text(f"{kind}: {message}" if kind else (message or str(exc)), secrets)
        in_stream_status = ERROR_TYPE_STATUS.get(kind or "")
        if in_stream_status is not None:
            return error_for_status(
                in_stream_status, url=_url_of(exc), body=detail, service=service
            )
        return ExternalServiceError(truncate(detail), service=service)
    return exc
