"""Email notifications against real aiosmtpd servers on loopback: plain, STARTTLS required,
AUTH required, implicit TLS; message structure, header injection, and SMTP error classes."""

import email
import email.policy
import socket
import ssl
from collections.abc import Iterator
from typing import Any

import pytest
import trustme

from flowstone_dagster.errors import (
    CallTimeout,
    ConfigurationError,
    ExternalServiceError,
    TransportError,
    is_retryable,
)
from flowstone_dagster.notifications import (
    AllChannelsFailed,
    EmailChannel,
    EmailConfig,
    NotificationsResource,
    SmtpRejected,
    SmtpSettings,
    build_email_message,
    format_email_body,
)
from flowstone_dagster.resilience import ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.smtp import SmtpSink
from flowstone_dagster_tests.support.smtp_tls import (
    password_authenticator,
    serve_smtp,
    server_tls_context,
)

pytestmark = pytest.mark.smtp

SENDER = "Flowstone Alerts <alerts@flowstone.example>"
PASSWORD = "smtp-pa55-s3cr3t"
# aiosmtpd itself sets a deprecated attribute after a successful AUTH (not our code).
AIOSMTPD_AUTH_WARNING = "ignore:Session.login_data is deprecated:DeprecationWarning"


def channel(port: int, **settings: Any) -> EmailChannel:
    recipients = settings.pop("recipients", ["oncall@example.com"])
    settings.setdefault("security", "none")
    settings.setdefault("timeout", 5)
    return EmailChannel(
        SmtpSettings(host="127.0.0.1", port=port, **settings),
        sender=SENDER,
        recipients=recipients,
    )


@pytest.fixture
def starttls_server(tls_ca: trustme.CA) -> Iterator[SmtpSink]:
    with serve_smtp(require_starttls=True, tls_context=server_tls_context(tls_ca)) as sink:
        yield sink


@pytest.fixture
def auth_server(tls_ca: trustme.CA) -> Iterator[SmtpSink]:
    with serve_smtp(
        require_starttls=True,
        tls_context=server_tls_context(tls_ca),
        auth_required=True,
        auth_require_tls=True,
        authenticator=password_authenticator("alerts", PASSWORD),
    ) as sink:
        yield sink


# -- an email is sent --------------------------------------------------------------------------


def test_sends_email_notification(smtp_server: SmtpSink) -> None:
    notifications = NotificationsResource(
        email=EmailConfig(
            host=smtp_server.host,
            port=smtp_server.port,
            security="none",
            sender=SENDER,
            timeout=5,
        )
    )
    payload = {"recipients": ["test@example.com"], "message": "Test notification"}
    assert notifications.notify("test_event", payload, channels=["email"]).delivered == ("email",)
    [mail] = smtp_server.wait_for(1)
    assert mail.message["Subject"] == "Test Event"
    assert mail.rcpt_tos == ["test@example.com"]
    assert "Test notification" in mail.message.get_body(("plain",)).get_content()


def test_message_headers_and_both_parts(smtp_server: SmtpSink) -> None:
    recipients = ["oncall@example.com", "Data Team <data@example.com>", "ops@example.org"]
    sent = channel(smtp_server.port, recipients=recipients).deliver(
        "materialization_failed",
        {"asset": "données_été", "partition": "2025-01-15", "error": "ValueError: <b>bad</b>"},
    )
    [mail] = smtp_server.wait_for(1)
    message = mail.message
    assert mail.mail_from == "alerts@flowstone.example"
    assert mail.rcpt_tos == ["oncall@example.com", "data@example.com", "ops@example.org"]
    assert message["From"] == SENDER
    assert [str(a) for a in message["To"].addresses] == recipients
    assert message["Subject"] == "Materialization Failed: données_été (partition 2025-01-15)"
    assert message["Date"].datetime is not None
    assert message["Message-ID"].startswith("<")
    assert "@flowstone.example>" in message["Message-ID"]
    assert message["Auto-Submitted"] == "auto-generated"
    assert message.get_content_type() == "multipart/alternative"
    plain, html = message.iter_parts()
    assert plain.get_content_type() == "text/plain"
    assert html.get_content_type() == "text/html"
    assert "ValueError: <b>bad</b>" in plain.get_content()
    assert "ValueError: &lt;b&gt;bad&lt;/b&gt;" in html.get_content()  # escaped in HTML
    assert sent > 0


def test_non_ascii_subject_is_encoded_on_the_wire() -> None:
    message = build_email_message(
        format_email_body("materialization_failed", {"asset": "données_été"}),
        sender=SENDER,
        recipients=["a@example.com"],
    )
    raw = message.as_bytes(policy=email.policy.SMTP)
    raw.decode("ascii")  # nothing but ASCII travels
    subject_line = next(line for line in raw.split(b"\r\n") if line.startswith(b"Subject:"))
    assert b"=?utf-8?" in subject_line
    parsed = email.message_from_bytes(raw, policy=email.policy.default)
    assert parsed["Subject"] == "Materialization Failed: données_été"


