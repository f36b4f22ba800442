"""The notification sensor, evaluated against real failed runs in an ephemeral instance, with
Slack on pytest-httpserver; and the alert-storm state machine (property-tested)."""

import itertools
import json
import pathlib
from typing import Any

import dagster as dg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pytest_httpserver import HTTPServer
from slack_sdk.models.blocks import Block

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.notifications import NotificationsResource, SlackWebhookConfig
from flowstone_dagster.notifications.sensor import (
    AlertStorm,
    NotificationSensorCursor,
    StormEntry,
    describe_run_failure,
    make_notification_sensor,
)
from flowstone_dagster.resilience import ONCE, ServicePolicy

pytestmark = pytest.mark.dagster

HOOK = "/services/T1/B2/sensor-secret"
UI = "http://dagster.example:3000"


class Clock:
    """The storm windows' time source, moved by the test (no sleeping)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@dg.op
def load_orders() -> None:
    raise ValueError("disk <!channel> full\nwhile writing orders\nline 3\nline 4")


@dg.op
def unrelated() -> int:
    return 1


@dg.job
def orders_job() -> None:
    load_orders()
    unrelated()


@dg.op
def fail_with_key_error() -> None:
    raise KeyError("missing column")


@dg.job
def orders_job_key_error() -> None:
    fail_with_key_error()


@dg.op
def other_failure() -> None:
    raise ValueError("not watched")


@dg.job
def other_job() -> None:
    other_failure()


@dg.asset
def checked_table() -> int:
    return 0


@dg.asset_check(asset=checked_table)
def not_empty() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="0 rows (expected > 0)")


@dg.asset(group_name="finance")
def ledger() -> int:
    raise ValueError("ledger unbalanced")


@dg.asset(group_name="finance")
def ledger_summary(ledger: int) -> int:
    return ledger


@dg.asset(group_name="marketing")
def campaigns() -> int:
    raise ValueError("campaigns down")


@dg.asset(group_name="marketing")
def campaigns_table() -> int:
    return 0


@dg.asset_check(asset=campaigns_table)
def campaigns_not_empty() -> dg.AssetCheckResult:
    return dg.AssetCheckResult(passed=False, description="no campaigns")


ASSET_DEFS = dg.Definitions(
    assets=[ledger, ledger_summary, campaigns, campaigns_table, checked_table],
    asset_checks=[campaigns_not_empty, not_empty],
)


def fail_assets(assets: list[Any], instance: dg.DagsterInstance) -> str:
    result = dg.materialize(assets, instance=instance, raise_on_error=False)
    assert not result.success
    return result.run_id


def fail(job: dg.JobDefinition, instance: dg.DagsterInstance) -> str:
    result = job.execute_in_process(instance=instance, raise_on_error=False)
    assert not result.success
    return result.run_id


class SensorHarness:
    """Evaluates a sensor the way the daemon does: each tick gets the previous tick's cursor."""

    def __init__(
        self,
        sensor: dg.SensorDefinition,
        instance: dg.DagsterInstance,
        server: HTTPServer,
        *,
        policy: ServicePolicy | None = None,
        definitions: dg.Definitions | None = None,
    ) -> None:
        self.sensor = sensor
        self.instance = instance
        self.cursor: str | None = None
        self.definitions = definitions
        self.resources = {
            "notifications": NotificationsResource(
                slack_webhook=SlackWebhookConfig(url=server.url_for(HOOK)), policy=policy
            )
        }

    def tick(self) -> dg.SensorResult:
        with dg.build_sensor_context(
            instance=self.instance,
            cursor=self.cursor,
            resources=self.resources,
            definitions=self.definitions,
        ) as context:
            result = self.sensor(context)
        assert isinstance(result, dg.SensorResult)
        assert not result.run_requests
        self.cursor = result.cursor
        return result


def messages(server: HTTPServer) -> list[dict[str, Any]]:
    bodies = [json.loads(request.get_data()) for request, _ in server.log]
    for body in bodies:  # each one valid Block Kit
        assert [Block.parse(b).to_dict() for b in body["blocks"]] == body["blocks"]  # type: ignore[union-attr]
    return bodies


