"""Email delivery over SMTP, with messages built by the standard ``email`` package.

::

    from flowstone_dagster.notifications.smtp import EmailChannel, SmtpSettings

    email = EmailChannel(
        SmtpSettings(host="smtp.example.com", security="starttls",
                     username="alerts", password=os.environ["SMTP_PASSWORD"]),
        sender="Flowstone <alerts@example.com>",
        recipients=["oncall@example.com", "data-team@example.com"],
    )
    email.deliver("run_failed", {"job": "daily", "error": "ValueError: bad row"})

- **Transport security**: ``starttls`` (the default; the server *must* offer STARTTLS, else
  the delivery fails: there is no silent downgrade to plain text), ``ssl`` (implicit TLS, port
  465) or ``none``. Certificates are verified (``ca_bundle`` for a private CA).
- **AUTH** when ``username`` is set; a password is never sent without TLS unless
  ``allow_insecure_auth`` says so.
- **Timeouts** on connecting and on every reply (``timeout``, shortened by a resilience
  deadline).
- **Errors**: a 4xx reply (transient by RFC 5321) is a retryable :class:`SmtpRejected`, a 5xx
  reply a permanent one; refused connections, drops and TLS failures are ``TransportError``,
  timeouts ``CallTimeout``.
- **Messages**: ``Date``, ``Message-ID``, ``From``, ``To``, ``Subject`` (RFC 2047-encoded when
  not ASCII), ``Auto-Submitted: auto-generated``; ``multipart/alternative`` with a text and an
  HTML part.
- **Header injection**: an address containing CR, LF or NUL is refused
  (``ConfigurationError``); the subject is always made one line (line breaks from an error
  message become spaces), so no header value can start a second header.
"""

from __future__ import annotations

import email.policy
import email.utils
import smtplib
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from email.message import EmailMessage
from typing import Any, Literal

from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    ExternalServiceError,
    TransportError,
    truncate,
)
from flowstone_dagster.http import redact_text
from flowstone_dagster.notifications.formatting import (
    EmailBody,
    format_email_body,
    single_line,
)
from flowstone_dagster.resilience import current_deadline

__all__ = [
    "DEFAULT_SMTP_TIMEOUT",
    "EmailChannel",
    "SmtpRejected",
    "SmtpSecurity",
    "SmtpSettings",
    "build_email_message",
    "validate_address",
]

SmtpSecurity = Literal["starttls", "ssl", "none"]

#: Seconds to connect, and to wait for each server reply.
DEFAULT_SMTP_TIMEOUT = 30.0

_DEFAULT_PORTS: dict[str, int] = {"starttls": 587, "ssl": 465, "none": 25}

_FORBIDDEN_IN_HEADERS = ("\r", "\n", "\0")

#: CRLF line ends and 7-bit transfer encodings (quoted-printable or base64 for non-ASCII
#: text), so that a message goes through any server, with or without 8BITMIME.
_POLICY = email.policy.SMTP.clone(cte_type="7bit")


class SmtpRejected(ExternalServiceError):
    """The SMTP server refused the message (or a recipient, the sender, the login).

    ``code`` is the server's reply code: 4xx is transient (retryable), 5xx permanent.
    ``refused`` maps each refused recipient to its ``(code, reply)``. When only some
    recipients were refused, the others got the message, so it is not retryable (a retry would
    send it to them twice).
    """

    def __init__(
        self,
        message: str,
        *,
        code: int,
        refused: Mapping[str, tuple[int, str]] | None = None,
        partial: bool = False,
        service: str | None = None,
    ) -> None:
        super().__init__(message, service=service)
        self.code = code
        self.refused = dict(refused or {})
        self.retryable = 400 <= code < 500 and not partial


def validate_address(value: str, field: str) -> str:
    """``value`` if it is one email address (``a@b.c`` or ``Name <a@b.c>``), else raise.

    Refuses CR, LF and NUL (header injection), several addresses in one value, and anything
    without a ``local@domain`` part; the ``ConfigurationError`` names ``field``.
    """
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError("must be an email address", field=field)
    if any(char in value for char in _FORBIDDEN_IN_HEADERS):
        raise ConfigurationError(
            f"{value!r} contains a line break or NUL: refused, as it could inject an email header",
            field=field,
        )
    addresses = email.utils.getaddresses([value])
    if len(addresses) != 1:
        raise ConfigurationError(f"{value!r} is not one address", field=field)
    _, address = addresses[0]
    local, at, domain = address.rpartition("@")
    if not at or not local or "." not in domain.strip(".") or any(c.isspace() for c in address):
        raise ConfigurationError(f"{value!r} is not an email address (local@domain)", field=field)
    return value.strip()


def _domain_of(address: str) -> str:
    return email.utils.parseaddr(address)[1].rpartition("@")[2]


