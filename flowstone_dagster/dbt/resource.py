"""``DbtResource``: run, test, build and seed dbt from Dagster, with results you can act on.

::

    import dagster as dg
    from flowstone_dagster.dbt.resource import DbtResource

    @dg.op
    def nightly_models(dbt: DbtResource) -> int:
        result = dbt.run_model("customer_revenue+", vars={"day": "2025-01-15"}, timeout=900)
        for node in result.nodes:           # from run_results.json, not from the console text
            print(node.unique_id, node.status, node.execution_time, node.rows_affected)
        return result.models_run

    dbt = DbtResource(project_dir="analytics", profiles_dir="analytics", target="prod")

Every call runs dbt in a subprocess with its own target directory (``--target-path``), so
concurrent calls on one project never read each other's ``run_results.json``; the result is read
from that file and the ``manifest.json`` beside it. The outcomes:

- dbt exits non-zero: :class:`~flowstone_dagster.errors.DbtFailed` with the exit code, the console
  output and the failed nodes (unique id, status, message, compiled SQL path);
- an explicit selection (``select``, ``exclude``, ``selector``) matches no node (dbt warns and
  exits 0): :class:`DbtNothingSelected`, naming the argument; a default selection with nothing
  to run (``dbt snapshot`` without snapshots), a ``state:modified+`` with nothing modified, or
  ``allow_empty=True`` return an empty result instead;
- a missing project, profile or dbt executable: :class:`DbtProjectNotFound`,
  :class:`DbtProfileNotFound`, :class:`DbtExecutableNotFound`, before dbt starts;
- ``timeout`` passes: dbt and every process it started are stopped (SIGINT, which makes dbt
  cancel its warehouse queries, then SIGKILL), and ``CallTimeout`` is raised;
- every failure is transient (the warehouse refuses or drops the connection, a rate limit, a
  lock, a serialization conflict): :class:`DbtWarehouseUnreachable` /
  :class:`DbtTransientFailure`, retried through ``resilience`` when one is configured; the retry
  runs ``dbt retry`` on the failed invocation, so only the failed and skipped nodes run again;
- the warehouse refuses the credentials or access, or the database does not exist:
  :class:`DbtWarehouseRejected`, never retried. SQL errors and failing tests are not retried.

These errors are raised as Dagster control flow (a ``Failure``, or a ``RetryRequested`` for an
open circuit; the error itself is the ``__cause__``) unless the ``resilience`` resource says
``dagster_errors=False``: one rule for :meth:`DbtResource.invoke` and :func:`stream_dbt`, the
same with no ``resilience`` configured (see :func:`flowstone_dagster.resilience.resolve`).

Time: ``timeout`` (default an hour) bounds one dbt command; a resilience policy's ``timeout``,
published as :func:`~flowstone_dagster.resilience.current_deadline`, shortens it. The policy's
retry ``deadline`` only bounds when a retry may start: it never stops a running dbt command.

Inside ``@dbt_assets``, :meth:`DbtResource.stream` replaces ``dbt.cli([...],
context=context).stream()`` with the same semantics; see ``docs/dbt.md``.

Why a wrapper around dagster-dbt's ``DbtCliResource`` and not a subclass: ``DbtCliResource``
validates paths in pydantic validators (a missing project is a pydantic ``ValidationError`` at
construction, not an error naming the field at set-up, and it cannot see per-call overrides), and
its ``cli()`` opens a dbt adapter in the calling process on every call (about 0.3 s; useful only
for row counts and column metadata in ``@dbt_assets``). ``DbtResource`` keeps the same
configuration fields and composes a ``DbtCliResource`` for ``@dbt_assets`` streaming
(:meth:`cli_resource`, through public API only); plain calls start dbt themselves, in a process
group of their own, and read ``run_results.json``.

Each invocation has its own target directory under the project's; the last
``keep_target_dirs`` are kept, and of the failed ones (what ``dbt retry --state`` needs) as many
again; older ones are removed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from types import EllipsisType
from typing import TYPE_CHECKING, Any, Unpack

import dagster as dg
from dagster_dbt import DbtCliResource
from pydantic import Field, PrivateAttr, model_validator

from flowstone_dagster import telemetry
from flowstone_dagster.dbt.artifacts import (
    read_node_results,
    read_run_results,
)
from flowstone_dagster.dbt.invocation import (
    DEFAULT_DBT_TIMEOUT,
    DbtOptions,
    DbtResult,
    DbtSelection,
    DbtSettings,
    _check_profile,
    _check_project,
    _Console,
    _dagster_errors,
    _dbt_env,
    _describe_args,
    _failure_messages,
    _new_target_path,
    _resolve_executable,
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
    dbt_launcher,
    read_events,
    seed_partial_parse,
    start_dbt,
)
from flowstone_dagster.errors import CallTimeout, ConfigurationError
from flowstone_dagster.resilience import ResilienceResource, current_deadline, resolve

if TYPE_CHECKING:
    # The documented return type of DbtCliInvocation.stream() (see assets.py).
    from dagster_dbt.core.dbt_event_iterator import DbtEventIterator

__all__ = ["DbtResource"]


# -- the resource ----------------------------------------------------------------------------------


class DbtResource(dg.ConfigurableResource):
    """Runs dbt commands and returns their results; see the module docs and ``docs/dbt.md``.

    ::

        dbt = DbtResource(project_dir="analytics", target="prod", timeout=1800,
                          resilience=ResilienceResource())
        dbt.seed()
        dbt.run_model("orders").models_run          # 1
        dbt.test_model("orders").tests              # [DbtNodeResult(status="pass", ...), ...]
        dbt.build(select="tag:nightly", exclude="tag:slow", full_refresh=True)
    """

    project_dir: str = Field(description="The dbt project directory (holding dbt_project.yml).")
    profiles_dir: str | None = Field(
        default=None,
        description="Directory of profiles.yml. Null: $DBT_PROFILES_DIR, else the project "
        "directory, else ~/.dbt (dbt's own order).",
    )
    profile: str | None = Field(
        default=None, description="Profile to use. Null: the `profile:` of dbt_project.yml."
    )
    target: str | None = Field(
        default=None, description="Target of the profile. Null: the profile's `target:`."
    )
    vars: dict[str, Any] = Field(
        default_factory=dict,
        description="dbt variables for every call (--vars); a call's `vars` are merged over them.",
    )
    threads: int | None = Field(
        default=None, ge=1, description="--threads for every call. Null: the profile's setting."
    )
    full_refresh: bool = Field(
        default=False, description="Pass --full-refresh to run, build and seed by default."
    )
    timeout: float | None = Field(
        default=DEFAULT_DBT_TIMEOUT,
        gt=0,
        description="Seconds one dbt invocation may take before dbt and its children are "
        "stopped and CallTimeout is raised. Null: no limit.",
    )
    kill_grace: float = Field(
        default=DEFAULT_KILL_GRACE,
        ge=0,
        description="Seconds between SIGINT (dbt cancels its queries) and SIGKILL on timeout.",
    )
    allow_empty: bool = Field(
        default=False,
        description="Accept an explicit selection (select/exclude/selector) that matches no "
        "node instead of raising DbtNothingSelected. A call's allow_empty overrides it.",
    )
    keep_target_dirs: int = Field(
        default=20,
        ge=1,
        description="Per-invocation target directories kept under the project's target "
        "directory (and as many of failed invocations, for `dbt retry --state`); older ones "
        "are removed after each call.",
    )
    dbt_executable: str = Field(
        default="dbt",
        description="The dbt program: a path, or a name looked up on PATH and then next to the "
        "running Python (a virtualenv's bin/).",
    )
    global_config_flags: list[str] = Field(
        default_factory=list,
        description="dbt global flags placed before the command (e.g. ['--no-partial-parse']).",
    )
    service: str = Field(
        default="dbt",
        description="Name in errors, telemetry and the resilience policy. Default: "
        "dbt:<project>:<target> (what fails together is the project's warehouse), or dbt when "
        "the project comes from an EnvVar.",
    )

    @model_validator(mode="before")
    @classmethod
    def _service_names_the_warehouse(cls, data: Any) -> Any:
        # Two projects or targets (two warehouses) never share a breaker by default.
        if isinstance(data, dict) and not data.get("service"):
            project, target = data.get("project_dir"), data.get("target")
            if isinstance(project, str) and (target is None or isinstance(target, str)):
                data = {**data, "service": f"dbt:{Path(project).name}:{target or 'default'}"}
        return data

    resilience: ResilienceResource | None = Field(
        default=None,
        description="Retries (of warehouse connection failures only), circuit breaker and rate "
        "limit for dbt invocations, under the policy named `service`, and whether errors become "
        "Dagster control flow (its dagster_errors). Null: one attempt, errors mapped to Dagster.",
    )

    _cli_resources: dict[tuple[str, ...], DbtCliResource] = PrivateAttr(default_factory=dict)

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        """Fail at resource set-up, naming the field, on a missing project, profile or dbt."""
        self.settings()

    # -- settings --------------------------------------------------------------------------------

    def settings(self, **opts: Unpack[DbtOptions]) -> DbtSettings:
        """Validated settings for a call with ``opts``; raises before anything runs.

        Raises :class:`DbtProjectNotFound`, :class:`DbtProfileNotFound`,
        :class:`DbtExecutableNotFound`, or ``ConfigurationError`` naming a bad value.
        """
        project_dir, profile_name = _check_project(opts.get("project_dir") or self.project_dir)
        profile = self.profile or profile_name
        target = opts.get("target") or self.target
        profiles_dir = _check_profile(
            project_dir,
            opts.get("profiles_dir") or self.profiles_dir,
            profile,
            target,
        )
        executable = _resolve_executable(self.dbt_executable)
        # The fields have Field constraints; these check a call's own overrides too.
        threads = opts.get("threads", self.threads)
        if threads is not None and threads < 1:
            raise ConfigurationError("must be at least 1", field="threads", service=self.service)
        timeout = opts.get("timeout", self.timeout)
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("must be positive", field="timeout", service=self.service)
        variables = {**self.vars, **(opts.get("vars") or {})}
        try:
            json.dumps(variables)
        except TypeError as exc:
            raise ConfigurationError(f"must be JSON-serialisable: {exc}", field="vars") from exc
        return DbtSettings(
            project_dir=project_dir,
            profiles_dir=profiles_dir,
            profile=self.profile,
            target=target,
            executable=executable,
            vars=variables,
            full_refresh=opts.get("full_refresh", self.full_refresh),
            threads=threads,
            timeout=timeout,
        )

    # -- the call API ----------------------------------------------------------------------------

    def run_model(self, model: str, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt run --select <model>`` (any selector works: ``orders+``, ``tag:daily``)."""
        return self.invoke("run", select=model, **opts)

    def test_model(self, model: str, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt test --select <model>``: the model's tests. ``result.output`` has dbt's PASS
        lines, ``result.tests`` each test's status and failing row count."""
        return self.invoke("test", select=model, **opts)

    def run(self, select: str | None = None, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt run``; without ``select``, the project's default selection."""
        return self.invoke("run", select=select, **opts)

    def test(self, select: str | None = None, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt test``."""
        return self.invoke("test", select=select, **opts)

    def build(self, select: str | None = None, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt build``: seeds, models, snapshots and tests in dependency order."""
        return self.invoke("build", select=select, **opts)

    def seed(self, select: str | None = None, **opts: Unpack[DbtOptions]) -> DbtResult:
        """``dbt seed``."""
        return self.invoke("seed", select=select, **opts)

    def command_args(
        self, command: str, settings: DbtSettings, *, select: str | None, opts: DbtOptions
    ) -> list[str]:
        """The dbt command line of a call (the executable first)."""
        args = [settings.executable, *self.global_config_flags, command]
        if select:
            args += ["--select", select]
        if opts.get("exclude"):
            args += ["--exclude", str(opts["exclude"])]
        if opts.get("selector"):
            args += ["--selector", str(opts["selector"])]
        if settings.vars:
            args += ["--vars", json.dumps(settings.vars)]
        if settings.full_refresh and command in ("run", "build", "seed"):
            args.append("--full-refresh")
        if settings.threads is not None:
            args += ["--threads", str(settings.threads)]
        if settings.profile:
            args += ["--profile", settings.profile]
        if settings.target:
            args += ["--target", settings.target]
        args += list(opts.get("extra_args") or ())
        return args

    def retry_args(self, settings: DbtSettings, failed_target_path: Path) -> list[str]:
        """``dbt retry`` of the invocation whose target directory is ``failed_target_path``: it
        runs that invocation's failed and skipped nodes again, with its own arguments."""
        args = [settings.executable, *self.global_config_flags, "retry"]
        args += ["--state", str(failed_target_path)]
        if settings.vars:
            args += ["--vars", json.dumps(settings.vars)]
        if settings.threads is not None:
            args += ["--threads", str(settings.threads)]
        return args

    def invoke(
        self, command: str, *, select: str | None = None, **opts: Unpack[DbtOptions]
    ) -> DbtResult:
        """Run ``dbt <command>`` and return its result, or raise what went wrong.

        Emits ``flowstone.dbt.command`` and one ``flowstone.dbt.node`` per node. What goes
        wrong is ``DbtFailed`` (exit code, output, the command with its selection, target path,
        log path, invocation id, and the failed, skipped and succeeded nodes),
        ``DbtNothingSelected``, ``DbtWarehouseRejected``, ``CallTimeout``,
        ``DbtTransientFailure`` (after the resilience
        policy's retries: wrapped in ``MaxAttemptsExceeded``); with the resilience resource's
        ``dagster_errors`` on (the default, also with no ``resilience``) it is raised as Dagster
        control flow, a ``Failure`` (with ``flowstone/dbt.command/...`` metadata) or
        ``RetryRequested`` whose ``__cause__`` is that error. The set-up errors are raised as
        they are, before dbt starts.

        A retry after a transient failure runs ``dbt retry`` against the failed invocation (only
        its failed and skipped nodes run again) and the result merges both (see
        :class:`DbtResult`); when dbt failed before writing any result, the command runs again.
        """
        settings = self.settings(**opts)
        args = self.command_args(command, settings, select=select, opts=opts)
        selection = DbtSelection.from_args(args[2 + len(self.global_config_flags) :])
        allow_empty = opts.get("allow_empty", self.allow_empty)
        shown = ("dbt", *_describe_args(args[1:]))
        started = time.perf_counter()
        attempts = 0
        failed_before: DbtResult | None = None
        last_console = _Console()

        def attempt() -> DbtResult:
            nonlocal attempts, failed_before, last_console
            attempts += 1
            retrying = failed_before is not None and bool(failed_before.nodes)
            run_args = (
                self.retry_args(settings, failed_before.target_path)
                if failed_before is not None and retrying
                else args
            )
            result, last_console = self._invoke_once(
                settings,
                run_args,
                shown=shown,
                target_path=_new_target_path(settings.project_dir, command),
                started=started,
                attempt=attempts,
            )
            if failed_before is not None and retrying:
                result = merge_results(failed_before, result)
            error = transient_error(
                result, _failure_messages(last_console, result.nodes), service=self.service
            )
            if error is not None:
                failed_before = result
                raise error
            return result

        resilience = resolve(self.resilience)
        with (
            _dagster_errors(resilience, self.service),
            telemetry.span("flowstone.dbt.command", command=command, service=self.service) as call,
        ):
            try:
                result = resilience.call(self.service, attempt, dagster_errors=False)
            finally:
                call.attempts = max(attempts, 1)
                prune_target_dirs(settings.project_dir, keep=self.keep_target_dirs)
            emit_node_events(result.nodes)
            call.set(
                exit_code=result.exit_code,
                nodes=len(result.nodes),
                models_run=result.models_run,
                failed=len(result.failed_nodes),
                tests=len(result.tests),
            )
            raise_for_outcome(
                result,
                command,
                selection,
                unmatched=last_console.unmatched,
                nothing_selected=last_console.nothing_selected and not result.nodes,
                allow_empty=allow_empty,
                service=self.service,
            )
        return result

    def _invoke_once(
        self,
        settings: DbtSettings,
        args: Sequence[str],
        *,
        shown: tuple[str, ...],
        target_path: Path,
        started: float,
        attempt: int,
    ) -> tuple[DbtResult, _Console]:
        """One dbt process; raises only a timeout."""
        process = start_dbt(
            args,
            env=_dbt_env(settings, target_path),
            project_dir=settings.project_dir,
            target_path=target_path,
        )
        timeout = _effective_timeout(settings.timeout)
        console = _Console()
        with Watchdog(
            process, timeout, grace=self.kill_grace, on_fire=console.interrupted
        ) as watchdog:
            for event in read_events(process):
                console.add(event)
        exit_code = process.wait()
        if watchdog.fired:
            mark_failed(target_path)
            raise CallTimeout(
                f"`{' '.join(shown)}` did not finish within {timeout:g} s; dbt and its child "
                f"processes were stopped. dbt's last lines before the interrupt:\n"
                f"{console.last_lines()}\n(dbt's log: {target_path / 'dbt.log'})",
                timeout=timeout,
                service=self.service,
            )
        nodes = read_node_results(target_path, project_dir=settings.project_dir)
        result = DbtResult(
            command=shown,
            exit_code=exit_code,
            nodes=tuple(nodes),
            output=console.text,
            elapsed=time.perf_counter() - started,
            target_path=target_path,
            invocation_id=_invocation_id(target_path),
            attempts=attempt,
            warnings=tuple(console.unmatched),
        )
        if exit_code == 0:
            seed_partial_parse(settings.project_dir, target_path)
        if not result.success:
            mark_failed(target_path)
        return result, console

    # -- inside @dbt_assets ----------------------------------------------------------------------

    def cli_resource(self, settings: DbtSettings | None = None) -> DbtCliResource:
        """dagster-dbt's ``DbtCliResource`` with this resource's settings (cached).

        Its ``dbt_executable`` is a launcher (:func:`~.process.dbt_launcher`) that starts dbt in
        a session of its own, so that a timeout stops dbt and every process it started, and that
        answers ``dbt --version`` without starting dbt.
        """
        settings = settings or self.settings()
        key = (
            str(settings.project_dir),
            str(settings.profiles_dir),
            settings.profile or "",
            settings.target or "",
            settings.executable,
        )
        if key not in self._cli_resources:
            self._cli_resources[key] = DbtCliResource(
                project_dir=str(settings.project_dir),
                profiles_dir=str(settings.profiles_dir),
                profile=settings.profile,
                target=settings.target,
                dbt_executable=dbt_launcher(settings.executable),
                global_config_flags=list(self.global_config_flags),
            )
        return self._cli_resources[key]

    def stream(
        self,
        args: Sequence[str],
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        timeout: float | EllipsisType | None = ...,
        allow_empty: bool | None = None,
    ) -> DbtEventIterator[Any]:
        """``yield from dbt.stream(["build"], context=context)`` inside ``@dbt_assets``.

        Returns dagster-dbt's ``DbtEventIterator``, so ``.fetch_row_counts()`` and
        ``.fetch_column_metadata()`` chain as on ``DbtCliResource.cli(...).stream()``: the same
        Dagster events (selection, translator, asset checks), plus: a transient failure is
        retried through ``resilience`` (after the first node, with ``dbt retry``: only the
        failed and skipped nodes run again); a non-zero exit raises (as a Dagster
        ``Failure`` whose cause is ``DbtFailed``, with the failed nodes in its metadata);
        ``timeout`` (default: the resource's; ``None``: no limit) stops dbt and its children;
        telemetry events and ``flowstone/dbt.node/...`` metadata on each materialization. An
        asset subset with nothing of a kind to run (no seeds) is not an error; a ``--select``
        criterion that matches no node of the project, or a ``--selector`` that selects none,
        is (``allow_empty`` overrides, default the resource's).
        """
        from flowstone_dagster.dbt.assets import stream_dbt  # (it imports this module)

        return stream_dbt(context, self, args, timeout=timeout, allow_empty=allow_empty)


def _effective_timeout(timeout: float | None) -> float | None:
    """``timeout``, shortened to the resilience policy's per-attempt deadline, if any."""
    deadline = current_deadline()
    if deadline is None:
        return timeout
    return deadline.timeout(timeout)


def _invocation_id(target_path: Path) -> str | None:
    run_results = read_run_results(target_path) or {}
    value = run_results.get("metadata", {}).get("invocation_id")
    return str(value) if value else None
