"""Slack delivery: incoming webhooks, and the Web API's ``chat.postMessage``.

::

    from flowstone_dagster.notifications.slack import SlackApiChannel, SlackWebhookChannel

    webhook = SlackWebhookChannel(os.environ["SLACK_WEBHOOK_URL"])
    webhook.deliver("run_failed", {"job": "daily", "run_id": "abc", "error": "boom"})

    api = SlackApiChannel(WebClient(token=os.environ["SLACK_BOT_TOKEN"]), channel="#alerts")
    api.deliver("checkpoint_pending", {"message": "Review", "url": "https://..."})

Each ``deliver`` makes exactly one request and raises an error of the taxonomy on failure;
retrying (and honouring a 429's ``Retry-After``) is the resilience layer's job
(:class:`~flowstone_dagster.notifications.Notifier` calls channels through it).

- A webhook posts through :func:`~flowstone_dagster.http.create_session`; its URL is the
  secret, so it is passed as ``secrets=`` and never appears in an error, a log or telemetry.
- The Web API goes through ``slack_sdk``'s ``WebClient`` (what ``dagster-slack``'s
  ``SlackResource.get_client()`` returns) with its own retry handlers removed. Slack answers
  a failed call with HTTP 200 and ``{"ok": false, "error": "..."}``: that raises
  :class:`SlackApiRejected` with the error code.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
from collections.abc import Mapping
from typing import Any

from slack_sdk import WebClient
from slack_sdk.errors import SlackApiError, SlackRequestError

from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    ExternalServiceError,
    TransportError,
    error_for_status,
    parse_retry_after,
    truncate,
)
from flowstone_dagster.http import HttpSession, create_session, redact_text
from flowstone_dagster.notifications.formatting import SlackMessage, format_slack_message
from flowstone_dagster.resilience import current_deadline

__all__ = [
    "DEFAULT_SLACK_TIMEOUT",
    "TRANSIENT_SLACK_ERRORS",
    "SlackApiChannel",
    "SlackApiRejected",
    "SlackWebhookChannel",
]

#: Seconds a Slack request may take (connect and read).
DEFAULT_SLACK_TIMEOUT = 10.0

#: Web API error codes that Slack documents as temporary (chat.postMessage "Errors" table):
#: worth another attempt. Every other code (``channel_not_found``, ``invalid_auth``,
#: ``msg_too_long``, ...) fails the same way again.
TRANSIENT_SLACK_ERRORS = frozenset(
    {"ratelimited", "internal_error", "fatal_error", "service_unavailable", "request_timeout"}
)

_HINTS = {
    "invalid_auth": "check the bot token",
    "not_authed": "check the bot token",
    "token_revoked": "the bot token was revoked; issue a new one",
    "account_inactive": "the bot token belongs to a deactivated user or app",
    "channel_not_found": "check slack_channel (a channel ID such as C0123456789, or #name)",
    "not_in_channel": "invite the app to the channel (/invite @app)",
    "is_archived": "the channel is archived",
    "missing_scope": "the token needs the chat:write scope",
    "invalid_blocks": "Slack rejected the blocks; please report this as a flowstone-dagster bug",
}


class SlackApiRejected(ExternalServiceError):
    """Slack's Web API answered ``{"ok": false, "error": code}`` (with HTTP 200).

    ``code`` is Slack's error code (``channel_not_found``, ``invalid_auth``, ...). Retryable
    only for the codes Slack documents as temporary (:data:`TRANSIENT_SLACK_ERRORS`).
    """

    def __init__(self, code: str, *, method: str = "chat.postMessage", service: str | None = None):
        hint = _HINTS.get(code)
        super().__init__(
            f"Slack {method} failed: {code}" + (f" ({hint})" if hint else ""), service=service
        )
        self.code = code
        self.retryable = code in TRANSIENT_SLACK_ERRORS


def _payload_bytes(message: SlackMessage, extra: Mapping[str, Any] | None = None) -> bytes:
    body: dict[str, Any] = {**(extra or {}), "text": message["text"], "blocks": message["blocks"]}
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def _timeout(default: float) -> float:
    """The configured timeout, shortened to what the resilience deadline leaves."""
    deadline = current_deadline()
    if deadline is None:
        return default
    deadline.check("the Slack request")
    return max(deadline.timeout(default=default), 0.001)


class SlackWebhookChannel:
    """Posts messages to one Slack incoming webhook.

    Args:
        url: the webhook URL (``https://hooks.slack.com/services/...``): a secret.
        timeout: seconds for connecting and for reading the answer.
        ca_bundle: a PEM file of CA certificates to trust (a TLS-intercepting proxy).
        service: name in errors and of the resilience policy.
        session: an :class:`~flowstone_dagster.http.HttpSession` to use instead of a new one.
    """

    name = "slack"

    def __init__(
        self,
        url: str,
        *,
        timeout: float = DEFAULT_SLACK_TIMEOUT,
        ca_bundle: str | None = None,
        service: str = "slack",
        session: HttpSession | None = None,
    ) -> None:
        if not url or not url.startswith(("https://", "http://")):
            raise ConfigurationError(
                "must be the webhook's http(s) URL (https://hooks.slack.com/services/...)",
                field="slack_webhook.url",
            )
        if timeout <= 0:
            raise ConfigurationError("must be positive seconds", field="slack_webhook.timeout")
        self._url = url
        self.timeout = timeout
        self.service = service
        self.session = session or create_session(
            timeout=timeout,
            ca_bundle=ca_bundle,
            secrets=[url],
            service=service,
            telemetry_event=None,  # flowstone.notify.send reports each delivery
        )

    def __repr__(self) -> str:
        return f"<SlackWebhookChannel service={self.service!r} url=***>"

    def deliver(self, event: str, payload: Mapping[str, Any]) -> int:
        """Post the message for ``event``; returns the bytes sent.

        Raises ``HTTPError``/``NotFound``/``Forbidden`` (a webhook answers 400
        ``invalid_payload``, 403 ``action_prohibited``, 404 ``no_service``, 410
        ``channel_is_archived``), ``RateLimited`` (429, with ``retry_after``), ``CallTimeout``
        or ``TransportError``; the webhook URL is never in the message.
        """
        body = _payload_bytes(format_slack_message(event, payload))
        self.session.post(
            self._url,
            data=body,
            headers={"Content-Type": "application/json; charset=utf-8"},
            timeout=_timeout(self.timeout),
        )
        return len(body)


class SlackApiChannel:
    """Posts messages with the Web API's ``chat.postMessage`` to one channel.

    Args:
        client: a ``slack_sdk.WebClient``, usually ``SlackResource(...).get_client()``. Its
            retry handlers are removed (retrying belongs to the resilience layer) and, when
            given, ``base_url`` and ``timeout`` are set on it.
        channel: the channel ID (``C0123456789``) or name (``#alerts``).
        base_url: the API's base URL (``https://slack.com/api/``; GovSlack or a test server).
        timeout: seconds per request.
        service: name in errors and of the resilience policy.
    """

    name = "slack"

    def __init__(
        self,
        client: WebClient,
        channel: str,
        *,
        base_url: str | None = None,
        timeout: float = DEFAULT_SLACK_TIMEOUT,
        ssl_context: ssl.SSLContext | None = None,
        service: str = "slack",
    ) -> None:
        if not channel or any(c.isspace() for c in channel):
            raise ConfigurationError(
                "must be a channel ID (C0123456789) or #name without spaces",
                field="slack_channel",
            )
        if timeout <= 0:
            raise ConfigurationError("must be positive seconds", field="slack_timeout")
        if base_url is not None:
            client.base_url = base_url if base_url.endswith("/") else base_url + "/"
        if ssl_context is not None:
            client.ssl = ssl_context
        client.retry_handlers = []  # one retry layer: ours
        self.client = client
        self.channel = channel
        self.timeout = timeout
        self.service = service
        self._token = client.token or ""

    def __repr__(self) -> str:
        return f"<SlackApiChannel service={self.service!r} channel={self.channel!r}>"

    def deliver(self, event: str, payload: Mapping[str, Any]) -> int:
        """Post the message for ``event`` with ``chat.postMessage``; returns the bytes sent.

        Raises :class:`SlackApiRejected` for ``{"ok": false}``, ``RateLimited`` for a 429
        (``retry_after`` from ``Retry-After``), ``HTTPError`` for other statuses,
        ``CallTimeout`` or ``TransportError``. The token is never in a message.
        """
        message = format_slack_message(event, payload)
        size = len(_payload_bytes(message, {"channel": self.channel}))
        self.client.timeout = _timeout(self.timeout)  # type: ignore[assignment]  # urllib: float
        try:
            self.client.chat_postMessage(
                channel=self.channel, text=message["text"], blocks=message["blocks"]
            )
        except SlackApiError as exc:
            raise self._error_for(exc) from None
        except SlackRequestError as exc:
            raise ConfigurationError(
                redact_text(str(exc), [self._token]), field="slack_api_url", service=self.service
            ) from None
        except (TimeoutError, urllib.error.URLError, OSError) as exc:
            raise self._transport_error(exc) from None
        return size

    def _error_for(self, exc: SlackApiError) -> ExternalServiceError:
        response = exc.response
        data = response.data if isinstance(response.data, Mapping) else {}
        code = str(data.get("error") or "unknown_error")
        status = int(response.status_code)
        if status == 200:
            return SlackApiRejected(code, service=self.service)
        headers = response.headers or {}
        retry_after = headers.get("Retry-After") or headers.get("retry-after")
        return error_for_status(
            status,
            url=self.client.base_url + "chat.postMessage",
            method="POST",
            body=redact_text(code, [self._token]),
            retry_after=parse_retry_after(retry_after),
            service=self.service,
        )

    def _transport_error(self, exc: BaseException) -> ExternalServiceError:
        reason: Any = getattr(exc, "reason", exc)  # urllib's URLError wraps the real cause
        where = f"POST {self.client.base_url}chat.postMessage"
        text = truncate(redact_text(str(reason), [self._token]), 300)
        if isinstance(reason, TimeoutError):
            return CallTimeout(
                f"{where} timed out after {self.client.timeout} s",
                timeout=float(self.client.timeout),
                service=self.service,
            )
        if isinstance(reason, ssl.SSLError):
            return TransportError(
                f"{where}: TLS failure: {text} (set slack_ca_bundle to trust a private CA)",
                service=self.service,
                tls=True,
            )
        return TransportError(f"{where}: {text}", service=self.service)
