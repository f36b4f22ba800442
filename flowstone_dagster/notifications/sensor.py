"""Sensors that send notifications when runs fail or asset checks fail, without alert storms.

::

    import dagster as dg
    from flowstone_dagster.notifications import NotificationsResource, SlackWebhookConfig
    from flowstone_dagster.notifications.sensor import make_notification_sensor

    defs = dg.Definitions(
        jobs=[daily_job],
        sensors=[
            make_notification_sensor(
                webserver_base_url="https://dagster.example.com",
                asset_check_failures=True,
                storm_window_seconds=3600,
                default_status=dg.DefaultSensorStatus.RUNNING,
            )
        ],
        resources={"notifications": NotificationsResource(
            slack_webhook=SlackWebhookConfig(url=dg.EnvVar("SLACK_WEBHOOK_URL")),
        )},
    )

On each failed run the sensor sends ``run_failed`` through the ``notifications`` resource:
job, run id, failed steps, the first lines of the error, and a button to the run in the UI.
With ``asset_check_failures`` it also sends ``asset_check_failed`` for every failed check of a
finished run (succeeded or failed).

**What is watched.** Every run of the sensor's code location, or only some: ``monitored_jobs``
(job names or definitions) and ``asset_selection`` (an ``AssetSelection``, or asset keys,
``"a/b"`` strings, asset definitions or specs). With both, a run is watched when either
matches. A failed run matches an asset selection when it targeted a selected asset (its
planned materializations, which include those of the failed steps, or its asset selection); a
failed check when the check's asset is selected. An ``AssetSelection`` is resolved against the
sensor's own ``Definitions`` at each evaluation (``context.repository_def``).

**Alert storms.** Failures with the same signature (job plus error type; asset plus check)
notify once per ``storm_window_seconds``; the ones held back are counted, and when the window
ends a summary (``alert_storm_summary``) says how many there were, or, if the same failure
happens again, its notification carries the count. Nothing is dropped silently.

**Why not ``run_failure_sensor``?** Dagster's run-status sensors own their cursor, and the
storm counts must survive between evaluations (and daemon restarts) in the sensor's cursor.
So this sensor reads the same records the run-status sensors read
(``instance.fetch_run_status_changes``, in storage-id order), keeps its own position per
status, and stores ``{position, storm counts}`` as its cursor. Like Dagster's, its first
evaluation starts from "now": failures from before the sensor was turned on are not sent.

**Delivery failures.** When some channels fail the alert counts as sent (retrying would
repeat it on the channels that worked) and a warning is logged. When every channel fails with
a transient error (timeouts, 5xx, rate limits, an open circuit), the sensor stops at that
failure and tries it again on its next evaluation; a permanent error is logged and skipped.
A configuration error fails the evaluation.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import dagster as dg

from flowstone_dagster.errors import (
    CircuitOpen,
    ConfigurationError,
    MaxAttemptsExceeded,
    PartialFailure,
    is_retryable,
)
from flowstone_dagster.notifications.notifier import AllChannelsFailed

__all__ = [
    "DEFAULT_STORM_WINDOW_SECONDS",
    "AlertStorm",
    "AssetFilter",
    "NotificationSensorCursor",
    "RunFailureInfo",
    "StormEntry",
    "describe_run_failure",
    "make_notification_sensor",
]

#: Failures with the same signature notify once per this many seconds (one hour).
DEFAULT_STORM_WINDOW_SECONDS = 3600.0

_CURSOR_VERSION = 1


# -- alert storms ----------------------------------------------------------------------------


@dataclass
class StormEntry:
    """One signature's window: when it began, and the alerts held back since."""

    since: float
    suppressed: int = 0
    label: str = ""
    last_run_id: str | None = None


