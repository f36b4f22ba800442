"""The official SDK client, governed: its HTTP transport goes through the one resilience path.

::

    sdk = llm.get_client()                  # anthropic.Anthropic / openai.OpenAI
    sdk.messages.count_tokens(...)          # anything the SDK can do: retried, limited,
    sdk.beta.files.upload(...)              # circuit-broken and observed like llm.call

:class:`GovernedTransport` is an httpx transport. Each request the SDK sends is one
``ResilienceResource.call`` of the client's ``service``: the breaker, the rpm limit of the
request's model, retries on what :func:`~flowstone_dagster.errors.is_retryable` accepts (429,
5xx, 529, timeouts, connection errors) honouring ``retry-after`` and the rate-limit reset
headers. What the caller finally gets is the provider's own answer: the last response (the
SDK then raises its own ``RateLimitError``, ``InternalServerError``...) or the SDK's connection
error. An open circuit or a refused rate-limit wait reaches the caller as the SDK's
``APIConnectionError`` whose ``__cause__`` is ``CircuitOpen`` / ``RateLimited`` (no request was
sent). The SDK is built with ``max_retries=0``: one retry layer. A reply that is not streamed
must arrive whole within the client's ``timeout`` (a trickling body is cut, :mod:`.deadlines`,
and retried as a timeout); a streamed one is bounded by the SDK's per-read timeout.

Each request emits ``flowstone.llm.call`` (``endpoint``, ``model``, tokens read from a JSON
reply's ``usage``; a streamed reply's tokens are not read) and so counts in the step's
``flowstone/llm/...`` metadata.
"""

from __future__ import annotations

import json as jsonlib
import time
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anthropic
import httpx2
import openai

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ExternalServiceError, error_for_status, is_retryable
from flowstone_dagster.http import redact_url
from flowstone_dagster.llm import usage as usage_module
from flowstone_dagster.llm.deadlines import RequestDeadline
from flowstone_dagster.llm.failures import rate_limit_wait, to_taxonomy
from flowstone_dagster.llm.wire import confirm_at_send

if TYPE_CHECKING:
    from flowstone_dagster.llm.client import LLMClient

__all__ = ["GovernedTransport", "governed_sdk_client"]

#: Statuses retried by the transport (the taxonomy's retryable statuses).
RETRIED_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504, 529})


class _Answered(ExternalServiceError):
    """A retryable status, carrying the response to hand back when retrying ends."""

    def __init__(self, error: ExternalServiceError, response: httpx2.Response) -> None:
        super().__init__(str(error), service=error.service)
        self.error = error
        self.response = response
        self.retryable = True
        self.retry_after = getattr(error, "retry_after", None)
        self.status = getattr(error, "status", None)


class _Unreachable(ExternalServiceError):
    """A transport failure, carrying the httpx exception to hand back."""

    def __init__(self, mapped: BaseException, original: httpx2.TransportError) -> None:
        super().__init__(str(mapped), service=getattr(mapped, "service", None))
        self.original = original
        self.retryable = is_retryable(mapped)


def _usage_of(body: Any) -> dict[str, int]:
    usage = body.get("usage") if isinstance(body, dict) else None
    if not isinstance(usage, dict):
        return {}
    if "prompt_tokens" in usage:  # OpenAI: cached tokens are part of prompt_tokens
        details = usage.get("prompt_tokens_details") or {}
        return {
            "input_tokens": int(usage.get("prompt_tokens") or 0),
            "output_tokens": int(usage.get("completion_tokens") or 0),
            "cache_read_tokens": int(details.get("cached_tokens") or 0),
            "cache_write_tokens": int(details.get("cache_write_tokens") or 0),
        }
    read = int(usage.get("cache_read_input_tokens") or 0)
    written = int(usage.get("cache_creation_input_tokens") or 0)
    return {
        "input_tokens": int(usage.get("input_tokens") or 0) + read + written,
        "output_tokens": int(usage.get("output_tokens") or 0),
        "cache_read_tokens": read,
        "cache_write_tokens": written,
    }