@pytest.fixture
def slack(httpserver: HTTPServer) -> HTTPServer:
    httpserver.expect_request(HOOK, method="POST").respond_with_data("ok")
    return httpserver


def test_failed_run_is_notified_with_job_run_steps_error_and_link(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    sensor = make_notification_sensor(webserver_base_url=UI + "/", error_lines=2)
    harness = SensorHarness(sensor, dagster_instance, slack)
    fail(orders_job, dagster_instance)  # before the sensor started: not notified
    assert "started" in str(harness.tick().skip_reason)
    run_id = fail(orders_job, dagster_instance)
    harness.tick()
    [message] = messages(slack)
    blocks = json.dumps(message["blocks"])
    assert message["text"].startswith("Run Failed: orders_job")
    assert run_id in blocks
    assert "load_orders" in blocks  # the failed step
    assert "ValueError" in blocks
    assert "disk &lt;!channel&gt; full" in blocks  # the user's error, escaped
    assert "while writing orders" in blocks
    assert "line 4" not in blocks
    assert "<!channel>" not in json.dumps(message)
    button = message["blocks"][-1]["elements"][0]
    assert button["url"] == f"{UI}/runs/{run_id}"
    harness.tick()
    assert len(slack.log) == 1  # the cursor moved past it


def test_alert_storm_notifies_once_per_window_then_summarises(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    clock = Clock()
    sensor = make_notification_sensor(webserver_base_url=UI, storm_window_seconds=600, clock=clock)
    harness = SensorHarness(sensor, dagster_instance, slack)
    harness.tick()
    first = fail(orders_job, dagster_instance)
    fail(orders_job, dagster_instance)
    result = harness.tick()
    assert "1 notified; 1 held back" in str(result.skip_reason)
    assert len(slack.log) == 1
    assert first in json.dumps(messages(slack)[0])

    clock.now += 60
    last = fail(orders_job, dagster_instance)
    other_error = fail(orders_job_key_error, dagster_instance)  # another signature: notified
    harness.tick()
    assert len(slack.log) == 2
    assert other_error in json.dumps(messages(slack)[1])

    state = NotificationSensorCursor.from_json(harness.cursor)
    assert state is not None
    assert state.storm["run:orders_job:ValueError"].suppressed == 2  # kept in the cursor

    clock.now += 600  # the window is over: one summary with the count
    harness.tick()
    summary = messages(slack)[2]
    assert "Repeated failures" in summary["text"]
    assert "2 more failures of orders_job (ValueError)" in json.dumps(summary["blocks"])
    assert summary["blocks"][-1]["elements"][0]["url"] == f"{UI}/runs/{last}"
    harness.tick()
    assert len(slack.log) == 3  # summarised once

    fail(orders_job, dagster_instance)  # a new window starts: notified again
    harness.tick()
    assert len(slack.log) == 4


def test_repeat_after_window_carries_the_count(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    clock = Clock()
    harness = SensorHarness(
        make_notification_sensor(storm_window_seconds=600, clock=clock), dagster_instance, slack
    )
    harness.tick()
    fail(orders_job, dagster_instance)
    fail(orders_job, dagster_instance)
    harness.tick()
    clock.now += 601
    fail(orders_job, dagster_instance)  # arrives in the same tick the window ends
    harness.tick()
    assert len(slack.log) == 2  # no separate summary: the new alert says it
    assert "1 similar alert was held back" in json.dumps(messages(slack)[1]["blocks"])


def test_monitored_jobs_only(slack: HTTPServer, dagster_instance: dg.DagsterInstance) -> None:
    harness = SensorHarness(
        make_notification_sensor(monitored_jobs=[orders_job]), dagster_instance, slack
    )
    harness.tick()
    fail(other_job, dagster_instance)
    result = harness.tick()
    assert slack.log == []
    assert "0 notified" in str(result.skip_reason)
    fail(orders_job, dagster_instance)
    harness.tick()
    assert len(slack.log) == 1


def test_asset_check_failures(slack: HTTPServer, dagster_instance: dg.DagsterInstance) -> None:
    harness = SensorHarness(
        make_notification_sensor(asset_check_failures=True, webserver_base_url=UI),
        dagster_instance,
        slack,
    )
    harness.tick()
    assert dg.materialize([checked_table, not_empty], instance=dagster_instance).success
    harness.tick()
    [message] = messages(slack)
    assert message["text"].startswith("Asset Check Failed: not_empty on checked_table")
    assert "0 rows (expected &gt; 0)" in json.dumps(message["blocks"])
    assert message["blocks"][-1]["elements"][0]["url"] == f"{UI}/assets/checked_table?view=checks"


def test_transient_delivery_failure_is_retried_next_tick(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    clock = Clock()
    harness = SensorHarness(
        make_notification_sensor(storm_window_seconds=600, clock=clock),
        dagster_instance,
        httpserver,
        policy=ONCE,  # one attempt per tick: the sensor's own retry is the next tick
    )
    harness.tick()
    run_id = fail(orders_job, dagster_instance)
    httpserver.expect_oneshot_request(HOOK).respond_with_data("down", status=503)
    result = harness.tick()
    assert "retrying next tick" in str(result.skip_reason)
    state = NotificationSensorCursor.from_json(harness.cursor)
    assert state is not None
    assert state.storm == {}
    httpserver.expect_oneshot_request(HOOK).respond_with_data("ok")
    harness.tick()
    assert len(httpserver.log) == 2
    assert run_id in json.dumps(messages(httpserver)[1])


def test_permanent_delivery_failure_is_logged_and_skipped(
    httpserver: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    harness = SensorHarness(make_notification_sensor(), dagster_instance, httpserver)
    harness.tick()
    fail(orders_job, dagster_instance)
    httpserver.expect_request(HOOK).respond_with_data("invalid_payload", status=400)
    result = harness.tick()
    assert "1 failed permanently" in str(result.skip_reason)
    harness.tick()
    assert len(httpserver.log) == 1  # not retried forever


def test_describe_run_failure(dagster_instance: dg.DagsterInstance) -> None:
    run_id = fail(orders_job, dagster_instance)
    run = dagster_instance.get_run_by_id(run_id)
    assert run is not None
    info = describe_run_failure(dagster_instance, run, webserver_base_url=UI, error_lines=1)
    assert info.job == "orders_job"
    assert info.failed_steps == ("load_orders",)
    assert info.error_type == "ValueError"
    assert info.error.startswith("ValueError: disk <!channel> full")
    assert "(3 more lines)" in info.error
    assert info.url == f"{UI}/runs/{run_id}"
    assert info.signature == "run:orders_job:ValueError"


def test_factory_validates_its_options() -> None:
    with pytest.raises(ConfigurationError, match="nothing to watch"):
        make_notification_sensor(run_failures=False)
    with pytest.raises(ConfigurationError) as raised:
        make_notification_sensor(storm_window_seconds=-1)
    assert raised.value.field == "storm_window_seconds"
    with pytest.raises(ConfigurationError):
        make_notification_sensor(monitored_jobs=[])


def test_cursor_round_trip_and_foreign_cursor() -> None:
    cursor = NotificationSensorCursor(3, 4)
    cursor.storm["sig"] = StormEntry(since=1.0, suppressed=2, label="x", last_run_id="r")
    assert NotificationSensorCursor.from_json(cursor.to_json()) == cursor
    assert NotificationSensorCursor.from_json('{"record_id": 5}') is None  # e.g. Dagster's own
    assert NotificationSensorCursor.from_json("not json") is None


# -- the storm state machine ---------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(
    window=st.sampled_from([0.0, 5.0, 60.0]),
    steps=st.lists(
        st.tuples(st.sampled_from(["a", "b", "c"]), st.floats(0, 40), st.booleans()),
        max_size=60,
    ),
)
def test_storm_loses_nothing_and_admits_once_per_window(
    window: float, steps: list[tuple[str, float, bool]]
) -> None:
    storm = AlertStorm(window)
    now = 0.0
    admitted_at: dict[str, list[float]] = {}
    accounted = 0
    for signature, advance, flush in steps:
        now += advance
        held_back = storm.admit(signature, now)
        if held_back is not None:
            admitted_at.setdefault(signature, []).append(now)
            accounted += 1 + held_back  # itself, plus the ones it reports
        if flush:
            accounted += sum(entry.suppressed for _, entry in storm.expired(now))
    accounted += sum(entry.suppressed for _, entry in storm.expired(now + window + 1))
    assert accounted == len(steps)  # every alert sent, or counted exactly once
    assert storm.entries == {}
    for times in admitted_at.values():  # at most one admission per window per signature
        assert all(later - earlier >= window for earlier, later in itertools.pairwise(times))


def test_loads_in_definitions(slack: HTTPServer) -> None:
    sensor = make_notification_sensor(name="alerts", monitored_jobs=["orders_job"])
    defs = dg.Definitions(
        jobs=[orders_job],
        sensors=[sensor],
        resources={
            "notifications": NotificationsResource(
                slack_webhook=SlackWebhookConfig(url=slack.url_for(HOOK))
            )
        },
    )
    dg.Definitions.validate_loadable(defs)
    assert sensor.required_resource_keys == {"notifications"}


# -- asset selection (dagster issues 26265, 13416) ----------------------------------------------


@pytest.mark.parametrize(
    "selection",
    [
        pytest.param(dg.AssetSelection.groups("finance"), id="AssetSelection"),
        pytest.param(["ledger_summary"], id="asset keys"),
        pytest.param([ledger], id="asset definitions"),
    ],
)
def test_asset_selection_notifies_failed_runs_that_targeted_a_selected_asset(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance, selection: Any
) -> None:
    harness = SensorHarness(
        make_notification_sensor(asset_selection=selection),
        dagster_instance,
        slack,
        definitions=ASSET_DEFS,
    )
    harness.tick()
    fail_assets([campaigns], dagster_instance)  # not selected
    fail(orders_job, dagster_instance)  # an op job: targets no asset
    result = harness.tick()
    assert slack.log == []
    assert "0 notified" in str(result.skip_reason)
    run_id = fail_assets([ledger, ledger_summary], dagster_instance)
    harness.tick()
    [message] = messages(slack)
    blocks = json.dumps(message["blocks"])
    assert run_id in blocks
    assert "ledger unbalanced" in blocks
    assert "ledger" in blocks  # the selected assets the run targeted are named


def test_asset_selection_with_monitored_jobs_watches_either(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    harness = SensorHarness(
        make_notification_sensor(asset_selection=["ledger"], monitored_jobs=[orders_job]),
        dagster_instance,
        slack,
    )
    harness.tick()
    fail(other_job, dagster_instance)
    fail_assets([campaigns], dagster_instance)
    harness.tick()
    assert slack.log == []
    fail(orders_job, dagster_instance)
    fail_assets([ledger], dagster_instance)
    harness.tick()
    assert [m["text"].split(":")[0] for m in messages(slack)] == ["Run Failed", "Run Failed"]


def test_asset_selection_filters_asset_check_failures(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    harness = SensorHarness(
        make_notification_sensor(
            run_failures=False,
            asset_check_failures=True,
            asset_selection=dg.AssetSelection.assets(campaigns_table),
        ),
        dagster_instance,
        slack,
        definitions=ASSET_DEFS,
    )
    harness.tick()
    assert dg.materialize([checked_table, not_empty], instance=dagster_instance).success
    assert dg.materialize([campaigns_table, campaigns_not_empty], instance=dagster_instance).success
    harness.tick()
    [message] = messages(slack)
    assert message["text"].startswith("Asset Check Failed: campaigns_not_empty on campaigns_table")


def test_asset_selection_needs_definitions_or_keys(
    slack: HTTPServer, dagster_instance: dg.DagsterInstance
) -> None:
    harness = SensorHarness(
        make_notification_sensor(asset_selection=dg.AssetSelection.groups("finance")),
        dagster_instance,
        slack,
    )
    harness.tick()
    with pytest.raises(ConfigurationError) as raised:
        harness.tick()
    assert raised.value.field == "asset_selection"
    with pytest.raises(ConfigurationError):
        make_notification_sensor(asset_selection=[])
    with pytest.raises(ConfigurationError):
        make_notification_sensor(asset_selection=[3])


def test_sensors_module_uses_public_dagster_apis_only() -> None:
    from flowstone_dagster.notifications import sensor as sensors

    source = pathlib.Path(sensors.__file__).read_text(encoding="utf-8")
    assert "dagster._" not in source
