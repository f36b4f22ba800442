"""dbt inside ``@dbt_assets``: :func:`stream_dbt` streams dagster-dbt's events through the
resource's timeout, retries and process-tree kill, as dagster-dbt's ``DbtEventIterator``."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import EllipsisType
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliEventMessage, DbtCliInvocation, DbtCliResource

# The documented return type of the public DbtCliInvocation.stream(); dagster-dbt does not
# re-export it at the top level, and has no hook to wrap the events it iterates.
from dagster_dbt.core.dbt_event_iterator import DbtEventIterator

from flowstone_dagster import telemetry
from flowstone_dagster.dbt.artifacts import read_node_results
from flowstone_dagster.dbt.invocation import (
    DbtResult,
    DbtSelection,
    _Console,
    _dagster_errors,
    _describe_args,
    _failure_messages,
    _new_target_path,
    emit_node_events,
    mark_failed,
    merge_results,
    prune_target_dirs,
    raise_for_outcome,
    transient_error,
)
from flowstone_dagster.dbt.process import (
    DEFAULT_KILL_GRACE,
    Watchdog,
    seed_partial_parse,
)
from flowstone_dagster.dbt.resource import (
    DbtResource,
    _effective_timeout,
    _invocation_id,
)
from flowstone_dagster.errors import CallTimeout
from flowstone_dagster.resilience import ResilienceResource, resolve

__all__ = ["stream_dbt"]


def _with_node_metadata(dagster_event: Any, event: DbtCliEventMessage, attempt: int) -> Any:
    """Add ``flowstone/dbt.node/...`` metadata from the node's result event to its Dagster event.

    dbt's result events (``LogModelResult``, ``LogSeedResult``, ``LogTestResult``, ...) carry the
    node's status, execution time and the adapter's message (``INSERT 5``, ``OK``). One key per
    fact: dagster-dbt already records the status (``status``) and the duration
    (``Execution Duration``) in the versions that have them, so ours are added only where it
    does not; the adapter's message and the command's attempts are ours alone.
    """
    data = event.raw_event.get("data", {})
    # node_status is run_results.json's word ("success", "pass"); data.status the console's ("OK").
    status = (data.get("node_info") or {}).get("node_status") or data.get("status")
    if not status or not hasattr(dagster_event, "with_metadata"):
        return dagster_event
    existing = dict(getattr(dagster_event, "metadata", None) or {})
    metadata: dict[str, Any] = {"flowstone/dbt.command/attempts": attempt}
    if "status" not in existing:
        metadata["flowstone/dbt.node/status"] = str(status)
    if "Execution Duration" not in existing and isinstance(
        data.get("execution_time"), (int, float)
    ):
        metadata["flowstone/dbt.node/execution_time_s"] = round(data["execution_time"], 6)
    if data.get("result_message"):
        metadata["flowstone/dbt.node/message"] = str(data["result_message"])
    return dagster_event.with_metadata({**existing, **metadata})


class _DbtStream:
    """One streamed dbt command of an ``@dbt_assets`` step (see :func:`stream_dbt`).

    An attempt starts dbt through ``DbtCliResource.cli`` and reads dbt's events up to the first
    node: a transient failure before it is retryable (nothing has been materialized yet).
    After it, events stream to Dagster as they come. A transient failure after the first node
    is retried with ``dbt retry`` (:attr:`retry_from` set): only the failed and skipped nodes
    run again, their events stream as they come too.
    """

    def __init__(
        self,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        cli: DbtCliResource,
        args: list[str],
        *,
        timeout: float | None,
        kill_grace: float,
        service: str,
    ) -> None:
        self.context = context
        self.cli = cli
        self.args = args
        self.command = _command_of(args)
        self.shown = ("dbt", *_describe_args(args))
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.service = service
        self.attempts = 0
        self.started_at = time.perf_counter()
        self.console = _Console()
        self.buffered: list[DbtCliEventMessage] = []
        #: The first invocation (its manifest and translator serve ``dbt retry`` too).
        self.first: DbtCliInvocation | None = None
        #: The target directory of the failed invocation that ``dbt retry`` runs again.
        self.retry_from: Path | None = None

    def _invoke(self, target_path: Path) -> DbtCliInvocation:
        if self.retry_from is None or self.first is None:
            invocation = self.cli.cli(
                self.args, context=self.context, raise_on_error=False, target_path=target_path
            )
            self.first = self.first or invocation
            # What dbt really ran: with dagster-dbt's selection of the asset subset.
            started = invocation.process.args
            if isinstance(started, (list, tuple)):
                self.shown = ("dbt", *_describe_args([str(arg) for arg in started][1:]))
            return invocation
        # No context: dagster-dbt would add the subset's --select, which `dbt retry` refuses
        # (it reuses the failed invocation's selection); the first invocation's manifest and
        # translator map the events to the same assets.
        return self.cli.cli(
            ["retry", "--state", str(self.retry_from)],
            manifest=self.first.manifest,
            dagster_dbt_translator=self.first.dagster_dbt_translator,
            raise_on_error=False,
            target_path=target_path,
        )

    def start(self) -> tuple[DbtCliInvocation, Iterator[DbtCliEventMessage], Watchdog]:
        """One attempt: start dbt and read up to its first node."""
        self.attempts += 1
        self.console, self.buffered = _Console(), []
        target_path = _new_target_path(Path(self.cli.project_dir), self.command)
        invocation = self._invoke(target_path)
        watchdog = Watchdog(
            invocation.process,
            _effective_timeout(self.timeout),
            grace=self.kill_grace,
            on_fire=self.console.interrupted,
        )
        watchdog.__enter__()
        events = invocation.stream_raw_events()
        try:
            for event in events:
                self.console.add(event.raw_event)
                self.buffered.append(event)
                if self.console.node_started:
                    return invocation, events, watchdog
            result = self.result(invocation)
            error = None if watchdog.fired else self.transient(result)
            if error is not None:
                mark_failed(invocation.target_path)
                raise error
        except BaseException as exc:
            watchdog.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return invocation, events, watchdog

    def transient(self, result: DbtResult) -> Exception | None:
        messages = _failure_messages(self.console, result.nodes)
        return transient_error(result, messages, service=self.service)

    def dagster_events(
        self, invocation: DbtCliInvocation, events: Iterator[DbtCliEventMessage]
    ) -> Iterator[Any]:
        """dagster-dbt's events for each dbt event, with flowstone metadata on node results."""

        def everything() -> Iterator[DbtCliEventMessage]:
            yield from self.buffered  # read by start(), already in the console text
            for event in events:
                self.console.add(event.raw_event)
                yield event

        for event in everything():
            for dagster_event in event.to_default_asset_events(
                manifest=invocation.manifest,
                dagster_dbt_translator=invocation.dagster_dbt_translator,
                context=self.context,
                target_path=invocation.target_path,
                project=invocation.project,
            ):
                yield _with_node_metadata(dagster_event, event, self.attempts)

    def result(self, invocation: DbtCliInvocation) -> DbtResult:
        exit_code = invocation.process.wait()
        nodes = read_node_results(invocation.target_path, project_dir=invocation.project_dir)
        return DbtResult(
            command=self.shown,
            exit_code=exit_code,
            nodes=tuple(nodes),
            output=self.console.text,
            elapsed=time.perf_counter() - self.started_at,
            target_path=invocation.target_path,
            invocation_id=_invocation_id(invocation.target_path),
            attempts=self.attempts,
            warnings=tuple(self.console.unmatched),
        )