class AlertStorm:
    """Lets one alert per signature through per ``window`` seconds and counts the rest.

    ::

        storm = AlertStorm(window=3600)
        storm.admit("run:daily:ValueError", now=0)      # 0: send (nothing held back before)
        storm.admit("run:daily:ValueError", now=10)     # None: held back (counted)
        storm.admit("run:daily:ValueError", now=3700)   # 1: send, saying 1 was held back
        storm.expired(now=7400)                         # windows over with alerts held back

    Invariant (property-tested): every alert is either admitted or counted in exactly one
    later admission or :meth:`expired` entry. A ``window`` of 0 admits everything.
    """

    def __init__(self, window: float, entries: Mapping[str, StormEntry] | None = None) -> None:
        if window < 0:
            raise ConfigurationError("must not be negative", field="storm_window_seconds")
        self.window = float(window)
        self.entries: dict[str, StormEntry] = dict(entries or {})

    def admit(
        self, signature: str, now: float, *, label: str = "", run_id: str | None = None
    ) -> int | None:
        """``None`` if the alert is held back; else how many were held back before it."""
        entry = self.entries.get(signature)
        if entry is not None and now - entry.since < self.window:
            entry.suppressed += 1
            entry.last_run_id = run_id or entry.last_run_id
            return None
        carried = entry.suppressed if entry is not None else 0
        if self.window > 0:
            self.entries[signature] = StormEntry(since=now, label=label, last_run_id=run_id)
        else:
            self.entries.pop(signature, None)
        return carried

    def expired(self, now: float) -> list[tuple[str, StormEntry]]:
        """Remove the windows that are over; return those that held alerts back."""
        over = [
            (sig, entry) for sig, entry in self.entries.items() if now - entry.since >= self.window
        ]
        for signature, _ in over:
            del self.entries[signature]
        return [(sig, entry) for sig, entry in over if entry.suppressed > 0]

    def snapshot(self) -> dict[str, StormEntry]:
        """A copy of the state, for :meth:`restore` when an alert could not be sent."""
        return {sig: StormEntry(**asdict(entry)) for sig, entry in self.entries.items()}

    def restore(self, snapshot: Mapping[str, StormEntry]) -> None:
        self.entries = {sig: StormEntry(**asdict(entry)) for sig, entry in snapshot.items()}


# -- the cursor --------------------------------------------------------------------------------


