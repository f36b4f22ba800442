"""The notifications resource, where the package layout puts resources.

The implementation lives in :mod:`flowstone_dagster.notifications` (formatting, Slack, email,
the notifier and the resource, one module each); this module re-exports what a Dagster
``Definitions`` needs::

    from flowstone_dagster.resources.notifications import NotificationsResource
"""

from flowstone_dagster.notifications import (
    AllChannelsFailed,
    EmailConfig,
    NotificationsResource,
    NotifyResult,
    SlackWebhookConfig,
    format_email_body,
    format_slack_message,
)

__all__ = [
    "AllChannelsFailed",
    "EmailConfig",
    "NotificationsResource",
    "NotifyResult",
    "SlackWebhookConfig",
    "format_email_body",
    "format_slack_message",
]