def build_email_message(
    body: EmailBody,
    *,
    sender: str,
    recipients: Sequence[str],
    subject_prefix: str = "",
    now: datetime | None = None,
) -> EmailMessage:
    """The ``multipart/alternative`` message for ``body``, with every header set.

    Addresses are validated (:func:`validate_address`); the subject is made one line, so a
    line break in it (say, from an error message) becomes a space instead of a new header.
    """
    sender = validate_address(sender, "email.sender")
    if not recipients:
        raise ConfigurationError("needs at least one address", field="email.recipients")
    to = [validate_address(address, "email.recipients") for address in recipients]
    message = EmailMessage(policy=_POLICY)
    message["Subject"] = single_line(f"{subject_prefix}{body.subject}")
    message["From"] = sender
    message["To"] = ", ".join(to)
    message["Date"] = email.utils.format_datetime(now or datetime.now(UTC))
    message["Message-ID"] = email.utils.make_msgid(domain=_domain_of(sender))
    message["Auto-Submitted"] = "auto-generated"  # RFC 3834: no auto-replies, please
    message.set_content(body.text)
    message.add_alternative(body.html, subtype="html")
    return message


@dataclass(frozen=True)
class SmtpSettings:
    """How to reach an SMTP server.

    ``port`` defaults by ``security``: 587 (``starttls``), 465 (``ssl``), 25 (``none``).
    """

    host: str
    port: int | None = None
    security: SmtpSecurity = "starttls"
    username: str | None = None
    password: str | None = None
    timeout: float = DEFAULT_SMTP_TIMEOUT
    ca_bundle: str | None = None
    verify_tls: bool = True
    allow_insecure_auth: bool = False
    local_hostname: str | None = None

    def __repr__(self) -> str:
        return (
            f"SmtpSettings(host={self.host!r}, port={self.resolved_port}, "
            f"security={self.security!r}, username={self.username!r}, password=***)"
        )

    @property
    def resolved_port(self) -> int:
        return self.port if self.port is not None else _DEFAULT_PORTS[self.security]

    def validate(self) -> None:
        """Raise ``ConfigurationError`` naming the field that is wrong."""
        if not self.host or any(c.isspace() for c in self.host):
            raise ConfigurationError("must be a host name", field="email.host")
        if self.security not in _DEFAULT_PORTS:
            raise ConfigurationError("must be starttls, ssl or none", field="email.security")
        if not 0 < self.resolved_port < 65536:
            raise ConfigurationError("must be a TCP port", field="email.port")
        if self.timeout <= 0:
            raise ConfigurationError("must be positive seconds", field="email.timeout")
        if self.password and not self.username:
            raise ConfigurationError("is required with a password", field="email.username")
        if self.username and self.security == "none" and not self.allow_insecure_auth:
            raise ConfigurationError(
                "would send the password unencrypted: use security 'starttls' or 'ssl' "
                "(or set allow_insecure_auth for a trusted local relay)",
                field="email.security",
            )

    def tls_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=self.ca_bundle)
        if not self.verify_tls:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context