def stream_dbt(
    context: dg.AssetExecutionContext | dg.OpExecutionContext,
    dbt: DbtResource | DbtCliResource,
    args: Sequence[str] = ("build",),
    *,
    timeout: float | EllipsisType | None = ...,
    allow_empty: bool | None = None,
    resilience: ResilienceResource | None = None,
    service: str = "dbt",
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> DbtEventIterator[Any]:
    """What ``@dbt_assets`` bodies yield in place of ``dbt.cli(args, context=context).stream()``.

    ::

        @dbt_assets(manifest=project.manifest_path)
        def analytics(context: dg.AssetExecutionContext, dbt: DbtResource):
            yield from stream_dbt(context, dbt, ["build"]).fetch_row_counts()

    dbt starts when this is called (as with ``DbtCliResource.cli``); the returned
    ``DbtEventIterator`` streams its events. ``dbt`` may also be a plain ``DbtCliResource``
    (then pass ``resilience`` and ``timeout``; with a ``DbtResource`` they default to its
    fields, and its ``vars`` and ``threads`` are added to ``args``). ``timeout=None``: no limit.
    See :meth:`DbtResource.stream`.
    """
    args = list(args)
    selection = DbtSelection.from_args(args)
    keep_target_dirs: int | None = None
    if isinstance(dbt, DbtResource):
        settings = dbt.settings()
        cli = dbt.cli_resource(settings)
        resilience = resilience or dbt.resilience
        service, kill_grace = dbt.service, dbt.kill_grace
        limit = settings.timeout if isinstance(timeout, EllipsisType) else timeout
        empty_ok = dbt.allow_empty if allow_empty is None else allow_empty
        keep_target_dirs = dbt.keep_target_dirs
        if settings.vars and "--vars" not in args:
            args += ["--vars", json.dumps(settings.vars)]
        if settings.threads is not None and "--threads" not in args:
            args += ["--threads", str(settings.threads)]
    else:
        cli = dbt
        limit = None if isinstance(timeout, EllipsisType) else timeout
        empty_ok = bool(allow_empty)
    resilience = resolve(resilience)
    stream = _DbtStream(context, cli, args, timeout=limit, kill_grace=kill_grace, service=service)
    with _dagster_errors(resilience, service):
        invocation, events, watchdog = resilience.call(service, stream.start, dagster_errors=False)

    # A transient failure after the first node is retried with `dbt retry` only when the policy
    # allows retries at all (without resilience, dbt runs once).
    retries_mid_run = resilience.policy_for(service).retry.max_attempts > 1
    streamed = _streamed(
        stream,
        resilience,
        (invocation, events, watchdog),
        selection=selection,
        allow_empty=empty_ok,
        keep_target_dirs=keep_target_dirs,
        retries_mid_run=retries_mid_run,
    )
    return DbtEventIterator(streamed, invocation)


def _streamed(
    stream: _DbtStream,
    resilience: ResilienceResource,
    started: tuple[DbtCliInvocation, Iterator[DbtCliEventMessage], Watchdog],
    *,
    selection: DbtSelection,
    allow_empty: bool,
    keep_target_dirs: int | None,
    retries_mid_run: bool,
) -> Iterator[Any]:
    """The events of :func:`stream_dbt` once dbt reached its first node, then its outcome."""
    # The mapping is outermost: telemetry records dbt's own error, Dagster the mapped one.
    with (
        _dagster_errors(resilience, stream.service),
        telemetry.observe(stream.context, attach_metadata=False),
        telemetry.span(
            "flowstone.dbt.command", command=stream.command, service=stream.service
        ) as call,
    ):
        current, current_events, current_watchdog = started
        invocation = current
        failed_before: DbtResult | None = None
        try:
            while True:
                call.attempts = stream.attempts
                with current_watchdog:
                    yield from stream.dagster_events(current, current_events)
                latest = stream.result(current)
                result = latest if failed_before is None else merge_results(failed_before, latest)
                if not result.success or current_watchdog.fired:
                    mark_failed(current.target_path)
                error = None if current_watchdog.fired else stream.transient(result)
                if error is None or not retries_mid_run or not latest.nodes:
                    break
                # A connection lost mid-run: `dbt retry` runs the failed and skipped nodes.
                failed_before, stream.retry_from = result, current.target_path
                current, current_events, current_watchdog = resilience.call(
                    stream.service, stream.start, dagster_errors=False
                )
        finally:
            call.attempts = stream.attempts
            if keep_target_dirs is not None:
                prune_target_dirs(invocation.project_dir, keep=keep_target_dirs)
        emit_node_events(result.nodes)
        call.set(
            exit_code=result.exit_code,
            nodes=len(result.nodes),
            models_run=result.models_run,
            failed=len(result.failed_nodes),
            tests=len(result.tests),
        )
        if current_watchdog.fired:
            waited = current_watchdog.timeout or 0.0
            raise CallTimeout(
                f"`{' '.join(stream.shown)}` did not finish within {waited:g} s; dbt and its "
                "child processes were stopped. dbt's last lines before the interrupt:\n"
                f"{stream.console.last_lines()}\n(dbt's log: {result.log_path})",
                timeout=waited,
                service=stream.service,
            )
        if result.exit_code == 0:
            seed_partial_parse(current.project_dir, current.target_path)
        if error is not None:
            raise error  # retries exhausted or not allowed here: the step's RetryPolicy may
        raise_for_outcome(
            result,
            stream.command,
            selection,
            unmatched=stream.console.unmatched,
            nothing_selected=stream.console.nothing_selected and not result.nodes,
            allow_empty=allow_empty,
            subset=True,
            service=stream.service,
        )


def _command_of(args: Sequence[str]) -> str:
    return next((arg for arg in args if not arg.startswith("-")), "dbt")
