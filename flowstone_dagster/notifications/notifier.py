"""Sending one notification to several channels, and saying exactly which ones failed.

::

    from flowstone_dagster.notifications import Notifier
    from flowstone_dagster.errors import PartialFailure

    notifier = Notifier([slack_channel, email_channel], resilience=resilience)
    notifier.notify("materialization_failed", {"asset": "orders", "error": "disk full"})

    try:
        notifier.notify("run_failed", payload, channels=["slack", "email"])
    except PartialFailure as exc:            # also catches AllChannelsFailed
        for channel, error in exc.failures:
            ...

**The one idiom**: every selected channel is attempted, in order, even after one fails.

- all delivered: ``notify`` returns a :class:`NotifyResult` naming them;
- some failed: it raises :class:`~flowstone_dagster.errors.PartialFailure` with
  ``failures`` (``[(channel, error), ...]``) and ``succeeded`` (the channel names);
- all failed: it raises :class:`AllChannelsFailed` (a ``PartialFailure`` whose
  ``succeeded`` is empty) with every cause.

Either error's ``__cause__`` is an ``ExceptionGroup`` of the channel errors, so a traceback
shows each of them. A bad call (unknown event shape, unknown or unconfigured channel) raises
``ConfigurationError`` before anything is sent.

Each delivery goes through the resilience policy of the channel's ``service``: the given
:class:`~flowstone_dagster.resilience.ResilienceResource`'s (retries honouring a 429's
``Retry-After``, circuit breaker, rate limit shared across processes) or, without one,
``policy`` (default :data:`NOTIFY_POLICY`: up to 4 attempts of a 429, 5xx, timeout or
connection failure, honouring ``Retry-After`` up to 10 s, within 30 s; no breaker), through
:func:`~flowstone_dagster.resilience.resolve`: the one resilience path.

The errors in ``PartialFailure``/``AllChannelsFailed`` (their messages and every link of their
chains) are redacted (:func:`~flowstone_dagster.redaction.redact_exception_chain`): registered
secrets such as the webhook URL, its path and parts of it, the bot token and the SMTP password
never reach a log or Dagster's event log through them.

Telemetry: ``flowstone.notify.send`` per channel delivery (``channel``, ``event``,
``service``, ``bytes``; ``attempts``; outcome), and ``flowstone.notify`` per call (``event``,
``channels``, ``delivered``, ``failed``; outcome ``error`` when any channel failed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from flowstone_dagster import telemetry
from flowstone_dagster.errors import ConfigurationError, FlowstoneError, PartialFailure
from flowstone_dagster.notifications.formatting import compose
from flowstone_dagster.redaction import redact_exception_chain
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy, resolve

__all__ = ["NOTIFY_POLICY", "AllChannelsFailed", "Channel", "Notifier", "NotifyResult"]

#: The policy of every channel when no ResilienceResource is given. Slack rate-limits webhooks
#: to about one message per second, so a 429 is routine: it is retried after the Retry-After
#: Slack sends (a wait longer than ``max_delay`` ends the retries), as are 5xx answers, timeouts
#: and connection failures; no new attempt starts after ``deadline``. No circuit breaker (its
#: state would be this process's alone) and no rate limit.
NOTIFY_POLICY = ServicePolicy(
    retry=RetryConfig(max_attempts=4, base_delay=1.0, max_delay=10.0, deadline=30.0, jitter=0.5),
    circuit_breaker=None,
)


class Channel(Protocol):
    """A destination: ``deliver`` sends one notification (exactly one attempt).

    ``name`` is what callers pass in ``channels=``; ``service`` names the resilience policy.
    ``deliver`` returns the bytes sent and raises an error of the taxonomy on failure.
    """

    name: str
    service: str

    def deliver(self, event: str, payload: Mapping[str, Any]) -> int: ...


class AllChannelsFailed(PartialFailure):
    """Every selected channel failed. ``failures`` holds each ``(channel, error)``;
    ``succeeded`` is empty. A :class:`~flowstone_dagster.errors.PartialFailure`, so one
    ``except PartialFailure`` handles any failed notification."""


@dataclass(frozen=True)
class NotifyResult:
    """A notification that every selected channel delivered."""

    event: str
    delivered: tuple[str, ...]


class Notifier:
    """Sends notifications to named channels (see the module docs for the failure idiom).

    Args:
        channels: the configured channels; names must be unique.
        default_channels: the names ``notify(channels=None)`` uses; default all.
        resilience: retries, breaker and rate limit per channel ``service``.
        policy: the policy of every channel when ``resilience`` is ``None`` (default
            :data:`NOTIFY_POLICY`; :data:`~flowstone_dagster.resilience.ONCE` for one attempt).
    """

    def __init__(
        self,
        channels: Iterable[Channel],
        *,
        default_channels: Sequence[str] | None = None,
        resilience: ResilienceResource | None = None,
        policy: ServicePolicy | None = None,
    ) -> None:
        self.channels: dict[str, Channel] = {}
        for channel in channels:
            if channel.name in self.channels:
                raise ConfigurationError(
                    f"two channels are named {channel.name!r}", field="channels"
                )
            self.channels[channel.name] = channel
        self.default_channels = (
            self._select(default_channels, field="default_channels")
            if default_channels is not None
            else list(self.channels)
        )
        self.resilience = resilience
        self.policy = policy or NOTIFY_POLICY
        self._path = resolve(resilience, default_policy=self.policy)

    def __repr__(self) -> str:
        return f"<Notifier channels={list(self.channels)}>"

    def _select(self, names: Sequence[str], *, field: str = "channels") -> list[str]:
        if isinstance(names, str):  # channels="slack" would otherwise mean s, l, a, c, k
            names = [names]
        unknown = [name for name in names if name not in self.channels]
        if unknown:
            configured = ", ".join(self.channels) or "none"
            raise ConfigurationError(
                f"{', '.join(map(repr, unknown))} not configured (configured: {configured})",
                field=field,
            )
        if not names:
            raise ConfigurationError("no channel selected", field=field)
        return list(dict.fromkeys(names))  # in order, each once

    def notify(
        self,
        event: str,
        payload: Mapping[str, Any] | None = None,
        channels: Sequence[str] | None = None,
    ) -> NotifyResult:
        """Send ``event`` with ``payload`` to ``channels`` (default: the default channels).

        Returns a :class:`NotifyResult` when every channel delivered; raises
        ``PartialFailure`` when some failed, :class:`AllChannelsFailed` when all did, and
        ``ConfigurationError`` (nothing sent) for a bad call.
        """
        payload = dict(payload or {})
        selected = self._select(channels) if channels is not None else self.default_channels
        if not selected:
            raise ConfigurationError(
                "no notification channel is configured (configure slack or email)",
                field="channels",
            )
        compose(event, payload)  # a bad payload fails here, before any channel is tried
        delivered: list[str] = []
        failures: list[tuple[str, BaseException]] = []
        with telemetry.span("flowstone.notify", event=event, channels=len(selected)) as call:
            for name in selected:
                try:
                    self._deliver(self.channels[name], event, payload)
                except Exception as exc:  # every channel is attempted; errors are collected
                    failures.append((name, redact_exception_chain(exc, is_ours=FlowstoneError)))
                else:
                    delivered.append(name)
            call.set(delivered=len(delivered), failed=len(failures))
            if failures:
                error_type = AllChannelsFailed if not delivered else PartialFailure
                error = error_type(failures, delivered, service="notify")
                causes = [exc for _, exc in failures if isinstance(exc, Exception)]
                raise error from ExceptionGroup(f"{event}: channel failures", causes)
        return NotifyResult(event=event, delivered=tuple(delivered))

    def _deliver(self, channel: Channel, event: str, payload: Mapping[str, Any]) -> int:
        attempts = 0

        def once() -> int:
            nonlocal attempts
            attempts += 1
            return channel.deliver(event, payload)

        with telemetry.span(
            "flowstone.notify.send", channel=channel.name, event=event, service=channel.service
        ) as send:
            try:
                size = self._path.call(channel.service, once, dagster_errors=False)
            finally:
                send.attempts = max(attempts, 1)
            send.set(bytes=size)
        return size