class EmailChannel:
    """Sends each notification as one email to ``recipients``.

    Args:
        settings: the server (:class:`SmtpSettings`).
        sender: the ``From`` address (``alerts@example.com`` or ``Name <alerts@...>``).
        recipients: the default ``To`` addresses; a payload's ``recipients`` replaces them
            for one notification.
        subject_prefix: put before every subject (``"[data] "``).
        service: name in errors and of the resilience policy.
    """

    name = "email"

    def __init__(
        self,
        settings: SmtpSettings,
        *,
        sender: str,
        recipients: Sequence[str] = (),
        subject_prefix: str = "",
        service: str = "smtp",
    ) -> None:
        settings.validate()
        self.settings = settings
        self.sender = validate_address(sender, "email.sender")
        self.recipients = [validate_address(r, "email.recipients") for r in recipients]
        if any(char in subject_prefix for char in _FORBIDDEN_IN_HEADERS):
            raise ConfigurationError("must not contain line breaks", field="email.subject_prefix")
        self.subject_prefix = subject_prefix
        self.service = service

    def __repr__(self) -> str:
        return f"<EmailChannel {self.settings!r} to={len(self.recipients)} recipients>"

    def recipients_for(self, payload: Mapping[str, Any]) -> list[str]:
        """The payload's ``recipients`` (a list or one address) or the configured ones."""
        chosen = payload.get("recipients")
        if chosen is None:
            if not self.recipients:
                raise ConfigurationError(
                    "no recipients: configure email.recipients or pass payload['recipients']",
                    field="email.recipients",
                )
            return list(self.recipients)
        if isinstance(chosen, str):
            chosen = [chosen]
        return [validate_address(str(r), "payload.recipients") for r in chosen]

    def message_for(self, event: str, payload: Mapping[str, Any]) -> EmailMessage:
        """The email that :meth:`deliver` sends for ``event``."""
        return build_email_message(
            format_email_body(event, payload),
            sender=self.sender,
            recipients=self.recipients_for(payload),
            subject_prefix=self.subject_prefix,
        )

    def deliver(self, event: str, payload: Mapping[str, Any]) -> int:
        """Send the email for ``event``; returns the size of the message in bytes."""
        message = self.message_for(event, payload)
        recipients = [email.utils.parseaddr(r)[1] for r in self.recipients_for(payload)]
        return self.send(message, recipients)

    def send(self, message: EmailMessage, recipients: Iterable[str]) -> int:
        """Send ``message`` to ``recipients`` (envelope addresses); returns its size."""
        settings = self.settings
        data = message.as_bytes(policy=_POLICY)
        sender = email.utils.parseaddr(self.sender)[1]
        to = list(recipients)
        try:
            with self._connect() as smtp:
                if settings.security == "starttls":
                    smtp.starttls(context=settings.tls_context())
                if settings.username:
                    smtp.login(settings.username, settings.password or "")
                refused = smtp.sendmail(sender, to, data)
        except smtplib.SMTPRecipientsRefused as exc:
            raise self._refused(exc.recipients, partial=False) from None
        except smtplib.SMTPNotSupportedError as exc:
            raise ExternalServiceError(
                f"{self._where()}: {exc} (check email.security: the server must offer "
                "STARTTLS for 'starttls', and AUTH when a username is set)",
                service=self.service,
            ) from None
        except smtplib.SMTPResponseException as exc:
            raise self._rejected(exc) from None
        except smtplib.SMTPServerDisconnected as exc:
            if isinstance(exc.__context__, TimeoutError):  # how smtplib reports a read timeout
                raise self._timeout() from None
            raise TransportError(
                f"{self._where()}: the server closed the connection ({exc})", service=self.service
            ) from None
        except TimeoutError:
            raise self._timeout() from None
        except ssl.SSLError as exc:
            raise TransportError(
                f"{self._where()}: TLS failure: {exc.reason or exc} (check email.security and "
                "email.port, or set email.ca_bundle to trust a private CA)",
                service=self.service,
                tls=True,
            ) from None
        except smtplib.SMTPException as exc:  # before OSError: SMTPException subclasses it
            raise ExternalServiceError(
                f"{self._where()}: {self._redact(str(exc))}", service=self.service
            ) from None
        except OSError as exc:  # refused, reset, unreachable, DNS
            raise TransportError(
                f"{self._where()}: {type(exc).__name__}: {exc}", service=self.service
            ) from None
        if refused:
            raise self._refused(refused, partial=True)
        return len(data)

    # -- helpers ---------------------------------------------------------------------------

    def _connect(self) -> smtplib.SMTP:
        settings = self.settings
        timeout = settings.timeout
        deadline = current_deadline()
        if deadline is not None:
            deadline.check("the SMTP delivery")
            timeout = max(deadline.timeout(default=timeout), 0.001)
        hostname = settings.local_hostname
        if settings.security == "ssl":
            return smtplib.SMTP_SSL(
                settings.host,
                settings.resolved_port,
                local_hostname=hostname,
                timeout=timeout,
                context=settings.tls_context(),
            )
        return smtplib.SMTP(
            settings.host, settings.resolved_port, local_hostname=hostname, timeout=timeout
        )

    def _timeout(self) -> CallTimeout:
        return CallTimeout(
            f"{self._where()}: no reply within {self.settings.timeout:g} s",
            timeout=self.settings.timeout,
            service=self.service,
        )

    def _where(self) -> str:
        return f"SMTP {self.settings.host}:{self.settings.resolved_port}"

    def _redact(self, text: str) -> str:
        return redact_text(text, [self.settings.password or ""])

    def _reply(self, reply: bytes | str) -> str:
        text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else str(reply)
        return truncate(self._redact(single_line(text)), 300)

    def _rejected(self, exc: smtplib.SMTPResponseException) -> SmtpRejected:
        code = int(exc.smtp_code)
        what = {
            smtplib.SMTPAuthenticationError: "login refused (check email.username and "
            "email.password)",
            smtplib.SMTPSenderRefused: f"sender {self.sender!r} refused",
            smtplib.SMTPDataError: "message refused",
            smtplib.SMTPHeloError: "greeting refused",
            smtplib.SMTPConnectError: "connection refused",
        }.get(type(exc), "command refused")
        kind = "transient" if 400 <= code < 500 else "permanent"
        return SmtpRejected(
            f"{self._where()}: {what}: {code} {self._reply(exc.smtp_error)} ({kind})",
            code=code,
            service=self.service,
        )

    def _refused(
        self, refused: Mapping[str, tuple[int, bytes | str]], *, partial: bool
    ) -> SmtpRejected:
        details = {rcpt: (int(code), self._reply(reply)) for rcpt, (code, reply) in refused.items()}
        listed = "; ".join(f"{rcpt}: {code} {reply}" for rcpt, (code, reply) in details.items())
        # All-refused is as transient as its most permanent reply; 5xx wins.
        code = max(code for code, _ in details.values())
        others = " (the other recipients received it)" if partial else ""
        return SmtpRejected(
            f"{self._where()}: recipients refused: {listed}{others}",
            code=code,
            refused=details,
            partial=partial,
            service=self.service,
        )
