"""The last moment before an LLM request's bytes are written: where its rate admission is
confirmed (see :mod:`flowstone_dagster.resilience.admission`).

The check runs from httpx's ``trace`` extension at ``send_request_headers``: after the SDK
built the request, after a new connection's TCP and TLS handshakes, just before the first
byte goes out. A request admitted more than ``late_after`` seconds earlier takes its request
limits (rpm, and the policy's own rate limit) again, waiting as the call may; token limits are
not taken twice (their windows are a minute long, and the tokens are not sent twice).
"""

from __future__ import annotations

from typing import Any

import httpx2

from flowstone_dagster.resilience.admission import current_admission

__all__ = ["PROVIDER_COUNTING_WINDOW", "confirm_at_send", "late_after"]

#: The finest window providers count requests in (OpenAI: "60,000 requests/minute may be
#: enforced as 1,000 requests/second"): what ``rate_limit_margin`` is a fraction of.
PROVIDER_COUNTING_WINDOW = 1.0


def late_after(rate_limit_margin: float) -> float:
    """How late a send may be before its admission is taken again: a third of the margin's
    slack in the provider's one-second window (10 ms at the default 3 %), leaving the rest to
    the network's and the provider's own variation; at least 1 ms."""
    return max(rate_limit_margin * PROVIDER_COUNTING_WINDOW / 3, 0.001)


def confirm_at_send(request: httpx2.Request, seconds: float) -> None:
    """Have ``request`` confirm the current attempt's request limits (not ``:tpm`` ones)
    just before its headers are sent, when it is more than ``seconds`` late."""
    admission = current_admission()
    if admission is None:
        return
    names = [name for name in admission.limiters if not name.endswith(":tpm")]
    if not names:
        return
    # A request sent again (the governed client's retries) carries the previous attempt's
    # trace: replace it, keeping only what the caller had set.
    previous = request.extensions.get("trace")
    previous = getattr(previous, "replaced_trace", previous)

    def trace(event: str, info: dict[str, Any]) -> None:
        if event.endswith(".send_request_headers.started"):
            admission.confirm(seconds, names)
        if previous is not None:
            previous(event, info)

    trace.replaced_trace = previous  # type: ignore[attr-defined]
    request.extensions = {**request.extensions, "trace": trace}