@dataclass
class NotificationSensorCursor:
    """The sensor's cursor: where it is in the run-status records, and the storm counts."""

    failures_after: int
    successes_after: int
    storm: dict[str, StormEntry] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(
            {
                "version": _CURSOR_VERSION,
                "failures_after": self.failures_after,
                "successes_after": self.successes_after,
                "storm": {sig: asdict(entry) for sig, entry in self.storm.items()},
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | None) -> NotificationSensorCursor | None:
        """The cursor in ``text``; ``None`` when there is none or it is not ours."""
        if not text:
            return None
        try:
            data = json.loads(text)
            if data.get("version") != _CURSOR_VERSION:
                return None
            return cls(
                failures_after=int(data["failures_after"]),
                successes_after=int(data["successes_after"]),
                storm={sig: StormEntry(**entry) for sig, entry in data["storm"].items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError):
            return None


# -- what a failed run was ---------------------------------------------------------------------


@dataclass(frozen=True)
class RunFailureInfo:
    """What the ``run_failed`` notification says about one failed run."""

    job: str
    run_id: str
    failed_steps: tuple[str, ...]
    error_type: str
    error: str
    url: str | None = None

    @property
    def signature(self) -> str:
        """The alert-storm signature: job plus error type."""
        return f"run:{self.job}:{self.error_type}"

    def payload(self, note: str | None = None) -> dict[str, Any]:
        """The ``run_failed`` payload."""
        payload: dict[str, Any] = {
            "job": self.job,
            "run_id": self.run_id,
            "failed_steps": list(self.failed_steps),
            "error_type": self.error_type,
            "error": self.error,
        }
        if self.url:
            payload["url"] = self.url
        if note:
            payload["note"] = note
        return payload


def _innermost(error: Any) -> Any:
    """The user's error inside Dagster's wrappers (DagsterExecutionStepExecutionError, ...)."""
    while error.cause is not None and (error.cls_name or "").startswith("Dagster"):
        error = error.cause
    return error


def _first_lines(text: str, lines: int) -> str:
    kept = text.strip().splitlines()
    more = len(kept) - lines
    return "\n".join(kept[:lines]) + (f"\n... ({more} more lines)" if more > 0 else "")


def _run_url(base: str | None, run_id: str) -> str | None:
    return f"{base.rstrip('/')}/runs/{run_id}" if base else None


def describe_run_failure(
    instance: dg.DagsterInstance,
    run: dg.DagsterRun,
    failure_event: dg.DagsterEvent | None = None,
    *,
    webserver_base_url: str | None = None,
    error_lines: int = 10,
) -> RunFailureInfo:
    """Job, failed steps, error type and the error's first lines of a failed ``run``.

    The error is the first failed step's (the user's exception inside Dagster's wrapper, or a
    ``dg.Failure``'s description); for a run that failed outside a step, the run failure's.
    Usable from your own ``@run_failure_sensor`` too::

        info = describe_run_failure(context.instance, context.dagster_run,
                                    context.failure_event)
    """
    steps: list[str] = []
    error: Any = None  # Dagster's SerializableErrorInfo (no public import path)
    description: str | None = None
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        event = entry.dagster_event
        if event is None:
            continue
        if event.step_key and event.step_key not in steps:
            steps.append(event.step_key)
        data = event.event_specific_data
        if error is None and data is not None:
            error = getattr(data, "error", None)
            user_failure = getattr(data, "user_failure_data", None)
            description = getattr(user_failure, "description", None)
    reason = None
    if failure_event is not None and failure_event.event_specific_data is not None:
        job_failure = failure_event.event_specific_data
        error = error or getattr(job_failure, "error", None)
        failure_reason = getattr(job_failure, "failure_reason", None)
        reason = getattr(failure_reason, "value", None)
    if error is not None:
        inner = _innermost(error)
        error_type = inner.cls_name or "Error"
        text = description or inner.message or error.message
    else:
        error_type = reason or "UNKNOWN"
        text = description or f"run failed ({error_type.lower()})"
    return RunFailureInfo(
        job=run.job_name,
        run_id=run.run_id,
        failed_steps=tuple(steps),
        error_type=error_type,
        error=_first_lines(text, error_lines),
        url=_run_url(webserver_base_url, run.run_id),
    )


# -- the sensor --------------------------------------------------------------------------------


@dataclass
class _Alert:
    event: str
    payload: dict[str, Any]
    signature: str
    label: str
    run_id: str


@dataclass
class _Tick:
    """What one evaluation did, for the tick's skip reason and log."""

    sent: int = 0
    held_back: int = 0
    summaries: int = 0
    partial: int = 0
    dropped: int = 0
    retry_later: str | None = None

    def reason(self) -> str:
        parts = [f"{self.sent} notified", f"{self.held_back} held back (alert storm)"]
        if self.summaries:
            parts.append(f"{self.summaries} storm summaries")
        if self.partial:
            parts.append(f"{self.partial} reached only some channels")
        if self.dropped:
            parts.append(f"{self.dropped} failed permanently")
        if self.retry_later:
            parts.append(f"stopped, retrying next tick: {self.retry_later}")
        return "; ".join(parts)


class AssetFilter:
    """Which assets a notification sensor watches: an ``AssetSelection`` (resolved against the
    sensor's ``Definitions``) or fixed asset keys.

    ::

        AssetFilter.of(dg.AssetSelection.groups("finance"))
        AssetFilter.of(["orders", "sales/daily", dg.AssetKey(["raw", "events"]), orders_asset])
    """

    def __init__(
        self, selection: dg.AssetSelection | None, keys: frozenset[dg.AssetKey] | None
    ) -> None:
        self.selection = selection
        self.keys = keys

    @classmethod
    def of(cls, value: Any) -> AssetFilter | None:
        """The filter for ``asset_selection`` (``None``: no asset filter)."""
        if value is None:
            return None
        if isinstance(value, dg.AssetSelection):
            return cls(value, None)
        if isinstance(value, (str, dg.AssetKey)) or not isinstance(value, Iterable):
            value = [value]
        keys: set[dg.AssetKey] = set()
        for item in value:
            keys.update(_asset_keys(item))
        if not keys:
            raise ConfigurationError(
                "must be an AssetSelection or asset keys (and not empty)", field="asset_selection"
            )
        return cls(None, frozenset(keys))

    def resolve(self, context: dg.SensorEvaluationContext) -> frozenset[dg.AssetKey]:
        """The selected asset keys, for one evaluation."""
        if self.keys is not None:
            return self.keys
        assert self.selection is not None
        repository = context.repository_def
        if repository is None:
            raise ConfigurationError(
                "an AssetSelection is resolved against the sensor's Definitions, which this "
                "evaluation has none of (build_sensor_context(definitions=...) in tests), or "
                "pass asset keys",
                field="asset_selection",
            )
        assets: list[dg.AssetsDefinition | dg.SourceAsset] = [
            *dict.fromkeys(repository.assets_defs_by_key.values()),
            *repository.source_assets_by_key.values(),
        ]
        return frozenset(self.selection.resolve(assets, allow_missing=True))


def _asset_keys(item: Any) -> list[dg.AssetKey]:
    if isinstance(item, dg.AssetKey):
        return [item]
    if isinstance(item, str):
        return [dg.AssetKey.from_user_string(item)]
    if isinstance(item, (list, tuple)) and item and all(isinstance(p, str) for p in item):
        return [dg.AssetKey(list(item))]
    if isinstance(item, dg.AssetsDefinition):
        return list(item.keys)
    key = getattr(item, "key", None)  # AssetSpec, SourceAsset
    if isinstance(key, dg.AssetKey):
        return [key]
    raise ConfigurationError(
        f"{item!r} is not an asset key, a 'a/b' string, an asset definition or spec",
        field="asset_selection",
    )


def _targeted_assets(instance: dg.DagsterInstance, run: dg.DagsterRun) -> set[dg.AssetKey]:
    """The assets a run targeted: its planned materializations and its asset selection."""
    keys = set(run.asset_selection or ())
    for entry in instance.all_logs(
        run.run_id, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION_PLANNED
    ):
        key = entry.dagster_event.asset_key if entry.dagster_event else None
        if key is not None:
            keys.add(key)
    return keys


def _job_names(monitored: Sequence[Any] | None) -> frozenset[str] | None:
    if monitored is None:
        return None
    names = [item if isinstance(item, str) else getattr(item, "name", None) for item in monitored]
    if not names or any(not isinstance(name, str) or not name for name in names):
        raise ConfigurationError(
            "must be job names or job definitions (and not empty)", field="monitored_jobs"
        )
    return frozenset(names)  # type: ignore[arg-type]


def _transient(error: BaseException) -> bool:
    """Whether a channel's failure may go away by the next evaluation."""
    cause = error.last_error if isinstance(error, MaxAttemptsExceeded) else error
    return isinstance(cause, CircuitOpen) or is_retryable(cause)


def _when(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%d %H:%M UTC")


def _duration(seconds: float) -> str:
    if seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    return f"{seconds / 60:g} min" if seconds % 60 == 0 else f"{seconds:g} s"


@dataclass(frozen=True)
class _Watch:
    """What a notification sensor watches, and how it reports (the factory's options)."""

    name: str
    channels: list[str] | None
    run_failures: bool
    asset_check_failures: bool
    jobs: frozenset[str] | None
    assets: AssetFilter | None
    monitor_all_code_locations: bool
    base_url: str | None
    storm_window: float
    error_lines: int
    max_runs_per_tick: int

    @property
    def filtered(self) -> bool:
        return self.jobs is not None or self.assets is not None

    def job_watched(self, run: dg.DagsterRun) -> bool:
        """Whether the run's job is watched (every job when no filter is set)."""
        return not self.filtered or (self.jobs is not None and run.job_name in self.jobs)

    def in_location(self, context: dg.SensorEvaluationContext, run: dg.DagsterRun) -> bool:
        if self.monitor_all_code_locations:
            return True
        # The rule of Dagster's run-status sensors: same code location and repository (both
        # None for runs made with execute_in_process and sensors evaluated in tests).
        origin = run.remote_job_origin
        run_location = (
            origin.repository_origin.code_location_origin.location_name if origin else None
        )
        run_repository = origin.repository_origin.repository_name if origin else None
        sensor_origin = context.code_location_origin
        sensor_location = sensor_origin.location_name if sensor_origin else None
        return (run_location, run_repository) == (sensor_location, context.repository_name)

    def alerts_for(
        self,
        instance: dg.DagsterInstance,
        run: dg.DagsterRun,
        failure_event: dg.DagsterEvent | None,
        selected: frozenset[dg.AssetKey] | None,
    ) -> Iterator[_Alert]:
        """The alerts of one finished run (``failure_event`` is set when it failed);
        ``selected`` are the watched asset keys (``None``: no asset filter)."""
        job_watched = self.job_watched(run)
        if failure_event is not None and self.run_failures:
            assets: list[str] = []
            if selected is not None:
                assets = sorted(
                    key.to_user_string() for key in _targeted_assets(instance, run) & selected
                )
            if job_watched or assets:
                yield self.run_alert(instance, run, failure_event, assets)
        if self.asset_check_failures:
            for alert, asset_key in self.check_alerts(instance, run):
                if job_watched or (selected is not None and asset_key in selected):
                    yield alert

    def run_alert(
        self,
        instance: dg.DagsterInstance,
        run: dg.DagsterRun,
        failure_event: dg.DagsterEvent,
        assets: list[str],
    ) -> _Alert:
        info = describe_run_failure(
            instance,
            run,
            failure_event,
            webserver_base_url=self.base_url,
            error_lines=self.error_lines,
        )
        payload = info.payload()
        if assets:
            payload["assets"] = assets
        return _Alert(
            "run_failed",
            payload,
            signature=info.signature,
            label=f"failures of {info.job} ({info.error_type})",
            run_id=run.run_id,
        )

    def check_alerts(
        self, instance: dg.DagsterInstance, run: dg.DagsterRun
    ) -> Iterator[tuple[_Alert, dg.AssetKey]]:
        for entry in instance.all_logs(
            run.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION
        ):
            data = entry.dagster_event.event_specific_data if entry.dagster_event else None
            if not isinstance(data, dg.AssetCheckEvaluation) or data.passed:
                continue
            asset = data.asset_key.to_user_string()
            payload: dict[str, Any] = {
                "asset": asset,
                "check": data.check_name,
                "severity": data.severity.value,
                "description": data.description,
                "partition": data.partition,
                "run_id": run.run_id,
            }
            if self.base_url:
                path = "/".join(quote(part, safe="") for part in data.asset_key.path)
                payload["url"] = f"{self.base_url}/assets/{path}?view=checks"
            alert = _Alert(
                "asset_check_failed",
                payload,
                signature=f"check:{asset}:{data.check_name}",
                label=f"failures of check {data.check_name} on {asset}",
                run_id=run.run_id,
            )
            yield alert, data.asset_key

    def statuses(self) -> list[tuple[dg.DagsterEventType, str]]:
        """The run statuses read, each with its cursor position attribute."""
        statuses = [(dg.DagsterEventType.RUN_FAILURE, "failures_after")]
        if self.asset_check_failures:
            statuses.append((dg.DagsterEventType.RUN_SUCCESS, "successes_after"))
        return statuses


def _latest_position(instance: dg.DagsterInstance, status: dg.DagsterEventType) -> int:
    records = instance.fetch_run_status_changes(status, limit=1).records
    return records[0].storage_id if records else 0


class _Evaluation:
    """One evaluation of a notification sensor: read new runs, notify, count, summarise."""

    def __init__(
        self,
        watch: _Watch,
        context: dg.SensorEvaluationContext,
        notifications: Any,
        cursor: NotificationSensorCursor,
        now: float,
    ) -> None:
        self.watch = watch
        self.context = context
        self.notifications = notifications
        self.cursor = cursor
        self.now = now
        self.storm = AlertStorm(watch.storm_window, cursor.storm)
        self.tick = _Tick()
        self.selected = watch.assets.resolve(context) if watch.assets is not None else None

    def run(self) -> dg.SensorResult:
        for status, position in self.watch.statuses():
            if not self.read(status, position):
                break  # a transient delivery failure: the rest waits for the next evaluation
        self.summarise()
        self.cursor.storm = self.storm.entries
        reason = self.tick.reason()
        self.context.log.info(f"{self.watch.name}: {reason}")
        return dg.SensorResult(skip_reason=reason, cursor=self.cursor.to_json())

    def read(self, status: dg.DagsterEventType, position: str) -> bool:
        """Handle the runs that reached ``status``; False when stopped to retry later."""
        instance = self.context.instance
        records = instance.fetch_run_status_changes(
            dg.RunStatusChangeRecordsFilter(
                event_type=status,  # type: ignore[arg-type]
                after_storage_id=getattr(self.cursor, position),
            ),
            limit=self.watch.max_runs_per_tick,
            ascending=True,
        ).records
        for record in records:
            run = instance.get_run_by_id(record.event_log_entry.run_id)
            if run is not None and self.watch.in_location(self.context, run):
                failure = (
                    record.event_log_entry.dagster_event
                    if status == dg.DagsterEventType.RUN_FAILURE
                    else None
                )
                before = self.storm.snapshot()
                alerts = self.watch.alerts_for(instance, run, failure, self.selected)
                if not self.handle(alerts):
                    self.storm.restore(before)  # this run is tried again, whole
                    return False
            setattr(self.cursor, position, record.storage_id)
        return True

    def handle(self, alerts: Iterator[_Alert]) -> bool:
        for alert in alerts:
            held_back = self.storm.admit(
                alert.signature, self.now, label=alert.label, run_id=alert.run_id
            )
            if held_back is None:
                self.tick.held_back += 1
                continue
            if not self.send(alert, self.storm_note(held_back)):
                return False
            self.tick.sent += 1
        return True

    def summarise(self) -> None:
        """Send a summary for each storm window that ended with alerts held back."""
        window = self.storm.window
        for signature, entry in self.storm.expired(self.now):
            summary: dict[str, Any] = {
                "title": "Repeated failures",
                "message": f"{entry.suppressed} more {entry.label or signature} between "
                f"{_when(entry.since)} and {_when(entry.since + window)} were not notified "
                "one by one.",
                "held_back": entry.suppressed,
                "last_run_id": entry.last_run_id,
            }
            if self.watch.base_url and entry.last_run_id:
                summary["url"] = _run_url(self.watch.base_url, entry.last_run_id)
                summary["button_text"] = "View last run"
            alert = _Alert("alert_storm_summary", summary, signature, entry.label, "")
            if self.send(alert, None):
                self.tick.summaries += 1
            else:
                self.storm.entries[signature] = entry  # keep the count; summarise next time

    def storm_note(self, held_back: int) -> str | None:
        if self.storm.window <= 0:
            return None
        earlier = (
            f"{held_back} similar alert{'s were' if held_back != 1 else ' was'} held back in "
            "the previous window. "
            if held_back
            else ""
        )
        return f"{earlier}Repeats within {_duration(self.storm.window)} are counted and summarised."

    def send(self, alert: _Alert, note: str | None) -> bool:
        """Deliver one alert; False when it must be tried again at the next evaluation."""
        payload = {**alert.payload, **({"note": note} if note else {})}
        name, log = self.watch.name, self.context.log
        try:
            self.notifications.notify(alert.event, payload, channels=self.watch.channels)
        except AllChannelsFailed as exc:
            if all(_transient(error) for _, error in exc.failures):
                self.tick.retry_later = str(exc)
                log.warning(f"{name}: {alert.event} not sent, will retry: {exc}")
                return False
            self.tick.dropped += 1
            log.error(f"{name}: {alert.event} (run {alert.run_id or '-'}) not sent: {exc}")
        except PartialFailure as exc:
            self.tick.partial += 1
            log.warning(f"{name}: {alert.event} reached only some channels: {exc}")
        return True


def make_notification_sensor(
    *,
    name: str = "flowstone_notifications",
    resource_key: str = "notifications",
    channels: Sequence[str] | None = None,
    run_failures: bool = True,
    asset_check_failures: bool = False,
    monitored_jobs: Sequence[str | dg.JobDefinition | dg.GraphDefinition | Any] | None = None,
    asset_selection: dg.AssetSelection | Sequence[Any] | None = None,
    monitor_all_code_locations: bool = False,
    webserver_base_url: str | None = None,
    storm_window_seconds: float = DEFAULT_STORM_WINDOW_SECONDS,
    error_lines: int = 10,
    max_runs_per_tick: int = 25,
    minimum_interval_seconds: int = 30,
    default_status: dg.DefaultSensorStatus = dg.DefaultSensorStatus.STOPPED,
    description: str | None = None,
    clock: Callable[[], float] = time.time,
) -> dg.SensorDefinition:
    """A sensor that notifies on failed runs (and optionally failed asset checks).

    Args:
        name: the sensor's name.
        resource_key: the key of the
            :class:`~flowstone_dagster.notifications.NotificationsResource` in the
            ``Definitions``.
        channels: channels to send to; default the resource's default channels.
        run_failures: send ``run_failed`` for every failed run of a monitored job.
        asset_check_failures: send ``asset_check_failed`` for every failed check of a
            finished run of a monitored job.
        monitored_jobs: job names or definitions to watch; default every job (unless
            ``asset_selection`` is given).
        asset_selection: assets to watch: an ``AssetSelection`` (resolved against the sensor's
            ``Definitions``) or asset keys (``AssetKey``, ``"a/b"``, asset definitions or
            specs). A failed run is notified when it targeted a selected asset, a failed check
            when its asset is selected. With ``monitored_jobs`` too, either match is enough.
        monitor_all_code_locations: also watch runs of other code locations (by default only
            runs of this sensor's code location, as Dagster's run-status sensors do).
        webserver_base_url: the Dagster UI's URL, for links to runs and asset checks.
        storm_window_seconds: alerts with the same signature notify once per window; ``0``
            notifies every one.
        error_lines: lines of the error shown.
        max_runs_per_tick: runs read per status per evaluation (the rest wait for the next).
        minimum_interval_seconds, default_status, description: as for ``@dg.sensor``.
        clock: the time source of the storm windows (seconds since the epoch).
    """
    if not run_failures and not asset_check_failures:
        raise ConfigurationError(
            "nothing to watch: enable run_failures or asset_check_failures", field="run_failures"
        )
    if error_lines < 1:
        raise ConfigurationError("must be at least 1", field="error_lines")
    if max_runs_per_tick < 1:
        raise ConfigurationError("must be at least 1", field="max_runs_per_tick")
    AlertStorm(storm_window_seconds)  # validates the window
    watch = _Watch(
        name=name,
        channels=list(channels) if channels is not None else None,
        run_failures=run_failures,
        asset_check_failures=asset_check_failures,
        jobs=_job_names(monitored_jobs),
        assets=AssetFilter.of(asset_selection),
        monitor_all_code_locations=monitor_all_code_locations,
        base_url=webserver_base_url.rstrip("/") if webserver_base_url else None,
        storm_window=storm_window_seconds,
        error_lines=error_lines,
        max_runs_per_tick=max_runs_per_tick,
    )
    watching = "failed runs" + (" and failed asset checks" if asset_check_failures else "")

    @dg.sensor(
        name=name,
        minimum_interval_seconds=minimum_interval_seconds,
        default_status=default_status,
        description=description or f"Sends notifications (Slack, email) for {watching}.",
        required_resource_keys={resource_key},
    )
    def notification_sensor(
        context: dg.SensorEvaluationContext, **resources: Any
    ) -> dg.SensorResult:
        # Dagster passes required resources as keyword arguments when a sensor is invoked
        # directly, and only in the context when the daemon evaluates it: take either.
        cursor = NotificationSensorCursor.from_json(context.cursor)
        if cursor is None:  # first evaluation: start from now, as Dagster's run sensors do
            cursor = NotificationSensorCursor(
                failures_after=_latest_position(context.instance, dg.DagsterEventType.RUN_FAILURE),
                successes_after=_latest_position(context.instance, dg.DagsterEventType.RUN_SUCCESS),
            )
            return dg.SensorResult(
                skip_reason=f"started: {watching} from now on are notified",
                cursor=cursor.to_json(),
            )
        notifications = resources.get(resource_key) or getattr(context.resources, resource_key)
        return _Evaluation(watch, context, notifications, cursor, clock()).run()

    return notification_sensor
