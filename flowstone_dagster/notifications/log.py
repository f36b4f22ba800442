"""The ``log`` channel: notifications written to the log instead of sent.

It is the console channel of a deployment (or a demo) without Slack or email: each
notification is one log record on ``dagster.builtin.flowstone.notifications``, which Dagster
routes to the step's log inside a run and to Python ``logging`` elsewhere::

    NotificationsResource(log=True).notify("materialization_failed", {"asset": "orders"})
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import dagster as dg

from flowstone_dagster.notifications.formatting import format_email_body

__all__ = ["LogChannel"]

#: Events logged as warnings; every other event is logged at INFO.
WARNING_EVENTS = frozenset(
    {"materialization_failed", "run_failed", "asset_check_failed", "checkpoint_pending"}
)


class LogChannel:
    """Writes each notification (its subject and plain-text body) as one log record."""

    name = "log"
    service = "log"

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or dg.get_dagster_logger("flowstone.notifications")

    def deliver(self, event: str, payload: Mapping[str, Any]) -> int:
        body = format_email_body(event, payload)
        text = f"{body.subject}\n{body.text}".rstrip()
        level = logging.WARNING if event in WARNING_EVENTS else logging.INFO
        self.logger.log(level, text)
        return len(text.encode())
