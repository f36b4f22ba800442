"""Telemetry: one event per external call, delivered to listeners and summed into metadata.

Every integration reports each external call with :func:`emit` or, more often, :func:`span`::

    from flowstone_dagster import telemetry

    with telemetry.span("flowstone.http.request", method="GET") as call:
        response = session.get(url)
        call.set(status=response.status_code, bytes=len(response.content))

An event carries its name, outcome (``"ok"`` or ``"error"``), duration, attempts, the error
type on failure, and the integration's own measures (tokens, rows, bytes, status). Listeners
receive every event:

- Python ``logging``, always, on the ``flowstone_dagster.telemetry`` logger at DEBUG (errors at
  WARNING);
- any callback registered with :func:`add_listener`;
- while :func:`observe` is active, the Dagster context's log (failed and retried calls; all
  calls with ``log_all=True``) and a :class:`StepTelemetry` aggregator, which turns the step's
  events into ``flowstone/...`` materialization metadata::

      @asset
      def scores(context: AssetExecutionContext, llm: LLMResource):
          with telemetry.observe(context):   # adds flowstone/llm.call/calls, ... to the output
              return llm.call("...")

A listener that raises is logged and skipped; telemetry never breaks the call it observes.
The catalogue of events is in ``docs/telemetry.md``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Listener",
    "Span",
    "StepTelemetry",
    "TelemetryEvent",
    "add_listener",
    "emit",
    "format_event",
    "observe",
    "remove_listener",
    "span",
]

logger = logging.getLogger("flowstone_dagster.telemetry")

#: Measure names whose values are replaced before any listener sees them: a guard against an
#: integration passing a secret by mistake.
SECRET_MEASURES = frozenset(
    {"api_key", "authorization", "password", "secret", "token", "webhook_url", "headers"}
)


#: Numeric measures that are labels, not quantities: never summed into metadata.
NON_ADDITIVE_MEASURES = frozenset({"pid", "status", "exit_code", "signal", "port"})


@dataclass(frozen=True)
class TelemetryEvent:
    """One external call, as listeners see it."""

    name: str
    outcome: str
    duration_s: float
    attempts: int = 1
    error_type: str | None = None
    measures: Mapping[str, Any] = field(default_factory=dict)
    timestamp: float = field(default_factory=time.time)

    @property
    def ok(self) -> bool:
        return self.outcome == "ok"


Listener = Callable[[TelemetryEvent], None]

_listeners: list[Listener] = []
_listeners_lock = threading.Lock()


def add_listener(listener: Listener) -> Callable[[], None]:
    """Register ``listener`` for every event in this process; returns a function removing it."""
    with _listeners_lock:
        _listeners.append(listener)
    return lambda: remove_listener(listener)


def remove_listener(listener: Listener) -> None:
    """Unregister ``listener``; unknown listeners are ignored."""
    with _listeners_lock, suppress(ValueError):
        _listeners.remove(listener)


def format_event(event: TelemetryEvent) -> str:
    """A one-line, human-readable form of ``event`` (used by the log listeners)."""
    parts = [
        event.name,
        f"outcome={event.outcome}",
        f"duration_ms={event.duration_s * 1000:.1f}",
        f"attempts={event.attempts}",
    ]
    if event.error_type:
        parts.append(f"error={event.error_type}")
    parts.extend(f"{key}={value}" for key, value in event.measures.items())
    return " ".join(parts)


def _log_to_python_logging(event: TelemetryEvent) -> None:
    level = logging.DEBUG if event.ok else logging.WARNING
    if logger.isEnabledFor(level):
        logger.log(level, format_event(event), extra={"flowstone_event": event})


def _clean(measures: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: ("***" if key.lower() in SECRET_MEASURES else value) for key, value in measures.items()
    }


def emit(
    name: str,
    *,
    outcome: str | None = None,
    duration_s: float = 0.0,
    attempts: int = 1,
    error: BaseException | None = None,
    **measures: Any,
) -> TelemetryEvent:
    """Build an event and deliver it to every listener; returns it.

    ``outcome`` defaults to ``"error"`` when ``error`` is given, else ``"ok"``.
    """
    event = TelemetryEvent(
        name=name,
        outcome=outcome or ("error" if error is not None else "ok"),
        duration_s=duration_s,
        attempts=attempts,
        error_type=type(error).__name__ if error is not None else None,
        measures=_clean(measures),
    )
    _log_to_python_logging(event)
    with _listeners_lock:
        listeners = list(_listeners)
    for listener in listeners:
        try:
            listener(event)
        except Exception:  # a broken listener must not break the call it observes
            logger.exception("telemetry listener %r failed on %s", listener, name)
    return event


class Span:
    """The measures of a call in progress; see :func:`span`."""

    __slots__ = ("attempts", "measures", "name")

    def __init__(self, name: str, measures: dict[str, Any]) -> None:
        self.name = name
        self.measures = measures
        self.attempts = 1

    def set(self, **measures: Any) -> None:
        """Record (or overwrite) measures of the call."""
        self.measures.update(measures)


@contextmanager
def span(name: str, **measures: Any) -> Iterator[Span]:
    """Time the block and emit one event when it ends.

    The outcome is ``"error"`` (with the exception's type) when the block raises; the
    exception propagates unchanged. Set ``span.attempts`` when the block retried.
    """
    current = Span(name, dict(measures))
    started = time.perf_counter()
    try:
        yield current
    except BaseException as exc:
        emit(
            name,
            duration_s=time.perf_counter() - started,
            attempts=current.attempts,
            error=exc,
            **current.measures,
        )
        raise
    emit(
        name,
        duration_s=time.perf_counter() - started,
        attempts=current.attempts,
        **current.measures,
    )


def _short(name: str) -> str:
    return name.removeprefix("flowstone.")


@dataclass
class _Totals:
    calls: int = 0
    errors: int = 0
    attempts: int = 0
    duration_s: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)


class StepTelemetry:
    """A listener that sums the events of one step and logs them to a Dagster context.

    :meth:`metadata` returns, per event name (without the ``flowstone.`` prefix),
    ``flowstone/<name>/calls``, ``/errors``, ``/attempts``, ``/duration_ms`` and the sum of each
    numeric measure (``flowstone/llm.call/input_tokens``, ``flowstone/db.store/rows``, ...),
    except labels such as ``pid`` and ``status`` (:data:`NON_ADDITIVE_MEASURES`).
    """

    def __init__(self, context: Any | None = None, *, log_all: bool = False) -> None:
        self.context = context
        self.log_all = log_all
        self.events: list[TelemetryEvent] = []
        self._totals: dict[str, _Totals] = {}
        self._lock = threading.Lock()

    def __call__(self, event: TelemetryEvent) -> None:
        with self._lock:
            self.events.append(event)
            totals = self._totals.setdefault(event.name, _Totals())
            totals.calls += 1
            totals.errors += 0 if event.ok else 1
            totals.attempts += event.attempts
            totals.duration_s += event.duration_s
            for key, value in event.measures.items():
                if key in NON_ADDITIVE_MEASURES:
                    continue
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    totals.sums[key] = totals.sums.get(key, 0) + value
        log = getattr(self.context, "log", None)
        if log is None:
            return
        # Failures and retried calls go to the step log one by one; clean successes only with
        # log_all (their totals are in the metadata, and a Dagster log line per call is costly
        # for steps that make thousands of calls).
        if not event.ok:
            log.warning(format_event(event))
        elif event.attempts > 1:
            log.info(format_event(event))
        elif self.log_all:
            log.debug(format_event(event))

    def metadata(self) -> dict[str, int | float | bool]:
        """The ``flowstone/...`` metadata of the events seen so far."""
        result: dict[str, int | float | bool] = {}
        with self._lock:
            for name, totals in sorted(self._totals.items()):
                prefix = f"flowstone/{_short(name)}"
                result[f"{prefix}/calls"] = totals.calls
                result[f"{prefix}/errors"] = totals.errors
                result[f"{prefix}/attempts"] = totals.attempts
                result[f"{prefix}/duration_ms"] = round(totals.duration_s * 1000, 3)
                for key, value in sorted(totals.sums.items()):
                    clash = key in ("calls", "errors", "attempts", "duration_ms")
                    result[f"{prefix}/{'measure_' if clash else ''}{key}"] = value
            resilience = self._totals.get("flowstone.resilience.call")
            if "flowstone.store.degraded" in self._totals or (
                resilience is not None and resilience.sums.get("store_degraded")
            ):
                # The resilience store was down and calls went on with this process's own
                # breaker and limiter state: the flag users look for in the UI.
                result["flowstone/store_degraded"] = True
        return result


@contextmanager
def observe(
    context: Any | None = None, *, attach_metadata: bool = True, log_all: bool = False
) -> Iterator[StepTelemetry]:
    """Collect the events emitted in this process while the block runs.

    With a Dagster ``context`` (an asset, op or I/O manager context), failed calls (WARNING)
    and retried calls (INFO) are written to the step's log as they happen, every call with
    ``log_all`` (DEBUG); and when the block succeeds the totals are attached with
    ``context.add_output_metadata`` (``add_input_metadata`` for an I/O manager's input context)
    so that they show on the materialization, or the input's load event, in the UI.
    """
    collector = StepTelemetry(context, log_all=log_all)
    remove = add_listener(collector)
    try:
        yield collector
    finally:
        remove()
    if attach_metadata and context is not None and collector.events:
        # Output contexts (assets, ops, I/O managers storing) take output metadata; an I/O
        # manager's input context takes input metadata.
        attach = getattr(context, "add_output_metadata", None) or getattr(
            context, "add_input_metadata", None
        )
        if attach is not None:
            attach(collector.metadata())