class GovernedTransport(httpx2.BaseTransport):
    """An httpx transport sending each request through ``client``'s resilience path."""

    def __init__(self, client: LLMClient, *, context: Any = None, keyless: bool = False) -> None:
        self.client = client
        self.context = context
        # Without a key, no Authorization header at all (the SDK insists on a placeholder
        # key): a local server must not receive one, as with LLMClient's own requests.
        self.keyless = keyless
        self.inner = httpx2.HTTPTransport()

    def handle_request(self, request: httpx2.Request) -> httpx2.Response:
        client = self.client
        if self.keyless:
            request.headers.pop("Authorization", None)
        request.read()  # the body is replayed by retries
        model = None
        try:
            body = jsonlib.loads(request.content) if request.content else None
            model = body.get("model") if isinstance(body, dict) else None
        except ValueError:
            body = None
        model = model if isinstance(model, str) and model else client.model
        measures: dict[str, Any] = {
            "provider": client.provider,
            "service": client.service,
            "model": model,
            "endpoint": request.url.path,
            "stream": bool(isinstance(body, dict) and body.get("stream")),
        }
        attempts = 0

        def attempt() -> httpx2.Response:
            nonlocal attempts
            attempts += 1
            return self._attempt(request, stream=measures["stream"])

        started = time.perf_counter()
        failure: BaseException | None = None
        try:
            response = client.resilience.call(
                client.service,
                attempt,
                limits=client.limits_for(model),
                dagster_errors=False,
            )
        except Exception as exc:
            last = getattr(exc, "last_error", exc)
            failure = last.error if isinstance(last, _Answered) else last
            self._emit(measures, started, attempts, failure)
            if isinstance(last, _Answered):
                return last.response  # the SDK raises its own error for it
            if isinstance(last, _Unreachable):
                raise last.original from None
            raise  # CircuitOpen, RateLimited by our limiter, StoreUnavailable
        if not measures["stream"] and "json" in response.headers.get("content-type", ""):
            with suppress(ValueError):
                measures.update(_usage_of(jsonlib.loads(response.content)))
        measures["status"] = response.status_code
        self._emit(measures, started, attempts, None)
        return response

    def _attempt(self, request: httpx2.Request, *, stream: bool) -> httpx2.Response:
        """One request; a retryable status or a transport failure is raised for the
        resilience path, carrying what to hand back when retrying ends."""
        client = self.client
        deadline = RequestDeadline(client.timeout)
        confirm_at_send(request, client.late_after)
        try:
            response = self.inner.handle_request(request)
            client._on_response(response)  # the provider's rate-limit headers
            if stream:  # events arrive as the caller reads: idle timeout only
                if response.status_code not in RETRIED_STATUSES:
                    return response
            else:  # the whole answer within the client's timeout (a trickle is cut)
                deadline.register(response, request)
            response.read()
        except httpx2.TransportError as exc:
            failure = deadline.timeout_error(exc) if deadline.expired else exc
            raise _Unreachable(
                to_taxonomy(failure, service=client.service, timeout=client.timeout),
                failure,
            ) from None
        finally:
            deadline.close()
        if response.status_code not in RETRIED_STATUSES:
            return response
        response.close()
        error = error_for_status(
            response.status_code,
            url=redact_url(str(request.url)),
            method=request.method,
            body=response.text[:500] or None,
            retry_after=rate_limit_wait(response.headers),
            service=client.service,
        )
        raise _Answered(error, response)

    def _emit(
        self, measures: dict[str, Any], started: float, attempts: int, error: BaseException | None
    ) -> None:
        with usage_module.attributed_to(self.context):
            telemetry.emit(
                "flowstone.llm.call",
                duration_s=time.perf_counter() - started,
                attempts=max(attempts, 1),
                error=error,
                **measures,
            )

    def close(self) -> None:
        self.inner.close()


def governed_sdk_client(
    client: LLMClient, *, api_key: str | None, context: Any = None
) -> anthropic.Anthropic | openai.OpenAI:
    """A new official SDK client for ``client``'s endpoint, governed by its resilience path."""
    transport = GovernedTransport(client, context=context, keyless=not api_key)
    if client.provider == "anthropic":
        assert api_key
        return anthropic.Anthropic(
            api_key=api_key,
            base_url=client.base_url,
            timeout=client.timeout,
            max_retries=0,
            http_client=anthropic.DefaultHttpxClient(transport=transport),
        )
    http_client = openai.DefaultHttpxClient(transport=transport)
    return openai.OpenAI(
        api_key=api_key or "no-key-configured",
        base_url=client.base_url,
        timeout=client.timeout,
        max_retries=0,
        http_client=http_client,
    )
