"""dbt inside ``@dbt_assets``: :func:`stream_dbt` streams dagster-dbt's events through the
resource's timeout, retries and process-tree kill."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from typing import Any

import dagster as dg
from dagster_dbt import DbtCliResource
from dagster_dbt.core.dbt_cli_event import DbtCliEventMessage
from dagster_dbt.core.dbt_cli_invocation import DbtCliInvocation

from flowstone_dagster import telemetry
from flowstone_dagster.dbt.artifacts import (
    read_node_results,
)
from flowstone_dagster.dbt.errors import (
    DbtWarehouseUnreachable,
    all_transient,
)
from flowstone_dagster.dbt.invocation import (
    DbtResult,
    _Console,
    _dagster_errors,
    _describe_args,
    _failure_messages,
    _raise_for_outcome,
    emit_node_events,
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


# -- @dbt_assets -----------------------------------------------------------------------------------


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
    node: a connection failure before it is retryable (nothing has been materialized yet).
    After it, events stream to Dagster as they come, so a failure is final for this step.
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
        self.timeout = timeout
        self.kill_grace = kill_grace
        self.service = service
        self.attempts = 0
        self.started_at = time.perf_counter()
        self.console = _Console()
        self.buffered: list[DbtCliEventMessage] = []

    def start(self) -> tuple[DbtCliInvocation, Iterator[DbtCliEventMessage], Watchdog]:
        """One attempt: start dbt and read up to its first node."""
        self.attempts += 1
        self.console, self.buffered = _Console(), []
        invocation = self.cli.cli(self.args, context=self.context, raise_on_error=False)
        watchdog = Watchdog(
            invocation.process, _effective_timeout(self.timeout), grace=self.kill_grace
        )
        watchdog.__enter__()
        events = invocation.stream_raw_events()
        try:
            for event in events:
                self.console.add(event)
                self.buffered.append(event)
                if self.console.node_started:
                    return invocation, events, watchdog
            exit_code = invocation.process.wait()
            messages = _failure_messages(
                self.console,
                read_node_results(invocation.target_path, project_dir=invocation.project_dir),
            )
            if exit_code != 0 and not watchdog.fired and all_transient(messages):
                raise DbtWarehouseUnreachable(
                    f"`{invocation.dbt_command}` could not reach the warehouse: {messages[0]}",
                    exit_code=exit_code,
                    output=self.console.text,
                    service=self.service,
                )
        except BaseException as exc:
            watchdog.__exit__(type(exc), exc, exc.__traceback__)
            raise
        return invocation, events, watchdog

    def dagster_events(
        self, invocation: DbtCliInvocation, events: Iterator[DbtCliEventMessage]
    ) -> Iterator[Any]:
        """dagster-dbt's events for each dbt event, with flowstone metadata on node results."""

        def everything() -> Iterator[DbtCliEventMessage]:
            yield from self.buffered  # read by start(), already in the console text
            for event in events:
                self.console.add(event)
                yield event

        for event in everything():
            for dagster_event in event.to_default_asset_events(
                manifest=invocation.manifest,
                dagster_dbt_translator=invocation.dagster_dbt_translator,
                context=invocation.context,
                target_path=invocation.target_path,
                project=invocation.project,
            ):
                yield _with_node_metadata(dagster_event, event, self.attempts)

    def result(self, invocation: DbtCliInvocation) -> DbtResult:
        exit_code = invocation.process.wait()
        nodes = read_node_results(invocation.target_path, project_dir=invocation.project_dir)
        return DbtResult(
            command=("dbt", *_describe_args(self.args)),
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
    timeout: float | None = None,
    resilience: ResilienceResource | None = None,
    service: str = "dbt",
    kill_grace: float = DEFAULT_KILL_GRACE,
) -> Iterator[Any]:
    """What ``@dbt_assets`` bodies yield in place of ``dbt.cli(args, context=context).stream()``.

    ::

        @dbt_assets(manifest=project.manifest_path)
        def analytics(context: dg.AssetExecutionContext, dbt: DbtResource):
            yield from stream_dbt(context, dbt, ["build"])

    ``dbt`` may also be a plain ``DbtCliResource`` (then pass ``resilience`` and ``timeout``;
    with a ``DbtResource`` they default to its fields, and its ``vars`` and ``threads`` are
    added to ``args``). See :meth:`DbtResource.stream`.
    """
    args = list(args)
    limit = timeout
    if isinstance(dbt, DbtResource):
        settings = dbt.settings()
        cli = dbt.cli_resource(settings)
        resilience = resilience or dbt.resilience
        service, kill_grace = dbt.service, dbt.kill_grace
        limit = timeout if timeout is not None else settings.timeout
        if settings.vars and "--vars" not in args:
            args += ["--vars", json.dumps(settings.vars)]
        if settings.threads is not None and "--threads" not in args:
            args += ["--threads", str(settings.threads)]
    else:
        cli = dbt
    resilience = resolve(resilience)
    stream = _DbtStream(context, cli, args, timeout=limit, kill_grace=kill_grace, service=service)
    command = _command_of(args)
    # The mapping is outermost: telemetry records dbt's own error, Dagster gets the mapped one.
    with (
        _dagster_errors(resilience, service),
        telemetry.observe(context, attach_metadata=False),
        telemetry.span("flowstone.dbt.command", command=command, service=service) as call,
    ):
        try:
            invocation, events, watchdog = resilience.call(
                service, stream.start, dagster_errors=False
            )
        finally:
            call.attempts = max(stream.attempts, 1)
        with watchdog:
            yield from stream.dagster_events(invocation, events)
        result = stream.result(invocation)
        emit_node_events(result.nodes)
        call.set(
            exit_code=result.exit_code,
            nodes=len(result.nodes),
            models_run=result.models_run,
            failed=len(result.failed_nodes),
            tests=len(result.tests),
        )
        if watchdog.fired:
            waited = watchdog.timeout or 0.0
            raise CallTimeout(
                f"`dbt {command}` did not finish within {waited:g} s; dbt and its child "
                "processes were stopped",
                timeout=waited,
                service=service,
            )
        if result.exit_code == 0:
            seed_partial_parse(invocation.project_dir, invocation.target_path)
        messages = _failure_messages(stream.console, result.nodes)
        if result.exit_code != 0 and all_transient(messages):
            # The connection dropped mid-run: retryable, but by the step's RetryPolicy.
            raise DbtWarehouseUnreachable(
                f"`dbt {command}` lost the warehouse connection: {messages[0]}",
                exit_code=result.exit_code,
                output=result.output,
                failed_nodes=[node.as_dict() for node in result.failed_nodes],
                service=service,
            )
        _raise_for_outcome(result, command, None)


def _command_of(args: Sequence[str]) -> str:
    return next((arg for arg in args if not arg.startswith("-")), "dbt")
