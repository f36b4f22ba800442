"""Notifications to Slack and email: from assets and ops (a resource) and from sensors.

::

    from flowstone_dagster.notifications import (
        NotificationsResource, SlackWebhookConfig, format_email_body, format_slack_message,
    )

- :mod:`.formatting`: what a notification says (:func:`compose`) and how it looks
  (:func:`format_slack_message`, :func:`format_email_body`);
- :mod:`.slack`: :class:`SlackWebhookChannel`, :class:`SlackApiChannel`;
- :mod:`.smtp`: :class:`EmailChannel`, :class:`SmtpSettings`, :func:`build_email_message`;
- :mod:`.notifier`: :class:`Notifier` (every channel attempted; ``PartialFailure`` /
  :class:`AllChannelsFailed`);
- :mod:`.resource`: :class:`NotificationsResource`, the Dagster resource.

- :mod:`.sensor`: :func:`make_notification_sensor`, a sensor that notifies on failed runs and
  asset checks (filtered by job or asset selection, with an alert-storm window).

The guide is ``docs/notifications.md``.
"""

from flowstone_dagster.notifications.formatting import (
    EmailBody,
    Notice,
    SlackMessage,
    compose,
    escape_mrkdwn,
    format_email_body,
    format_slack_message,
)
from flowstone_dagster.notifications.notifier import (
    AllChannelsFailed,
    Channel,
    Notifier,
    NotifyResult,
)
from flowstone_dagster.notifications.resource import (
    EmailConfig,
    NotificationsResource,
    SlackWebhookConfig,
)
from flowstone_dagster.notifications.sensor import (
    AlertStorm,
    NotificationSensorCursor,
    make_notification_sensor,
)
from flowstone_dagster.notifications.slack import (
    SlackApiChannel,
    SlackApiRejected,
    SlackWebhookChannel,
)
from flowstone_dagster.notifications.smtp import (
    EmailChannel,
    SmtpRejected,
    SmtpSettings,
    build_email_message,
)

__all__ = [
    "AlertStorm",
    "NotificationSensorCursor",
    "make_notification_sensor",
    "AllChannelsFailed",
    "Channel",
    "EmailBody",
    "EmailChannel",
    "EmailConfig",
    "Notice",
    "NotificationsResource",
    "Notifier",
    "NotifyResult",
    "SlackApiChannel",
    "SlackApiRejected",
    "SlackMessage",
    "SlackWebhookChannel",
    "SlackWebhookConfig",
    "SmtpRejected",
    "SmtpSettings",
    "build_email_message",
    "compose",
    "escape_mrkdwn",
    "format_email_body",
    "format_slack_message",
]
