"""Notifications: formatting, Slack (webhook and Web API) against a Slack-shaped server on
loopback, the partial-failure idiom, telemetry, and the resource inside Dagster."""

import json
import logging
import time
from typing import Any

import dagster as dg
import pydantic
import pytest
from dagster_slack import SlackResource
from pytest_httpserver import HTTPServer
from slack_sdk.models.blocks import Block
from werkzeug import Request, Response

from flowstone_dagster import telemetry
from flowstone_dagster.errors import (
    ConfigurationError,
    HTTPError,
    MaxAttemptsExceeded,
    NotFound,
    PartialFailure,
    RateLimited,
    TransportError,
    is_retryable,
)
from flowstone_dagster.notifications import (
    AllChannelsFailed,
    EmailConfig,
    NotificationsResource,
    Notifier,
    SlackApiChannel,
    SlackApiRejected,
    SlackWebhookChannel,
    SlackWebhookConfig,
    escape_mrkdwn,
    format_email_body,
    format_slack_message,
)
from flowstone_dagster.notifications.formatting import SLACK_LIMITS
from flowstone_dagster.notifications.notifier import NOTIFY_POLICY
from flowstone_dagster.resilience import ONCE, ResilienceResource, RetryConfig, ServicePolicy
from flowstone_dagster_tests.support.net import free_port
from flowstone_dagster_tests.support.smtp import SmtpSink

WEBHOOK_SECRET = "T0001/B0002/s3cr3tW3bh00kT0k3n"
BOT_TOKEN = "xoxb-1111-2222-s3cr3tB0tT0k3n"


def webhook_path() -> str:
    return f"/services/{WEBHOOK_SECRET}"


def parsed_blocks(message: dict[str, Any]) -> list[Block]:
    """Parse with slack_sdk's Block Kit models; to_dict() re-runs their limit validators."""
    blocks = [Block.parse(raw) for raw in message["blocks"]]
    assert all(block is not None for block in blocks)
    assert [block.to_dict() for block in blocks if block is not None] == message["blocks"]
    return [block for block in blocks if block is not None]


def posted(server: HTTPServer, index: int = -1) -> dict[str, Any]:
    request, _ = server.log[index]
    return json.loads(request.get_data())


#: The default notifications policy with short waits, for tests of failures that are retried.
FAST_POLICY = ServicePolicy(
    retry=RetryConfig(max_attempts=2, base_delay=0.01, max_delay=5.0, jitter=0),
    circuit_breaker=None,
)


def fast_resilience(**policy: Any) -> ResilienceResource:
    return ResilienceResource(
        store_url="memory://notifications-tests",
        default_policy=ServicePolicy(
            retry=RetryConfig(max_attempts=3, base_delay=0.01, max_delay=5.0, jitter=0),
            circuit_breaker=None,
            **policy,
        ),
    )


# -- message layouts -------------------------------------------------------------------------


def test_formats_checkpoint_pending_message() -> None:
    message = format_slack_message(
        "checkpoint_pending",
        {"message": "Review needed", "url": "http://example.com/checkpoint/123"},
    )
    assert message["blocks"] is not None
    assert len(message["blocks"]) == 2  # text + actions
    section, actions = parsed_blocks(message)
    assert section.type == "section"
    assert "Review needed" in message["blocks"][0]["text"]["text"]
    assert actions.type == "actions"
    button = message["blocks"][1]["elements"][0]
    assert button["type"] == "button"
    assert button["url"] == "http://example.com/checkpoint/123"
    assert message["text"]  # the notification fallback is always there


def test_formats_materialization_failed_message() -> None:
    message = format_slack_message(
        "materialization_failed",
        {"asset": "test_asset", "partition": "p1", "error": "Something went wrong"},
    )
    text_block = message["blocks"][0]
    assert "Materialization Failed" in text_block["text"]["text"]
    assert "test_asset" in text_block["text"]["text"]
    assert "p1" in text_block["text"]["text"]
    assert "Something went wrong" in json.dumps(message["blocks"])
    assert "Materialization Failed: test_asset" in message["text"]
    parsed_blocks(message)


