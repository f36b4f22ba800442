"""``LLMClient``: one configured model endpoint, called with retries, limits and a breaker.

::

    from flowstone_dagster.resources.llm import LLMClient

    claude = LLMClient(
        "anthropic", model="claude-sonnet-5-5", api_key=os.environ["ANTHROPIC_API_KEY"],
        rpm_limit=50, tpm_limit=40_000, store="sqlite:////var/lib/dagster/flowstone.sqlite3",
    )
    claude.call("Classify: 'free money!!!'", system="Answer spam or ham.")   # -> 'spam'
    claude.chat([{"role": "user", "content": "Hi"}]).usage                  # Usage(12, 5)
    with claude.stream("Write a haiku about rivers.") as stream:
        for delta in stream:
            print(delta, end="")
    stream.usage                                                             # at the end

Each attempt of a call goes, in this order, through (the resilience package's order)::

    retry( circuit_breaker( rpm_limit( tpm_limit( SDK request with timeout ) ) ) )

- retries: :func:`~flowstone_dagster.resilience.with_retry`, only what
  :func:`~flowstone_dagster.errors.is_retryable` accepts (429, 500, 502, 503, 504, 529,
  timeouts, connection errors), never sooner than ``retry-after`` or the provider's rate-limit
  reset headers ask (:func:`~.failures.rate_limit_wait`);
- the breaker: one :class:`~flowstone_dagster.resilience.CircuitBreaker` named ``service``;
- the limits: :class:`~flowstone_dagster.resilience.RateLimiter` in wait mode, ``<service>:rpm``
  (one unit per request) and ``<service>:tpm`` (the prompt's estimated tokens before the request;
  after it, the tokens the provider reports beyond the estimate are recorded too);
- every limiter and breaker lives in ``store``, shared by every process that opens it.

Each call emits one ``flowstone.llm.call`` event (provider, model, service, attempts,
input/output tokens, stop reason, prompt length in characters, outcome, duration). The prompt
text and the key never leave the call.
"""

from __future__ import annotations

import contextvars
import math
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, Literal, TypeVar, overload

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, RateLimited
from flowstone_dagster.resilience import (
    CircuitBreaker,
    RateLimiter,
    StateStore,
    classify,
    current_deadline,
    open_store,
    with_retry,
)
from flowstone_dagster.resilience.breaker import Outcome
from flowstone_dagster.resources.llm.failures import StreamInterrupted, to_taxonomy
from flowstone_dagster.resources.llm.messages import (
    LLMResponse,
    Prompt,
    Usage,
    estimate_tokens,
    normalize_messages,
    prompt_chars,
    split_system,
)
from flowstone_dagster.resources.llm.providers import (
    DEFAULT_BASE_URLS,
    LLMRequest,
    ProviderAdapter,
    StreamState,
    make_adapter,
)

__all__ = [
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_RATE_LIMIT_MARGIN",
    "DEFAULT_RPM_WINDOW",
    "DEFAULT_TIMEOUT",
    "EVENT",
    "LLMClient",
    "LLMStream",
]

T = TypeVar("T")

EVENT = "flowstone.llm.call"
DEFAULT_MAX_TOKENS = 1024
#: Seconds one request may take (for a stream: the longest silence between two chunks).
DEFAULT_TIMEOUT = 120.0
PROVIDERS = ("anthropic", "openai", "openai_compatible")
#: How much longer than the provider's our rate windows are, as a fraction (0.03: 3 %). A
#: request reaches the provider later than we admitted it, by a delay that varies (network,
#: the provider's queue); the margin keeps the provider's own count, over arrival times,
#: within the limit: it absorbs a variation of up to ``margin`` x the provider's window (30 ms
#: per second at 0.03), at the price of running that much below the limit.
DEFAULT_RATE_LIMIT_MARGIN = 0.03
#: Default ``rpm_window``: a per-minute budget is admitted in tenths of a second (10 per 0.1 s
#: for 6,000 rpm) rather than in bursts of a whole second's budget, so that requests reach the
#: provider evenly spread and its count is not thrown off by queueing.
DEFAULT_RPM_WINDOW = 0.1