# -- transport security and AUTH ---------------------------------------------------------------


def test_starttls_required_by_the_server(starttls_server: SmtpSink, ca_bundle: str) -> None:
    channel(starttls_server.port, security="starttls", ca_bundle=ca_bundle).deliver(
        "run_failed", {"job": "daily"}
    )
    [mail] = starttls_server.wait_for(1)
    assert mail.message["Subject"] == "Run Failed: daily"


def test_plain_client_against_starttls_required_server_fails_permanently(
    starttls_server: SmtpSink,
) -> None:
    with pytest.raises(SmtpRejected) as raised:
        channel(starttls_server.port, security="none").deliver("run_failed", {"job": "daily"})
    assert raised.value.code == 530  # "Must issue a STARTTLS command first"
    assert not is_retryable(raised.value)
    assert starttls_server.messages == []


def test_starttls_is_required_when_configured(smtp_server: SmtpSink, ca_bundle: str) -> None:
    """A server that does not offer STARTTLS gets nothing: no silent plain-text fallback."""
    with pytest.raises(ExternalServiceError, match="STARTTLS"):
        channel(smtp_server.port, security="starttls", ca_bundle=ca_bundle).deliver(
            "run_failed", {"job": "daily"}
        )
    assert smtp_server.messages == []


def test_untrusted_certificate_is_a_tls_error(starttls_server: SmtpSink) -> None:
    with pytest.raises(TransportError) as raised:
        channel(starttls_server.port, security="starttls").deliver("run_failed", {"job": "d"})
    assert raised.value.tls
    assert not is_retryable(raised.value)


@pytest.mark.filterwarnings(AIOSMTPD_AUTH_WARNING)
def test_auth_required(auth_server: SmtpSink, ca_bundle: str) -> None:
    notifications = NotificationsResource(
        email=EmailConfig(
            host="127.0.0.1",
            port=auth_server.port,
            security="starttls",
            username="alerts",
            password=PASSWORD,
            sender=SENDER,
            recipients=["oncall@example.com", "data@example.com"],
            ca_bundle=ca_bundle,
            timeout=5,
        )
    )
    notifications.notify("run_failed", {"job": "daily"})
    [mail] = auth_server.wait_for(1)
    assert mail.rcpt_tos == ["oncall@example.com", "data@example.com"]


def test_auth_required_without_credentials_is_refused(
    auth_server: SmtpSink, ca_bundle: str
) -> None:
    with pytest.raises(SmtpRejected) as raised:
        channel(auth_server.port, security="starttls", ca_bundle=ca_bundle).deliver(
            "run_failed", {"job": "daily"}
        )
    assert raised.value.code == 530  # authentication required
    assert auth_server.messages == []


def test_wrong_password_is_permanent_and_not_shown(auth_server: SmtpSink, ca_bundle: str) -> None:
    wrong = "wr0ng-pa55w0rd"
    with pytest.raises(SmtpRejected) as raised:
        channel(
            auth_server.port,
            security="starttls",
            ca_bundle=ca_bundle,
            username="alerts",
            password=wrong,
        ).deliver("run_failed", {"job": "daily"})
    assert raised.value.code == 535
    assert not is_retryable(raised.value)
    assert "email.password" in str(raised.value)
    assert wrong not in str(raised.value)


def test_password_over_plain_text_is_refused_at_set_up() -> None:
    with pytest.raises(ConfigurationError) as raised:
        channel(25, security="none", username="alerts", password=PASSWORD)
    assert raised.value.field == "email.security"
    assert PASSWORD not in repr(SmtpSettings(host="h", username="u", password=PASSWORD))


def test_implicit_tls(tls_ca: trustme.CA, ca_bundle: str) -> None:
    with serve_smtp(implicit_tls=server_tls_context(tls_ca)) as sink:
        channel(sink.port, security="ssl", ca_bundle=ca_bundle).deliver(
            "run_failed", {"job": "daily"}
        )
        [mail] = sink.wait_for(1)
    assert mail.message["Subject"] == "Run Failed: daily"


# -- header injection --------------------------------------------------------------------------


def test_line_breaks_from_an_error_never_make_a_header(smtp_server: SmtpSink) -> None:
    hostile = "orders\r\nBcc: victim@example.com\r\nX-Injected: yes"
    channel(smtp_server.port).deliver(
        "materialization_failed", {"asset": hostile, "error": "boom\r\nBcc: also@example.com"}
    )
    [mail] = smtp_server.wait_for(1)
    assert mail.rcpt_tos == ["oncall@example.com"]
    assert mail.message["Bcc"] is None
    assert mail.message["X-Injected"] is None
    # One Subject header (folded onto a continuation line is fine) holding the whole value.
    assert mail.message.get_all("Subject") == [mail.message["Subject"]]
    assert mail.message["Subject"].strip() == (
        "Materialization Failed: orders Bcc: victim@example.com X-Injected: yes"
    )