@pytest.mark.parametrize(
    ("event", "payload", "title"),
    [
        ("materialization_succeeded", {"asset": "orders", "metadata": {"rows": 12}}, "Succeeded"),
        ("run_failed", {"job": "daily", "run_id": "r1", "error": "boom"}, "Run Failed"),
        ("asset_check_failed", {"asset": "orders", "check": "not_empty"}, "Asset Check Failed"),
        ("cache_warmed", {"message": "done", "entries": 3}, "Cache Warmed"),
    ],
)
def test_every_layout_is_valid_block_kit(event: str, payload: dict, title: str) -> None:
    message = format_slack_message(event, payload)
    parsed_blocks(message)
    assert title in message["blocks"][0]["text"]["text"]
    body = format_email_body(event, payload)
    assert title in body.subject
    assert "\n" not in body.subject


def test_missing_required_payload_key_names_it() -> None:
    with pytest.raises(ConfigurationError) as raised:
        format_slack_message("materialization_failed", {"partition": "p1"})
    assert raised.value.field == "payload.asset"
    with pytest.raises(ConfigurationError) as raised:
        format_slack_message("checkpoint_pending", {"message": "x", "url": "javascript:alert(1)"})
    assert raised.value.field == "payload.url"
    with pytest.raises(ConfigurationError):
        format_slack_message("bad event\nname", {})


# -- escaping and limits -----------------------------------------------------------------------


def test_payload_text_cannot_ping_or_forge_links() -> None:
    hostile = "<!channel> see <https://evil.example|your bank> & <@U123>"
    message = format_slack_message(
        "materialization_failed", {"asset": "a<!here>", "error": hostile, "message": hostile}
    )
    rendered = json.dumps(message)
    for raw in ("<!channel>", "<!here>", "<https://evil", "<@U123>"):
        assert raw not in rendered
    assert "&lt;!channel&gt;" in message["blocks"][0]["text"]["text"]
    assert "&amp;" in message["text"]
    assert escape_mrkdwn("a<b>&c") == "a&lt;b&gt;&amp;c"


def test_huge_payloads_are_cut_to_slack_limits() -> None:
    error = "<&>" * 5000 + "\n```breakout```"
    payload = {f"key_{i}": "v" * 3000 for i in range(30)}
    payload.update(message="m" * 10_000, error=error, note="n" * 5000, url="https://x.example/")
    message = format_slack_message("something_happened", payload)
    parsed_blocks(message)  # slack_sdk's validators accept it
    assert len(message["text"]) <= SLACK_LIMITS.text
    assert len(message["blocks"]) <= SLACK_LIMITS.blocks_per_message
    for block in message["blocks"]:
        if block["type"] == "section":
            assert len(block["text"]["text"]) <= SLACK_LIMITS.section_text
            assert len(block.get("fields", [])) <= SLACK_LIMITS.fields_per_section
            assert all(len(f["text"]) <= SLACK_LIMITS.field_text for f in block.get("fields", []))
        if block["type"] == "context":
            assert len(block["elements"][0]["text"]) <= SLACK_LIMITS.context_text
    detail = message["blocks"][1]["text"]["text"]
    assert detail.startswith("```")
    assert detail.endswith("```")
    assert "&l..." not in detail
    assert not detail[:-3].endswith("&")
    assert "more" in message["blocks"][0]["fields"][-1]["text"]  # 30 keys folded into 10 fields


# -- Slack incoming webhooks -------------------------------------------------------------------


def test_sends_slack_notification(httpserver: HTTPServer) -> None:
    """notify("checkpoint_pending", ..., channels=["slack"]) posts Block Kit blocks."""
    httpserver.expect_oneshot_request(webhook_path(), method="POST").respond_with_data("ok")
    notifications = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
    )
    result = notifications.notify(
        "checkpoint_pending",
        {"message": "Approval needed", "url": "http://example.com/checkpoint/123"},
        channels=["slack"],
    )
    assert result.delivered == ("slack",)
    httpserver.check_assertions()
    request, _ = httpserver.log[0]
    assert request.headers["Content-Type"].startswith("application/json")
    body = posted(httpserver)
    assert body["blocks"] is not None
    assert len(parsed_blocks(body)) == 2
    assert "Approval needed" in body["text"]