#: The admission an attempt still has to take: ``[client, estimated tokens, taken]``. Set by
#: the attempt, taken by the SDK's request hook in the same thread.
_pending_admission: contextvars.ContextVar[list[Any] | None] = contextvars.ContextVar(
    "flowstone_llm_admission", default=None
)


def _rpm_window(rpm_limit: float, window: float) -> tuple[float, float]:
    """``(requests, seconds)``: ``rpm_limit`` as a budget per ``window`` seconds.

    Providers enforce a per-minute limit over shorter windows (OpenAI: "60,000 requests/minute
    may be enforced as 1,000 requests/second"), so a burst of a whole minute's budget earns
    429s. The window is lengthened until it holds at least one request.
    """
    seconds = max(window, 60.0 / rpm_limit)
    return rpm_limit * seconds / 60.0, seconds


class LLMClient:
    """Calls one model endpoint; see the module docs. Thread-safe.

    Args:
        provider: ``anthropic``, ``openai`` or ``openai_compatible``.
        model: the default model; each call may name another.
        api_key: the key (required for ``anthropic`` and ``openai``).
        base_url: the endpoint (required for ``openai_compatible``, e.g.
            ``http://localhost:11434/v1`` for Ollama).
        max_tokens, temperature: defaults of every call.
        timeout: seconds per request (for a stream, between chunks).
        max_retries: retries after the first attempt (0 = one request only).
        retry_base_delay, retry_max_delay: the backoff; a server asking to wait longer than
            ``retry_max_delay`` ends the call's retries (inside Dagster: a step retry).
        retry_deadline: total seconds a call may spend on attempts and waits.
        rpm_limit, rpm_window: requests per minute, enforced per ``rpm_window`` seconds.
        tpm_limit: tokens (input + output) per minute, over a sliding minute.
        rate_limit_max_wait: the longest wait for the limits before ``RateLimited``.
        rate_limit_margin: how much longer our windows are than the provider's (a fraction),
            to absorb the varying delay between our admission and the provider's count.
        breaker_threshold, breaker_timeout: the circuit breaker (``None`` threshold: none).
        store: the store (or URL) shared by the limits and the breaker.
        service: the name of the breaker, limits, errors and telemetry (default
            ``llm:<provider>``, or ``llm:openai_compatible@<host>``).
    """

    def __init__(
        self,
        provider: str,
        *,
        model: str,
        api_key: str | None = None,
        base_url: str | None = None,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        temperature: float | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        max_retries: int = 3,
        retry_base_delay: float = 1.0,
        retry_max_delay: float = 60.0,
        retry_deadline: float | None = 600.0,
        rpm_limit: float | None = None,
        rpm_window: float = DEFAULT_RPM_WINDOW,
        tpm_limit: float | None = None,
        rate_limit_max_wait: float = 60.0,
        rate_limit_margin: float = DEFAULT_RATE_LIMIT_MARGIN,
        breaker_threshold: int | None = 5,
        breaker_timeout: float = 30.0,
        store: StateStore | str | None = None,
        service: str | None = None,
    ) -> None:
        if provider not in PROVIDERS:
            raise ConfigurationError(f"must be one of {', '.join(PROVIDERS)}", field="provider")
        if not model:
            raise ConfigurationError("must name a model", field="model")
        if provider != "openai_compatible" and not api_key:
            raise ConfigurationError(
                f"no API key for {provider}: pass api_key (in Dagster: "
                f"api_key=dg.EnvVar('{provider.upper()}_API_KEY'))",
                field="api_key",
            )
        base_url = base_url or DEFAULT_BASE_URLS.get(provider)
        if not base_url:
            raise ConfigurationError(
                "is required for openai_compatible (e.g. http://localhost:11434/v1 for Ollama)",
                field="base_url",
            )
        checks: list[tuple[bool, str, str]] = [
            (max_tokens >= 1, "max_tokens", "must be at least 1"),
            (timeout > 0, "timeout", "must be positive"),
            (max_retries >= 0, "max_retries", "must not be negative"),
            (retry_base_delay >= 0, "retry_base_delay", "must not be negative"),
            (retry_max_delay >= retry_base_delay, "retry_max_delay", "must be >= base delay"),
            (retry_deadline is None or retry_deadline > 0, "retry_deadline", "must be positive"),
            (rpm_limit is None or rpm_limit > 0, "rpm_limit", "must be positive"),
            (rpm_window > 0, "rpm_window", "must be positive"),
            (tpm_limit is None or tpm_limit >= 1, "tpm_limit", "must be at least 1"),
            (rate_limit_max_wait >= 0, "rate_limit_max_wait", "must not be negative"),
            (rate_limit_margin >= 0, "rate_limit_margin", "must not be negative"),
            (breaker_threshold is None or breaker_threshold >= 1, "circuit_breaker", ">= 1"),
        ]
        for ok, field, message in checks:
            if not ok:
                raise ConfigurationError(message, field=field)
        _check_temperature(provider, temperature)
        self.provider = provider
        self.model = model
        self.base_url = base_url
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.retry_base_delay = retry_base_delay
        self.retry_max_delay = retry_max_delay
        self.retry_deadline = retry_deadline
        self.service = service or (
            f"llm:{provider}@{_host(base_url)}"
            if provider == "openai_compatible"
            else f"llm:{provider}"
        )
        self._secrets = [api_key] if api_key else []
        self.store: StateStore = (
            store if store is not None and not isinstance(store, str) else (open_store(store))
        )
        self.rpm: RateLimiter | None = None
        if rpm_limit is not None:
            per_window, seconds = _rpm_window(float(rpm_limit), rpm_window)
            self.rpm = RateLimiter(
                f"{self.service}:rpm",
                per_window,
                seconds * (1 + rate_limit_margin),
                mode="wait",
                max_wait=rate_limit_max_wait,
                store=self.store,
            )
        self.tpm: RateLimiter | None = None
        if tpm_limit is not None:
            self.tpm = RateLimiter(
                f"{self.service}:tpm",
                float(tpm_limit),
                60.0 * (1 + rate_limit_margin),
                mode="wait",
                max_wait=rate_limit_max_wait,
                store=self.store,
            )
        self.breaker: CircuitBreaker | None = None
        if breaker_threshold is not None:
            self.breaker = CircuitBreaker(
                self.service,
                threshold=breaker_threshold,
                timeout=breaker_timeout,
                probe_lease=max(60.0, self.timeout + rate_limit_max_wait),
                store=self.store,
                classifier=breaker_outcome,
            )
        self._adapter: ProviderAdapter = make_adapter(
            provider,
            api_key=api_key,
            base_url=base_url,
            timeout=self.timeout,
            on_request=self._on_request,
        )
        self._closed = threading.Event()

    def __repr__(self) -> str:
        return (
            f"LLMClient(provider={self.provider!r}, model={self.model!r}, "
            f"service={self.service!r}, base_url={self.base_url!r})"
        )

    def close(self) -> None:
        """Close the SDK's connections (the client is unusable afterwards)."""
        self._closed.set()
        self._adapter.close()

    # -- the three calls -----------------------------------------------------------------------

    @overload
    def call(
        self,
        prompt: Prompt,
        *,
        system: str | None = ...,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        stop: str | list[str] | None = ...,
        json: Literal[False] = ...,
        timeout: float | None = ...,
    ) -> str: ...

    @overload
    def call(
        self,
        prompt: Prompt,
        *,
        system: str | None = ...,
        model: str | None = ...,
        max_tokens: int | None = ...,
        temperature: float | None = ...,
        stop: str | list[str] | None = ...,
        json: Literal[True],
        timeout: float | None = ...,
    ) -> Any: ...

    def call(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        json: bool = False,
        timeout: float | None = None,
    ) -> Any:
        """The reply's text; with ``json=True`` the reply parsed as JSON.

        ``prompt`` is a string (one user message) or a list of ``{"role", "content"}``
        messages. Raises ``InvalidJSON`` (carrying the text) when ``json=True`` and the reply
        does not parse, ``MaxAttemptsExceeded`` when every attempt failed transiently,
        ``CircuitOpen`` while the breaker is open, and the provider's non-retryable error
        (``HTTPError`` 400/404/422 with its message, ``Unauthorized``, ``Forbidden``) at once.
        """
        response = self.chat(
            prompt,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            json=json,
            timeout=timeout,
        )
        return response.json() if json else response.text

    def chat(
        self,
        messages: Prompt,
        *,
        system: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        json: bool = False,
        timeout: float | None = None,
    ) -> LLMResponse:
        """The whole reply: text, model, stop reason, usage, the SDK's object and attempts.

        With ``json=True`` the reply is checked to parse (``InvalidJSON`` otherwise).
        """
        request = self._request(
            messages,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            json=json,
            timeout=timeout,
        )
        estimate = estimate_tokens(request.messages, request.system)
        attempts = 0

        def attempt() -> LLMResponse:
            nonlocal attempts
            attempts += 1
            return self._guarded(request, estimate, self._adapter.create)

        with telemetry.span(EVENT, **self._measures(request, stream=False)) as call:
            try:
                response = self._retrying(attempt)
            finally:
                call.attempts = max(attempts, 1)
            call.set(
                model=response.model or request.model,
                input_tokens=response.usage.input_tokens,
                output_tokens=response.usage.output_tokens,
                stop_reason=response.stop_reason,
            )
            self._record_actual(estimate, response.usage)
            if json:
                response.json()  # raises InvalidJSON, with the text, inside the event
        return LLMResponse(
            text=response.text,
            model=response.model,
            stop_reason=response.stop_reason,
            usage=response.usage,
            raw=response.raw,
            provider=self.provider,
            attempts=attempts,
        )

    def stream(
        self,
        prompt: Prompt,
        *,
        system: str | None = None,
        model: str | None = None,
        max_tokens: int | None = None,
        temperature: float | None = None,
        stop: str | list[str] | None = None,
        timeout: float | None = None,
    ) -> LLMStream:
        """Stream the reply: iterate for text deltas; ``usage`` and friends are set at the end.

        The request is sent when iteration starts. Until the first text arrives, failures are
        retried like :meth:`call`'s; a stream that breaks after that raises
        :class:`~.failures.StreamInterrupted` (with the text so far), never a silent truncation.
        """
        request = self._request(
            prompt,
            system=system,
            model=model,
            max_tokens=max_tokens,
            temperature=temperature,
            stop=stop,
            json=False,
            timeout=timeout,
        )
        return LLMStream(self, request)

    # -- the machinery -------------------------------------------------------------------------

    def _request(
        self,
        prompt: Prompt,
        *,
        system: str | None,
        model: str | None,
        max_tokens: int | None,
        temperature: float | None,
        stop: str | list[str] | None,
        json: bool,
        timeout: float | None,
    ) -> LLMRequest:
        if self._closed.is_set():
            raise ConfigurationError("this LLM client is closed", field="client")
        system_text, messages = split_system(normalize_messages(prompt), system)
        max_tokens = self.max_tokens if max_tokens is None else max_tokens
        if max_tokens < 1:
            raise ConfigurationError(f"must be at least 1, got {max_tokens}", field="max_tokens")
        timeout = self.timeout if timeout is None else timeout
        if timeout <= 0:
            raise ConfigurationError(f"must be positive, got {timeout}", field="timeout")
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        _check_temperature(self.provider, temperature)
        return LLMRequest(
            model=model or self.model,
            messages=messages,
            system=system_text,
            max_tokens=max_tokens,
            temperature=self.temperature if temperature is None else temperature,
            stop=stops,
            json=json,
            timeout=float(timeout),
        )

    def _measures(self, request: LLMRequest, *, stream: bool) -> dict[str, Any]:
        return {
            "provider": self.provider,
            "service": self.service,
            "model": request.model,
            "prompt_chars": prompt_chars(request.messages, request.system),
            "stream": stream,
        }

    def _retrying(self, attempt: Callable[[], T]) -> T:
        if self.max_retries == 0:  # one request, its error unchanged
            return attempt()
        return with_retry(
            attempt,
            max_attempts=self.max_retries + 1,
            base_delay=self.retry_base_delay,
            max_delay=self.retry_max_delay,
            deadline=self.retry_deadline,
            name=self.service,
        )

    def _admit(self, estimate: int) -> None:
        if self.rpm is not None:
            self.rpm.acquire(1)
        if self.tpm is not None:
            self.tpm.acquire(min(estimate, self.tpm.limit))

    def _on_request(self, request: Any) -> None:
        """The SDK's HTTP client calls this just before sending: take the admission now.

        Admitting here rather than before the SDK builds the request keeps what the provider
        counts in a window close to what the limiter admitted (the SDK's first call in a
        process can spend a tenth of a second importing and building before it sends).
        """
        pending = _pending_admission.get()
        if pending is not None and pending[0] is self and not pending[2]:
            pending[2] = True
            self._admit(pending[1])

    def _timed(self, request: LLMRequest) -> LLMRequest:
        """``request`` with its timeout cut to the enclosing deadline, if there is one."""
        deadline = current_deadline()
        if deadline is None:
            return request
        remaining = max(deadline.remaining(), 0.001)
        if remaining >= request.timeout:
            return request
        return LLMRequest(**{**request.__dict__, "timeout": remaining})

    def _guarded(self, request: LLMRequest, estimate: int, send: Callable[[LLMRequest], T]) -> T:
        """One attempt through the breaker and the limits; SDK errors become the taxonomy's."""
        result, _ = self._attempt(request, estimate, send, hold=False)
        return result

    def _attempt(
        self,
        request: LLMRequest,
        estimate: int,
        send: Callable[[LLMRequest], T],
        *,
        hold: bool,
    ) -> tuple[T, Any]:
        """``send`` once, passing the breaker and the limits first.

        With ``hold`` the breaker's ticket is returned instead of closed (a stream closes it
        with :meth:`_close_ticket` when it ends, so that a stream breaking counts).
        """
        ticket = self.breaker.enter() if self.breaker is not None else None
        pending = _pending_admission.set([self, estimate, False])
        try:
            timed = self._timed(request)
            try:
                result = send(timed)
            except Exception as exc:
                mapped = self._map(exc, timed.timeout)
                if mapped is exc:
                    raise
                raise mapped from exc
            finally:
                _pending_admission.reset(pending)
        except BaseException as exc:
            self._close_ticket(ticket, exc)
            raise
        if hold:
            return result, ticket
        self._close_ticket(ticket, None)
        return result, None

    def _close_ticket(self, ticket: Any, error: BaseException | None) -> None:
        if self.breaker is None or ticket is None:
            return
        if error is None:
            self.breaker.exit(ticket)
        else:
            self.breaker.exit(ticket, error)

    def _map(self, exc: BaseException, timeout: float | None) -> BaseException:
        return to_taxonomy(exc, service=self.service, secrets=self._secrets, timeout=timeout)

    def _record_actual(self, estimate: int, usage: Usage) -> None:
        """Record the tokens the provider counted beyond the estimate taken before sending.

        They were spent already, so they are recorded at once (never waited for); callers that
        come next, in any process, wait for them to leave the window. Overestimates are not
        given back (the store has no refunds); the estimate is kept close instead.
        """
        if self.tpm is None:
            return
        extra = usage.total_tokens - min(estimate, self.tpm.limit)
        if extra > 0:
            self.tpm.store.reserve(self.tpm.name, float(extra), math.inf, self.tpm.period)