@pytest.mark.parametrize(
    "recipient",
    [
        "victim@example.com\r\nBcc: evil@example.com",
        "victim@example.com\nBcc: evil@example.com",
        "victim@example.com\rX: y",
        "a@example.com, b@example.com",
        "not-an-address",
    ],
)
def test_bad_recipients_are_refused_and_nothing_is_sent(
    smtp_server: SmtpSink, recipient: str
) -> None:
    notifications = NotificationsResource(
        email=EmailConfig(
            host="127.0.0.1", port=smtp_server.port, security="none", sender=SENDER, timeout=5
        )
    )
    with pytest.raises(AllChannelsFailed) as raised:
        notifications.notify("run_failed", {"job": "d", "recipients": [recipient]})
    [(_, error)] = raised.value.failures
    assert isinstance(error, ConfigurationError)
    assert error.field == "payload.recipients"
    assert smtp_server.messages == []


@pytest.mark.parametrize(
    "sender", ["alerts@example.com\r\nBcc: evil@example.com", "alerts@example.com\nX: y"]
)
def test_bad_sender_is_refused_at_set_up(sender: str) -> None:
    with pytest.raises(ConfigurationError) as raised:
        NotificationsResource(
            email=EmailConfig(host="smtp.example.com", sender=sender)
        ).configured_channels()
    assert raised.value.field == "email.sender"
    assert "header" in str(raised.value)


# -- SMTP replies: 4xx transient, 5xx permanent; timeouts ------------------------------------


class RefusingSink(SmtpSink):
    """Refuses recipients with the given replies, in turn, then accepts."""

    def __init__(self, replies: list[str]) -> None:
        super().__init__("127.0.0.1", free_port())
        self.replies = list(replies)

    async def handle_RCPT(
        self, server: Any, session: Any, envelope: Any, address: str, options: Any
    ) -> str:
        if self.replies:
            return self.replies.pop(0)
        envelope.rcpt_tos.append(address)
        return "250 OK"


def test_4xx_is_retryable_and_retried_through_resilience() -> None:
    with serve_smtp(RefusingSink(["451 4.3.0 Try again later"])) as sink:
        with pytest.raises(SmtpRejected) as raised:
            channel(sink.port).deliver("run_failed", {"job": "d"})
        assert raised.value.code == 451
        assert is_retryable(raised.value)

        sink.replies = ["451 4.3.0 Try again later"]
        NotificationsResource(
            email=EmailConfig(
                host="127.0.0.1",
                port=sink.port,
                security="none",
                sender=SENDER,
                recipients=["oncall@example.com"],
            ),
            resilience=ResilienceResource(
                store_url="memory://email-tests",
                default_policy=ServicePolicy(
                    retry=RetryConfig(max_attempts=3, base_delay=0.01, jitter=0),
                    circuit_breaker=None,
                ),
            ),
        ).notify("run_failed", {"job": "d"})
        [mail] = sink.wait_for(1)
    assert mail.rcpt_tos == ["oncall@example.com"]


def test_5xx_is_permanent() -> None:
    with serve_smtp(RefusingSink(["550 5.1.1 No such user"])) as sink:
        with pytest.raises(SmtpRejected) as raised:
            channel(sink.port).deliver("run_failed", {"job": "d"})
    assert raised.value.code == 550
    assert "No such user" in str(raised.value)
    assert not is_retryable(raised.value)


def test_some_recipients_refused_is_not_retried() -> None:
    """The others received it: a retry would send it to them twice."""
    with serve_smtp(RefusingSink(["451 4.3.0 Try again later"])) as sink:
        with pytest.raises(SmtpRejected) as raised:
            channel(sink.port, recipients=["a@example.com", "b@example.com"]).deliver(
                "run_failed", {"job": "d"}
            )
        [mail] = sink.wait_for(1)
    assert mail.rcpt_tos == ["b@example.com"]
    assert raised.value.refused == {"a@example.com": (451, "4.3.0 Try again later")}
    assert not is_retryable(raised.value)


def test_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (backlog) but never greets
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        with pytest.raises(CallTimeout) as raised:
            channel(port, timeout=0.5).deliver("run_failed", {"job": "d"})
    assert is_retryable(raised.value)


def test_refused_connection_is_a_transport_error() -> None:
    with pytest.raises(TransportError) as raised:
        channel(free_port()).deliver("run_failed", {"job": "d"})
    assert is_retryable(raised.value)
    assert not isinstance(raised.value, ssl.SSLError)


def test_the_default_email_service_names_the_server() -> None:
    from flowstone_dagster import EmailConfig, NotificationsResource

    def service_of(host: str, port: int) -> str:
        resource = NotificationsResource(
            email=EmailConfig(
                host=host,
                port=port,
                security="none",
                sender="a@example.com",
                recipients=["b@example.com"],
            )
        )
        [channel] = [
            c for c in resource.build_notifier().channels.values() if hasattr(c, "settings")
        ]
        return channel.service

    # Two servers never share a breaker unless the user names the same service.
    assert service_of("mail-a.internal", 25) == "smtp:mail-a.internal:25"
    assert service_of("mail-b.internal", 2525) == "smtp:mail-b.internal:2525"