def test_webhook_errors_never_show_the_url(httpserver: HTTPServer) -> None:
    httpserver.expect_request(webhook_path()).respond_with_data("no_service", status=404)
    channel = SlackWebhookChannel(httpserver.url_for(webhook_path()))
    with pytest.raises(NotFound) as raised:
        channel.deliver("run_failed", {"job": "daily"})
    assert WEBHOOK_SECRET not in str(raised.value)
    assert "no_service" in str(raised.value)
    assert WEBHOOK_SECRET not in repr(channel)
    assert not is_retryable(raised.value)


def test_webhook_rate_limit_honours_retry_after(
    httpserver: HTTPServer, events: list[telemetry.TelemetryEvent]
) -> None:
    httpserver.expect_ordered_request(webhook_path()).respond_with_data(
        "rate_limited", status=429, headers={"Retry-After": "1"}
    )
    httpserver.expect_ordered_request(webhook_path()).respond_with_data("ok")
    notifier = Notifier(
        [SlackWebhookChannel(httpserver.url_for(webhook_path()))], resilience=fast_resilience()
    )
    started = time.monotonic()
    notifier.notify("run_failed", {"job": "daily"})
    assert time.monotonic() - started >= 0.9  # waited what Slack asked, not base_delay
    assert len(httpserver.log) == 2
    send = [e for e in events if e.name == "flowstone.notify.send"]
    assert [(e.outcome, e.attempts, e.measures["channel"]) for e in send] == [("ok", 2, "slack")]


# -- Slack Web API (chat.postMessage through dagster-slack's SlackResource) --------------------


def api_resource(server: HTTPServer, **kwargs: Any) -> NotificationsResource:
    return NotificationsResource(
        slack=SlackResource(token=BOT_TOKEN),
        slack_channel="C0123456789",
        slack_api_url=server.url_for("/api/"),
        **kwargs,
    )


def test_web_api_posts_chat_post_message(httpserver: HTTPServer) -> None:
    httpserver.expect_oneshot_request("/api/chat.postMessage", method="POST").respond_with_json(
        {"ok": True, "channel": "C0123456789", "ts": "1715000000.000100"}
    )
    result = api_resource(httpserver).notify(
        "materialization_failed", {"asset": "orders", "partition": "p1", "error": "boom"}
    )
    assert result.delivered == ("slack",)
    httpserver.check_assertions()
    request, _ = httpserver.log[0]
    # Field by field, as the Web API documents chat.postMessage: bearer token, JSON body.
    assert request.headers["Authorization"] == f"Bearer {BOT_TOKEN}"
    assert request.headers["Content-Type"].startswith("application/json")
    body = json.loads(request.get_data())
    assert body["channel"] == "C0123456789"
    assert body["text"].startswith("Materialization Failed: orders")
    assert "Materialization Failed" in parsed_blocks(body)[0].to_dict()["text"]["text"]


def test_web_api_ok_false_is_a_failure(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/api/chat.postMessage").respond_with_json(
        {"ok": False, "error": "channel_not_found"}
    )
    with pytest.raises(AllChannelsFailed) as raised:
        api_resource(httpserver).notify("run_failed", {"job": "daily"})
    [(channel, error)] = raised.value.failures
    assert channel == "slack"
    assert isinstance(error, SlackApiRejected)
    assert error.code == "channel_not_found"
    assert not is_retryable(error)
    assert BOT_TOKEN not in str(raised.value)
    assert len(httpserver.log) == 1