class LLMStream:
    """An LLM reply as it arrives: iterate for text deltas.

    ::

        with llm.stream("Tell me a story") as stream:
            for delta in stream:
                print(delta, end="", flush=True)
        print(stream.usage, stream.stop_reason)

    After the last delta, ``text``, ``usage``, ``stop_reason``, ``model`` and ``response`` (an
    :class:`LLMResponse`) are set. A stream that breaks, or ends without the provider's final
    event, raises :class:`~.failures.StreamInterrupted` with ``partial_text``. Leaving the
    ``with`` block (or :meth:`close`) early closes the connection.
    """

    def __init__(self, client: LLMClient, request: LLMRequest) -> None:
        self._client = client
        self._request = request
        self._parts: list[str] = []
        self._iterator: Iterator[str] | None = None
        self.usage: Usage | None = None
        self.stop_reason: str | None = None
        self.model: str = request.model
        self.response: LLMResponse | None = None
        self.attempts = 0

    @property
    def text(self) -> str:
        """The text received so far."""
        return "".join(self._parts)

    def __iter__(self) -> Iterator[str]:
        if self._iterator is None:
            self._iterator = self._run()
        return self._iterator

    def __enter__(self) -> LLMStream:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Stop reading (and close the connection) if the stream has not ended."""
        if self._iterator is not None:
            self._iterator.close()  # type: ignore[attr-defined]

    def _open(
        self, state_box: list[StreamState], estimate: int
    ) -> tuple[tuple[Iterator[str], str | None], Any]:
        """One attempt: send the request and read until the first text (or the end)."""
        client = self._client
        self.attempts += 1
        state = StreamState()
        state_box[:] = [state]

        def first(request: LLMRequest) -> tuple[Iterator[str], str | None]:
            deltas = client._adapter.stream(request, state)
            try:
                return deltas, next(deltas)
            except StopIteration:
                return deltas, None
            except BaseException:
                state.close()
                raise

        return client._attempt(self._request, estimate, first, hold=True)

    def _run(self) -> Iterator[str]:
        client, request = self._client, self._request
        estimate = estimate_tokens(request.messages, request.system)
        measures = client._measures(request, stream=True)
        started = time.perf_counter()
        state_box: list[StreamState] = []
        ticket: Any = None
        outcome, error = "ok", None
        try:
            (deltas, head), ticket = client._retrying(lambda: self._open(state_box, estimate))
            state = state_box[0]
            try:
                if head is not None:
                    self._parts.append(head)
                    yield head
                for delta in deltas:
                    self._parts.append(delta)
                    yield delta
                if not state.complete:
                    raise StreamInterrupted(
                        f"the stream from {client.service} ended without its final event after "
                        f"{len(self.text)} characters; the text so far is in partial_text",
                        partial_text=self.text,
                        service=client.service,
                    )
            except GeneratorExit:
                outcome = "cancelled"
                state.close()
                raise
            except StreamInterrupted:
                raise
            except Exception as exc:
                mapped = client._map(exc, request.timeout)
                raise StreamInterrupted(
                    f"the stream from {client.service} broke after {len(self.text)} characters: "
                    f"{type(mapped).__name__}: {mapped}",
                    partial_text=self.text,
                    error=mapped,
                    service=client.service,
                ) from mapped
        except GeneratorExit:
            client._close_ticket(ticket, None)
            raise
        except BaseException as exc:
            outcome, error = "error", exc
            client._close_ticket(ticket, exc)
            raise
        else:
            client._close_ticket(ticket, None)
            usage = Usage(
                state.input_tokens if state.input_tokens is not None else estimate,
                state.output_tokens
                if state.output_tokens is not None
                else estimate_tokens([{"role": "assistant", "content": self.text}]),
            )
            self.usage, self.stop_reason = usage, state.stop_reason
            self.model = state.model or request.model
            self.response = LLMResponse(
                text=self.text,
                model=self.model,
                stop_reason=self.stop_reason,
                usage=usage,
                raw=state.events,
                provider=client.provider,
                attempts=self.attempts,
            )
            client._record_actual(estimate, usage)
            measures.update(
                model=self.model,
                input_tokens=usage.input_tokens,
                output_tokens=usage.output_tokens,
                stop_reason=self.stop_reason,
            )
        finally:
            if outcome != "ok" and state_box:
                measures.update(output_chars=len(self.text))
            telemetry.emit(
                EVENT,
                outcome=outcome if error is None else None,
                error=error,
                duration_s=time.perf_counter() - started,
                attempts=max(self.attempts, 1),
                **measures,
            )


def breaker_outcome(exc: BaseException) -> Outcome:
    """How the provider's breaker counts a failed call: as the resilience package's
    :func:`~flowstone_dagster.resilience.classify`, except that a provider's 429 is *ignored*.

    A rate limit says the provider is healthy and we are too fast: the limits and
    ``retry-after`` deal with it; opening the circuit would stop a whole deployment for
    ``timeout`` seconds because of one burst.
    """
    if isinstance(exc, RateLimited):
        return "ignore"
    return classify(exc)


def _check_temperature(provider: str, temperature: float | None) -> None:
    if provider == "anthropic" and temperature is not None:
        raise ConfigurationError(
            "the Messages API of the installed anthropic SDK (2.x) has no temperature; leave it "
            "unset for provider anthropic",
            field="temperature",
        )


def _host(url: str) -> str:
    from urllib.parse import urlsplit

    return urlsplit(url).netloc or url
