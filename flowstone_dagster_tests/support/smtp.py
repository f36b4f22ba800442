"""A real SMTP server on loopback (aiosmtpd) that keeps every message it receives."""

from __future__ import annotations

import email
import email.policy
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from flowstone_dagster_tests.support.net import free_port


@dataclass
class ReceivedMail:
    mail_from: str
    rcpt_tos: list[str]
    message: EmailMessage


@dataclass
class SmtpSink:
    """What the server received; ``wait_for(n)`` blocks until ``n`` messages arrived."""

    host: str
    port: int
    messages: list[ReceivedMail] = field(default_factory=list)
    _arrived: threading.Condition = field(default_factory=threading.Condition)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[ReceivedMail]:
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.messages) >= count, timeout):
                raise TimeoutError(f"expected {count} messages, got {len(self.messages)}")
            return list(self.messages)

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
        with self._arrived:
            self.messages.append(
                ReceivedMail(envelope.mail_from, list(envelope.rcpt_tos), message)  # type: ignore[arg-type]
            )
            self._arrived.notify_all()
        return "250 Message accepted for delivery"

    @classmethod
    @contextmanager
    def start(cls) -> Iterator[SmtpSink]:
        sink = cls("127.0.0.1", free_port())
        controller = Controller(sink, hostname=sink.host, port=sink.port)
        controller.start()
        try:
            yield sink
        finally:
            controller.stop()