def test_web_api_transient_error_code_is_retried(httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request("/api/chat.postMessage").respond_with_json(
        {"ok": False, "error": "service_unavailable"}
    )
    httpserver.expect_ordered_request("/api/chat.postMessage").respond_with_json(
        {"ok": True, "ts": "1.2"}
    )
    api_resource(httpserver, resilience=fast_resilience()).notify("run_failed", {"job": "d"})
    assert len(httpserver.log) == 2


def test_web_api_429_retry_after_through_resilience(httpserver: HTTPServer) -> None:
    httpserver.expect_ordered_request("/api/chat.postMessage").respond_with_json(
        {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "1"}
    )
    httpserver.expect_ordered_request("/api/chat.postMessage").respond_with_json(
        {"ok": True, "ts": "1.2"}
    )
    started = time.monotonic()
    api_resource(httpserver, resilience=fast_resilience()).notify("run_failed", {"job": "d"})
    assert time.monotonic() - started >= 0.9
    assert len(httpserver.log) == 2


def test_web_api_429_without_resilience_is_rate_limited(httpserver: HTTPServer) -> None:
    httpserver.expect_request("/api/chat.postMessage").respond_with_json(
        {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": "7"}
    )
    channel = SlackApiChannel(
        SlackResource(token=BOT_TOKEN).get_client(),
        "C1",
        base_url=httpserver.url_for("/api/"),
    )
    with pytest.raises(RateLimited) as raised:
        channel.deliver("run_failed", {"job": "d"})
    assert raised.value.retry_after == 7
    assert len(httpserver.log) == 1  # slack_sdk's own retry handlers are off


def test_web_api_unreachable_is_a_transport_error() -> None:
    channel = SlackApiChannel(
        SlackResource(token=BOT_TOKEN).get_client(),
        "C1",
        base_url=f"http://127.0.0.1:{free_port()}/api/",
        timeout=2,
    )
    with pytest.raises(TransportError) as raised:
        channel.deliver("run_failed", {"job": "d"})
    assert is_retryable(raised.value)
    assert BOT_TOKEN not in str(raised.value)


# -- partial failure: the one idiom ------------------------------------------------------------


def slack_and_email(
    server: HTTPServer, smtp_port: int, policy: ServicePolicy = ONCE
) -> NotificationsResource:
    return NotificationsResource(
        policy=policy,
        slack_webhook=SlackWebhookConfig(url=server.url_for(webhook_path())),
        email=EmailConfig(
            host="127.0.0.1",
            port=smtp_port,
            security="none",
            sender="flowstone@example.com",
            recipients=["oncall@example.com"],
            timeout=5,
        ),
    )


@pytest.mark.smtp
def test_handles_partial_failures(
    httpserver: HTTPServer, smtp_server: SmtpSink, events: list[telemetry.TelemetryEvent]
) -> None:
    """Slack fails, email succeeds: a partial failure with one error."""
    httpserver.expect_oneshot_request(webhook_path(), method="POST").respond_with_data(
        "error", status=500
    )
    notifications = slack_and_email(httpserver, smtp_server.port)
    with pytest.raises(PartialFailure) as raised:
        notifications.notify("test_event", {}, channels=["slack", "email"])
    error = raised.value
    assert not isinstance(error, AllChannelsFailed)
    assert len(error.failures) == 1
    [(channel, cause)] = error.failures
    assert channel == "slack"
    assert isinstance(cause, HTTPError)
    assert cause.status == 500
    assert error.succeeded == ["email"]
    assert isinstance(error.__cause__, ExceptionGroup)
    assert WEBHOOK_SECRET not in str(error)
    [mail] = smtp_server.wait_for(1)
    assert mail.message["Subject"] == "Test Event"
    summary = [e for e in events if e.name == "flowstone.notify"][-1]
    assert summary.outcome == "error"
    assert summary.measures == {"event": "test_event", "channels": 2, "delivered": 1, "failed": 1}


def test_all_channels_failing_raises_with_every_cause(httpserver: HTTPServer) -> None:
    httpserver.expect_request(webhook_path()).respond_with_data("error", status=503)
    # nothing listens on the email port; both channels are retried once, then given up
    notifications = slack_and_email(httpserver, free_port(), policy=FAST_POLICY)
    with pytest.raises(AllChannelsFailed) as raised:
        notifications.notify("run_failed", {"job": "daily"})
    error = raised.value
    assert isinstance(error, PartialFailure)
    assert error.succeeded == []
    assert [channel for channel, _ in error.failures] == ["slack", "email"]
    slack_error, email_error = (failure for _, failure in error.failures)
    assert isinstance(slack_error, MaxAttemptsExceeded)  # 503 twice: retried, then given up
    assert isinstance(slack_error.last_error, HTTPError)
    assert isinstance(email_error, MaxAttemptsExceeded)
    assert isinstance(email_error.last_error, TransportError)
    assert str(error).startswith("[notify] all failed")
    assert {type(e) for e in error.__cause__.exceptions} == {MaxAttemptsExceeded}
    assert len(httpserver.log) == 2


def test_bad_calls_send_nothing(httpserver: HTTPServer) -> None:
    notifications = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
    )
    with pytest.raises(ConfigurationError, match="'email' not configured"):
        notifications.notify("run_failed", {"job": "d"}, channels=["slack", "email"])
    with pytest.raises(ConfigurationError) as raised:
        notifications.notify("run_failed", {})
    assert raised.value.field == "payload.job"
    assert httpserver.log == []
    with pytest.raises(ConfigurationError, match="no notification channel"):
        NotificationsResource().notify("run_failed", {"job": "d"})


def test_configuration_errors_name_the_field() -> None:
    with pytest.raises(ConfigurationError) as raised:
        NotificationsResource(
            slack_webhook=SlackWebhookConfig(url="https://hooks.example/x"),
            slack=SlackResource(token=BOT_TOKEN),
        ).configured_channels()
    assert raised.value.field == "slack_webhook"
    with pytest.raises(ConfigurationError) as raised:
        NotificationsResource(slack=SlackResource(token=BOT_TOKEN)).configured_channels()
    assert raised.value.field == "slack_channel"
    with pytest.raises(ConfigurationError) as raised:
        NotificationsResource(
            email=EmailConfig(host="smtp.example.com", sender="a@example.com"),
            default_channels=["sms"],
        ).configured_channels()
    assert raised.value.field == "default_channels"


def test_secrets_stay_out_of_repr() -> None:
    resource = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=f"https://hooks.slack.com/services/{WEBHOOK_SECRET}"),
        slack_channel="C1",
        email=EmailConfig(
            host="smtp.example.com", username="u", password="pw-s3cr3t", sender="a@example.com"
        ),
    )
    assert WEBHOOK_SECRET not in repr(resource)
    assert "pw-s3cr3t" not in repr(resource)
    api = NotificationsResource(slack=SlackResource(token=BOT_TOKEN), slack_channel="C1")
    assert BOT_TOKEN not in repr(api)
    assert BOT_TOKEN not in repr(api.notifier.channels["slack"])


