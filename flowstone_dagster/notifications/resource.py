"""``NotificationsResource``: Slack and email notifications for assets, ops and sensors.

::

    import dagster as dg
    from dagster_slack import SlackResource
    from flowstone_dagster.notifications import (
        EmailConfig, NotificationsResource, SlackWebhookConfig,
    )

    notifications = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=dg.EnvVar("SLACK_WEBHOOK_URL")),
        # or the Web API: slack=SlackResource(token=dg.EnvVar("SLACK_BOT_TOKEN")),
        #                 slack_channel="#data-alerts",
        email=EmailConfig(
            host="smtp.example.com",
            username="alerts",
            password=dg.EnvVar("SMTP_PASSWORD"),
            sender="Flowstone <alerts@example.com>",
            recipients=["oncall@example.com"],
        ),
    )

    @dg.asset
    def scores(notifications: NotificationsResource) -> list[float]:
        ...
        notifications.notify("materialization_succeeded", {"asset": "scores"})

The resource is a thin layer over :class:`~flowstone_dagster.notifications.Notifier` and its
channels; it validates its configuration at set-up, naming the wrong field, and registers its
secrets (the webhook URL and the parts of its path, the bot token, the SMTP password) with
:func:`~flowstone_dagster.redaction.register_secret`, so that no redaction in the process lets
them through (a Slack 404 echoing the webhook path, an SDK's exception).

Without ``resilience`` every channel is called through ``policy`` (default
:data:`~flowstone_dagster.notifications.notifier.NOTIFY_POLICY`: a Slack 429 is retried after
its Retry-After, 5xx and connection failures with backoff, 4 attempts within 30 s).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal
from urllib.parse import urlsplit

import dagster as dg
from dagster_slack import SlackResource
from pydantic import Field, PrivateAttr

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.notifications.log import LogChannel
from flowstone_dagster.notifications.notifier import NOTIFY_POLICY, Channel, Notifier, NotifyResult
from flowstone_dagster.notifications.slack import (
    DEFAULT_SLACK_TIMEOUT,
    SlackApiChannel,
    SlackWebhookChannel,
)
from flowstone_dagster.notifications.smtp import DEFAULT_SMTP_TIMEOUT, EmailChannel, SmtpSettings
from flowstone_dagster.redaction import register_secret
from flowstone_dagster.resilience import ResilienceResource, ServicePolicy

__all__ = ["EmailConfig", "NotificationsResource", "SlackWebhookConfig"]


#: A webhook path's tails at least this long are registered as secrets too (a server that
#: echoes "T.../B.../token" without the /services/ prefix, or the token alone).
MIN_PATH_TAIL_SECRET = 16


def register_webhook_url(url: str) -> None:
    """Register a webhook URL as a secret: the URL, its path and query (register_secret), and
    every tail of its path of at least :data:`MIN_PATH_TAIL_SECRET` characters
    (``services/T0/B0/token``, ``T0/B0/token``, ``B0/token``, ``token``)."""
    register_secret(url)
    try:
        path = urlsplit(url).path
    except ValueError:
        return
    segments = [segment for segment in path.split("/") if segment]
    for start in range(len(segments)):
        tail = "/".join(segments[start:])
        if len(tail) >= MIN_PATH_TAIL_SECRET:
            register_secret(tail)


class SlackWebhookConfig(dg.Config):
    """A Slack incoming webhook (one channel, chosen when the webhook was created)."""

    url: str = Field(
        repr=False,
        description="The webhook URL, https://hooks.slack.com/services/...: a secret, pass "
        "dg.EnvVar('SLACK_WEBHOOK_URL').",
    )
    timeout: float = Field(
        default=DEFAULT_SLACK_TIMEOUT,
        gt=0,
        description="Seconds to connect, and to read the answer.",
    )
    ca_bundle: str | None = Field(
        default=None, description="PEM file of CA certificates to trust (a private CA)."
    )


class EmailConfig(dg.Config):
    """An SMTP server, the sender and the default recipients."""

    host: str = Field(description="SMTP server host name.")
    port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="SMTP port; default by security: 587 (starttls), 465 (ssl), 25 (none).",
    )
    security: Literal["starttls", "ssl", "none"] = Field(
        default="starttls",
        description="'starttls': the server must offer STARTTLS (no silent plain-text "
        "fallback); 'ssl': implicit TLS; 'none': plain text (a local relay).",
    )
    username: str | None = Field(default=None, description="AUTH user; no AUTH when null.")
    password: str | None = Field(
        default=None, repr=False, description="AUTH password: pass dg.EnvVar('SMTP_PASSWORD')."
    )
    sender: str = Field(description="The From address: alerts@example.com or Name <a@b.c>.")
    recipients: list[str] = Field(
        default_factory=list,
        description="Default To addresses; a payload's 'recipients' replaces them for a call.",
    )
    subject_prefix: str = Field(default="", description="Put before every subject: '[data] '.")
    timeout: float = Field(
        default=DEFAULT_SMTP_TIMEOUT, gt=0, description="Seconds to connect and per server reply."
    )
    ca_bundle: str | None = Field(
        default=None, description="PEM file of CA certificates to trust (a private CA)."
    )
    verify_tls: bool = Field(
        default=True, description="Verify the server's certificate. Off only for tests."
    )
    allow_insecure_auth: bool = Field(
        default=False,
        description="Allow AUTH with security 'none' (the password travels unencrypted).",
    )
    local_hostname: str | None = Field(
        default=None, description="Name sent in EHLO; default: this machine's FQDN."
    )


class NotificationsResource(dg.ConfigurableResource):
    """Sends notifications to Slack and email; see :meth:`notify` for the failure idiom.

    Channels: ``slack`` (an incoming webhook *or* the Web API through dagster-slack's
    ``SlackResource``), ``email`` (SMTP) and ``log`` (the step's log).
    ``notify(..., channels=None)`` uses ``default_channels``, or every configured channel.
    """

    slack_webhook: SlackWebhookConfig | None = Field(
        default=None, description="Slack through an incoming webhook (channel 'slack')."
    )
    slack: SlackResource | None = Field(
        default=None,
        repr=False,
        description="Slack through the Web API's chat.postMessage (channel 'slack'): "
        "dagster-slack's SlackResource(token=dg.EnvVar('SLACK_BOT_TOKEN')). Needs "
        "slack_channel.",
    )
    slack_channel: str | None = Field(
        default=None, description="Channel ID (C0123456789) or #name for the Web API."
    )
    slack_api_url: str = Field(
        default="https://slack.com/api/",
        description="Base URL of the Slack Web API (GovSlack: https://slack-gov.com/api/).",
    )
    slack_timeout: float = Field(
        default=DEFAULT_SLACK_TIMEOUT, gt=0, description="Seconds per Web API request."
    )
    email: EmailConfig | None = Field(default=None, description="Email over SMTP.")
    log: bool = Field(
        default=False,
        description="Channel 'log': write each notification to the step's log (Python logging "
        "outside a run). The console channel when Slack and email are not configured.",
    )
    default_channels: list[str] | None = Field(
        default=None,
        description="Channels notify() uses when none are given; null: every configured one.",
    )
    resilience: ResilienceResource | None = Field(
        default=None,
        description="Retries (honouring Retry-After), circuit breaker and rate limit per "
        "channel, under the services named by slack_service and email_service. Null: "
        "`policy` for every channel, in this process.",
    )
    policy: ServicePolicy | None = Field(
        default=None,
        description="The policy of every channel when `resilience` is null. Null: up to 4 "
        "attempts of a 429 (after its Retry-After, up to 10 s), 5xx, timeout or connection "
        "failure, none starting later than 30 s after the first; no circuit breaker, no rate "
        "limit. ServicePolicy(retry=RetryConfig(max_attempts=1), circuit_breaker=None): one "
        "attempt.",
    )
    slack_service: str = Field(
        default="slack", description="Service name of Slack in errors, telemetry and policies."
    )
    email_service: str | None = Field(
        default=None,
        description="Service name of SMTP in errors, telemetry and policies. Null: "
        "smtp:<host>:<port>, the server (what fails together), so that two resources on "
        "different servers never share a breaker.",
    )

    _notifier: Notifier | None = PrivateAttr(default=None)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Build the channels now, so that a wrong field fails the run at set-up."""
        self._notifier = self.build_notifier()

    def _register_secrets(self) -> None:
        """Make every redaction in this process hide this resource's secrets."""
        if self.slack_webhook is not None:
            register_webhook_url(self.slack_webhook.url)
        if self.slack is not None:
            register_secret(self.slack.token)
        if self.email is not None:
            register_secret(self.email.password)

    def _channels(self) -> list[Channel]:
        self._register_secrets()
        channels: list[Channel] = []
        if self.slack_webhook is not None and self.slack is not None:
            raise ConfigurationError(
                "configure Slack either by webhook or by the Web API (slack), not both",
                field="slack_webhook",
            )
        if self.slack_webhook is not None:
            channels.append(
                SlackWebhookChannel(
                    self.slack_webhook.url,
                    timeout=self.slack_webhook.timeout,
                    ca_bundle=self.slack_webhook.ca_bundle,
                    service=self.slack_service,
                )
            )
        if self.slack is not None:
            if not self.slack_channel:
                raise ConfigurationError(
                    "is required with the Slack Web API", field="slack_channel"
                )
            channels.append(
                SlackApiChannel(
                    self.slack.get_client(),
                    self.slack_channel,
                    base_url=self.slack_api_url,
                    timeout=self.slack_timeout,
                    service=self.slack_service,
                )
            )
        if self.email is not None:
            config = self.email
            settings = SmtpSettings(
                host=config.host,
                port=config.port,
                security=config.security,
                username=config.username,
                password=config.password,
                timeout=config.timeout,
                ca_bundle=config.ca_bundle,
                verify_tls=config.verify_tls,
                allow_insecure_auth=config.allow_insecure_auth,
                local_hostname=config.local_hostname,
            )
            channels.append(
                EmailChannel(
                    settings,
                    sender=config.sender,
                    recipients=config.recipients,
                    subject_prefix=config.subject_prefix,
                    service=self.email_service or f"smtp:{settings.host}:{settings.resolved_port}",
                )
            )
        if self.log:
            channels.append(LogChannel())
        return channels

    def build_notifier(self) -> Notifier:
        """A :class:`Notifier` with this configuration's channels (raises on a bad field)."""
        return Notifier(
            self._channels(),
            default_channels=self.default_channels,
            resilience=self.resilience,
            policy=self.policy or NOTIFY_POLICY,
        )

    @property
    def notifier(self) -> Notifier:
        """The notifier, built at set-up (or on first use outside Dagster)."""
        if self._notifier is None:
            self._notifier = self.build_notifier()
        return self._notifier

    def configured_channels(self) -> list[str]:
        """The names of the configured channels (``["slack", "email"]``)."""
        return list(self.notifier.channels)

    def notify(
        self,
        event: str,
        payload: Mapping[str, Any] | None = None,
        channels: Sequence[str] | None = None,
    ) -> NotifyResult:
        """Send ``event`` to ``channels`` (default: ``default_channels``, or all configured).

        Every channel is attempted even when another fails. Returns a ``NotifyResult`` when
        all delivered; raises ``PartialFailure(failures, succeeded)`` when some failed and
        ``AllChannelsFailed`` (a ``PartialFailure`` with nothing succeeded) when all failed;
        ``ConfigurationError`` for an unknown channel or a payload missing a required key.
        """
        return self.notifier.notify(event, payload, channels)
