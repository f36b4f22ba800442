"""aiosmtpd servers on loopback in the modes the email channel must handle.

``SmtpSink`` (support/smtp.py) keeps what arrives; these helpers start it behind an aiosmtpd
``Controller`` configured as a real mail server would be: STARTTLS required, AUTH required
(after STARTTLS), or implicit TLS. Certificates come from a ``trustme`` CA::

    with serve_smtp(require_starttls=True, tls=server_tls_context(ca)) as sink:
        ...   # sink.port, sink.wait_for(1)
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.smtp import SmtpSink


def server_tls_context(ca: trustme.CA) -> ssl.SSLContext:
    """A server-side TLS context with a certificate for 127.0.0.1 and localhost."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
    return context


def password_authenticator(user: str, password: str) -> Any:
    """An aiosmtpd authenticator accepting exactly ``user`` / ``password``."""

    def authenticate(
        server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any
    ) -> AuthResult:
        ok = (
            isinstance(auth_data, LoginPassword)
            and auth_data.login.decode() == user
            and auth_data.password.decode() == password
        )
        return AuthResult(success=ok, handled=False)

    return authenticate


@contextmanager
def serve_smtp(
    sink: SmtpSink | None = None,
    *,
    implicit_tls: ssl.SSLContext | None = None,
    **smtp_options: Any,
) -> Iterator[SmtpSink]:
    """Run ``sink`` (a new one by default) on a free port with aiosmtpd's ``smtp_options``
    (``require_starttls``, ``tls_context``, ``auth_required``, ``authenticator``, ...);
    ``implicit_tls`` wraps every connection in TLS from the first byte."""
    sink = sink or SmtpSink("127.0.0.1", free_port())
    controller = Controller(
        sink, hostname=sink.host, port=sink.port, ssl_context=implicit_tls, **smtp_options
    )
    controller.start()
    try:
        yield sink
    finally:
        controller.stop()