# -- telemetry ---------------------------------------------------------------------------------


def test_telemetry_one_event_per_delivery_and_per_call(
    httpserver: HTTPServer, events: list[telemetry.TelemetryEvent]
) -> None:
    httpserver.expect_request(webhook_path()).respond_with_data("ok")
    NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
    ).notify("run_failed", {"job": "daily", "error": "secret payload text"})
    assert [e.name for e in events] == [
        "flowstone.resilience.call",  # the one resilience path, with or without a resource
        "flowstone.notify.send",
        "flowstone.notify",
    ]
    resilience_call, send, call = events
    assert resilience_call.measures["service"] == "slack"
    assert resilience_call.attempts == 1
    assert send.outcome == "ok"
    assert send.attempts == 1
    assert send.measures["channel"] == "slack"
    assert send.measures["event"] == "run_failed"
    assert send.measures["bytes"] == len(httpserver.log[0][0].get_data())
    assert call.measures == {"event": "run_failed", "channels": 1, "delivered": 1, "failed": 0}
    rendered = repr(events)
    assert WEBHOOK_SECRET not in rendered
    assert "secret payload text" not in rendered  # sizes only, never payload text


# -- inside Dagster: the checkpoint_pending pattern --------------------------------------------


@pytest.mark.dagster
def test_asset_requests_approval_through_the_resource(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    httpserver.expect_request(webhook_path(), method="POST").respond_with_data("ok")

    @dg.asset
    def candidate_model(
        context: dg.AssetExecutionContext, notifications: NotificationsResource
    ) -> dict:
        with telemetry.observe(context):
            notifications.notify(
                "checkpoint_pending",
                {
                    "asset": "candidate_model",
                    "checkpoint": "promote to production",
                    "message": "Accuracy 0.91 (was 0.93). Promote?",
                    "url": "http://dagster.local/assets/published_model",
                    "button_text": "Review and promote",
                },
            )
        return {"accuracy": 0.91}

    result = dg.materialize(
        [candidate_model],
        instance=dagster_instance,
        resources={
            "notifications": NotificationsResource(
                slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
            )
        },
    )
    assert result.success
    body = posted(httpserver)
    section, actions = parsed_blocks(body)
    assert "Promote?" in section.to_dict()["text"]["text"]
    assert actions.to_dict()["elements"][0]["url"] == "http://dagster.local/assets/published_model"
    metadata = result.asset_materializations_for_node("candidate_model")[0].metadata
    assert metadata["flowstone/notify.send/calls"].value == 1
    assert metadata["flowstone/notify/errors"].value == 0


@pytest.mark.dagster
def test_resource_set_up_fails_on_a_bad_field(dagster_instance: dg.DagsterInstance) -> None:
    @dg.asset
    def anything(notifications: NotificationsResource) -> int:
        return 1

    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        dg.materialize(
            [anything],
            instance=dagster_instance,
            resources={
                "notifications": NotificationsResource(
                    email=EmailConfig(host="smtp.example.com", sender="not an address")
                )
            },
        )
    cause = raised.value.__cause__
    assert isinstance(cause, ConfigurationError)
    assert cause.field == "email.sender"


def test_server_sees_valid_json_even_for_unicode(httpserver: HTTPServer) -> None:
    def handler(request: Request) -> Response:
        body = json.loads(request.get_data().decode("utf-8"))
        parsed_blocks(body)
        return Response("ok")

    httpserver.expect_request(webhook_path()).respond_with_handler(handler)
    SlackWebhookChannel(httpserver.url_for(webhook_path())).deliver(
        "materialization_failed", {"asset": "données_été", "error": "échec 💥"}
    )
    assert "données_été" in posted(httpserver)["text"]


def test_the_log_channel_writes_to_the_step_log(dagster_instance: dg.DagsterInstance) -> None:
    notifications = NotificationsResource(log=True)
    assert notifications.configured_channels() == ["log"]

    @dg.asset
    def approved(notifications: NotificationsResource) -> int:
        result = notifications.notify(
            "materialization_failed",
            {"asset": "orders", "partition": "2025-01-15", "error": "disk full"},
        )
        assert result.delivered == ("log",)
        return 1

    result = dg.materialize(
        [approved], resources={"notifications": notifications}, instance=dagster_instance
    )
    assert result.success
    logged = [
        (entry.level, entry.user_message)
        for entry in dagster_instance.all_logs(result.run_id)
        if "Materialization Failed" in entry.user_message
    ]
    assert len(logged) == 1
    level, message = logged[0]
    assert level == logging.WARNING
    assert "orders" in message
    assert "2025-01-15" in message
    assert "disk full" in message


# -- issue 13: the safe default policy, and secrets echoed by Slack ------------------------------


def test_default_policy_retries_429_and_5xx_within_a_deadline() -> None:
    assert NOTIFY_POLICY.circuit_breaker is None
    assert NOTIFY_POLICY.rate_limit is None
    retry = NOTIFY_POLICY.retry
    assert retry.max_attempts == 4
    assert retry.max_delay == 10.0
    assert retry.deadline == 30.0
    resource = NotificationsResource(slack_webhook=SlackWebhookConfig(url="https://h.example/x"))
    assert resource.notifier.policy == NOTIFY_POLICY
    once = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url="https://h.example/x"), policy=ONCE
    )
    assert once.notifier.policy == ONCE


@pytest.mark.dagster
def test_webhook_429_without_resilience_is_retried_and_the_asset_succeeds(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    """Slack allows about one webhook message per second: one 429 must not fail an asset."""
    httpserver.expect_ordered_request(webhook_path(), method="POST").respond_with_data(
        "rate_limited", status=429, headers={"Retry-After": "1"}
    )
    httpserver.expect_ordered_request(webhook_path(), method="POST").respond_with_data("ok")

    @dg.asset
    def scores(context: dg.AssetExecutionContext, notifications: NotificationsResource) -> int:
        with telemetry.observe(context):
            notifications.notify("materialization_succeeded", {"asset": "scores"})
        return 1

    started = time.monotonic()
    result = dg.materialize(
        [scores],
        instance=dagster_instance,
        resources={
            "notifications": NotificationsResource(
                slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
            )
        },
    )
    assert result.success
    assert time.monotonic() - started >= 0.9  # waited what Slack asked
    assert len(httpserver.log) == 2
    httpserver.check_assertions()
    assert "Materialization Succeeded" in posted(httpserver)["text"]


def test_notifier_without_resilience_stops_at_a_long_retry_after(httpserver: HTTPServer) -> None:
    httpserver.expect_request(webhook_path()).respond_with_data(
        "rate_limited", status=429, headers={"Retry-After": "60"}
    )
    notifier = Notifier([SlackWebhookChannel(httpserver.url_for(webhook_path()))])
    started = time.monotonic()
    with pytest.raises(AllChannelsFailed) as raised:
        notifier.notify("run_failed", {"job": "d"})
    assert time.monotonic() - started < 5  # a wait past max_delay ends the retries at once
    [(_, error)] = raised.value.failures
    assert isinstance(error, MaxAttemptsExceeded)
    assert isinstance(error.last_error, RateLimited)
    assert len(httpserver.log) == 1


#: What a Slack-shaped server may echo of the webhook path in a 404 body.
SECRET_PARTS = (WEBHOOK_SECRET, "B0002/s3cr3tW3bh00kT0k3n", "s3cr3tW3bh00kT0k3n")


def echoing_404(server: HTTPServer) -> None:
    body = (
        f"no_service: POST {webhook_path()}; unknown hook services/{WEBHOOK_SECRET}; "
        f"team T0001 hook B0002/s3cr3tW3bh00kT0k3n; token s3cr3tW3bh00kT0k3n"
    )
    server.expect_request(webhook_path()).respond_with_data(body, status=404)


def assert_no_secret(text: str) -> None:
    for part in SECRET_PARTS:
        assert part not in text


def test_404_echoing_the_webhook_path_shows_none_of_it(httpserver: HTTPServer) -> None:
    echoing_404(httpserver)
    resource = NotificationsResource(
        slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
    )
    with pytest.raises(AllChannelsFailed) as raised:
        resource.notify("run_failed", {"job": "daily"})
    [(_, error)] = raised.value.failures
    assert isinstance(error, NotFound)  # not retried: a 404 stays a 404
    assert len(httpserver.log) == 1
    assert "no_service" in str(error)
    assert_no_secret(str(raised.value))
    assert_no_secret(repr(raised.value.failures))
    assert_no_secret("".join(__import__("traceback").format_exception(raised.value)))


def _error_texts(error: Any) -> list[str]:
    """The messages and stacks of a serialized error and of every cause/context of it."""
    texts: list[str] = []
    seen: list[Any] = [error]
    while seen:
        info = seen.pop()
        if info is None:
            continue
        texts.append(info.message)
        texts.extend(info.stack)
        seen.extend([info.cause, info.context])
    return texts


@pytest.mark.dagster
def test_404_echoing_the_webhook_path_stays_out_of_the_event_log(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    echoing_404(httpserver)

    @dg.asset
    def alerted(notifications: NotificationsResource) -> int:
        notifications.notify("materialization_failed", {"asset": "alerted", "error": "x"})
        return 1

    result = dg.materialize(
        [alerted],
        instance=dagster_instance,
        raise_on_error=False,
        resources={
            "notifications": NotificationsResource(
                slack_webhook=SlackWebhookConfig(url=httpserver.url_for(webhook_path()))
            )
        },
    )
    assert not result.success
    [failure] = dagster_instance.all_logs(result.run_id, of_type=dg.DagsterEventType.STEP_FAILURE)
    assert failure.dagster_event is not None
    error = failure.dagster_event.event_specific_data.error  # type: ignore[union-attr]
    texts = _error_texts(error)
    assert any("AllChannelsFailed" in text or "all failed" in text for text in texts)
    assert any("no_service" in text for text in texts)
    for text in texts:
        assert_no_secret(text)
    for entry in dagster_instance.all_logs(result.run_id):
        assert_no_secret(entry.user_message)
        if entry.dagster_event is not None:
            assert_no_secret(repr(entry.dagster_event.event_specific_data))


def test_config_constraints_fail_when_built_naming_the_field() -> None:
    cases: list[tuple[Any, dict[str, Any], str]] = [
        (SlackWebhookConfig, {"url": "https://hooks.example/x", "timeout": 0}, "timeout"),
        (EmailConfig, {"host": "h", "sender": "a@b.c", "timeout": -1}, "timeout"),
        (EmailConfig, {"host": "h", "sender": "a@b.c", "port": 70000}, "port"),
        (NotificationsResource, {"slack_timeout": 0}, "slack_timeout"),
    ]
    for config_class, options, field in cases:
        with pytest.raises(pydantic.ValidationError) as raised:
            config_class(**options)
        assert [error["loc"] for error in raised.value.errors()] == [(field,)]
