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
- the selection matches no node (dbt warns and exits 0): :class:`DbtNothingSelected`;
- a missing project, profile or dbt executable: :class:`DbtProjectNotFound`,
  :class:`DbtProfileNotFound`, :class:`DbtExecutableNotFound`, before dbt starts;
- ``timeout`` passes: dbt and every process it started are stopped (SIGINT, which makes dbt
  cancel its warehouse queries, then SIGKILL), and ``CallTimeout`` is raised;
- the warehouse refuses or drops the connection: :class:`DbtWarehouseUnreachable`, retried
  through ``resilience`` when one is configured. SQL errors and failing tests are not retried.

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
construction, not an error naming the field at set-up, and it cannot see per-call overrides), its
``cli()`` starts dbt in the caller's process group (a timeout could not stop dbt's children), and
it opens a dbt adapter in the calling process on every call (about 0.3 s; useful only for
column metadata in ``@dbt_assets``). ``DbtResource`` keeps the same configuration fields, builds
a ``DbtCliResource`` for ``@dbt_assets`` streaming (:meth:`cli_resource`), and runs plain calls
through dagster-dbt's ``DbtCliInvocation`` in a process group of their own.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Unpack

import dagster as dg
from dagster_dbt import DbtCliResource
from pydantic import Field, PrivateAttr, model_validator

from flowstone_dagster import telemetry
from flowstone_dagster.dbt.artifacts import (
    read_node_results,
    read_run_results,
)
from flowstone_dagster.dbt.errors import (
    DbtWarehouseUnreachable,
    all_transient,
)
from flowstone_dagster.dbt.invocation import (
    DEFAULT_DBT_TIMEOUT,
    DbtOptions,
    DbtResult,
    DbtSettings,
    _check_profile,
    _check_project,
    _cli_version,
    _Console,
    _dagster_errors,
    _dbt_env,
    _describe_args,
    _failure_messages,
    _new_target_path,
    _raise_for_outcome,
    _resolve_executable,
    emit_node_events,
)
from flowstone_dagster.dbt.process import (
    DEFAULT_KILL_GRACE,
    GroupedDbtCliInvocation,
    Watchdog,
    seed_partial_parse,
)
from flowstone_dagster.errors import CallTimeout, ConfigurationError
from flowstone_dagster.resilience import ResilienceResource, current_deadline, resolve

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

    def invoke(
        self, command: str, *, select: str | None = None, **opts: Unpack[DbtOptions]
    ) -> DbtResult:
        """Run ``dbt <command>`` and return its result, or raise what went wrong.

        Emits ``flowstone.dbt.command`` and one ``flowstone.dbt.node`` per node. What goes
        wrong is ``DbtFailed`` (exit code, output, failed nodes), ``DbtNothingSelected``,
        ``CallTimeout``, ``DbtWarehouseUnreachable`` (after the resilience policy's retries:
        wrapped in ``MaxAttemptsExceeded``); with the resilience resource's ``dagster_errors``
        on (the default, also with no ``resilience``) it is raised as Dagster control flow, a
        ``Failure`` (with ``flowstone/dbt.command/failed/...`` metadata) or ``RetryRequested`` whose
        ``__cause__`` is that error. The set-up errors are raised as they are, before dbt starts.
        """
        settings = self.settings(**opts)
        args = self.command_args(command, settings, select=select, opts=opts)
        started = time.perf_counter()
        attempts = 0

        def attempt() -> DbtResult:
            nonlocal attempts
            attempts += 1
            return self._invoke_once(
                settings,
                args,
                target_path=_new_target_path(settings.project_dir, command),
                started=started,
                attempt=attempts,
            )

        resilience = resolve(self.resilience)
        with (
            _dagster_errors(resilience, self.service),
            telemetry.span("flowstone.dbt.command", command=command, service=self.service) as call,
        ):
            try:
                result = resilience.call(self.service, attempt, dagster_errors=False)
            finally:
                call.attempts = max(attempts, 1)
            emit_node_events(result.nodes)
            call.set(
                exit_code=result.exit_code,
                nodes=len(result.nodes),
                models_run=result.models_run,
                failed=len(result.failed_nodes),
                tests=len(result.tests),
            )
            _raise_for_outcome(result, command, select)
        return result

    def _invoke_once(
        self,
        settings: DbtSettings,
        args: Sequence[str],
        *,
        target_path: Path,
        started: float,
        attempt: int,
    ) -> DbtResult:
        """One dbt process; raises only timeouts and connection failures (the retryable)."""
        shown = _describe_args(args[1:])
        invocation = GroupedDbtCliInvocation.start(
            args,
            env=_dbt_env(settings, target_path),
            project_dir=settings.project_dir,
            target_path=target_path,
            cli_version=_cli_version(settings.executable),
        )
        timeout = _effective_timeout(settings.timeout)
        console = _Console()
        with Watchdog(invocation.process, timeout, grace=self.kill_grace) as watchdog:
            for event in invocation.stream_raw_events():
                console.add(event)
        exit_code = invocation.process.wait()
        if watchdog.fired:
            tail = "\n".join(console.text.strip().splitlines()[-5:])
            raise CallTimeout(
                f"`dbt {' '.join(shown)}` did not finish within {timeout:g} s; dbt and its child "
                f"processes were stopped. Last output:\n{tail}",
                timeout=timeout,
                service=self.service,
            )
        nodes = read_node_results(target_path, project_dir=settings.project_dir)
        result = DbtResult(
            command=("dbt", *shown),
            exit_code=exit_code,
            nodes=tuple(nodes),
            output=console.text,
            elapsed=time.perf_counter() - started,
            target_path=target_path,
            invocation_id=_invocation_id(target_path),
            attempts=attempt,
            warnings=tuple(console.unmatched),
        )
        if exit_code != 0 and all_transient(_failure_messages(console, nodes)):
            raise DbtWarehouseUnreachable(
                f"`dbt {' '.join(shown)}` could not reach the warehouse: "
                f"{_failure_messages(console, nodes)[0]}",
                exit_code=exit_code,
                output=console.text,
                failed_nodes=[node.as_dict() for node in nodes if node.failed],
                service=self.service,
            )
        if exit_code == 0:
            seed_partial_parse(settings.project_dir, target_path)
        return result

    # -- inside @dbt_assets ----------------------------------------------------------------------

    def cli_resource(self, settings: DbtSettings | None = None) -> DbtCliResource:
        """dagster-dbt's ``DbtCliResource`` with this resource's settings (cached)."""
        settings = settings or self.settings()
        key = (
            str(settings.project_dir),
            str(settings.profiles_dir),
            settings.profile or "",
            settings.target or "",
            settings.executable,
        )
        if key not in self._cli_resources:
            cli = DbtCliResource(
                project_dir=str(settings.project_dir),
                profiles_dir=str(settings.profiles_dir),
                profile=settings.profile,
                target=settings.target,
                dbt_executable=settings.executable,
                global_config_flags=list(self.global_config_flags),
            )
            # DbtCliResource learns dbt's version by running `dbt --version`, which also asks
            # PyPI for the latest release (a network call, up to a second). The installed
            # dbt-core already says which version runs; fill in the cached answer.
            cli.__dict__["_cli_version"] = _cli_version(settings.executable)
            self._cli_resources[key] = cli
        return self._cli_resources[key]

    def stream(
        self,
        args: Sequence[str],
        *,
        context: dg.AssetExecutionContext | dg.OpExecutionContext,
        timeout: float | None = None,
    ) -> Iterator[Any]:
        """``yield from dbt.stream(["build"], context=context)`` inside ``@dbt_assets``.

        The same Dagster events as ``DbtCliResource.cli(args, context=context).stream()``
        (selection, translator, asset checks), plus: a connection failure before any node
        started is retried through ``resilience``; a non-zero exit raises (as a Dagster
        ``Failure`` whose cause is ``DbtFailed``, with the failed nodes in its metadata);
        ``timeout`` (default: the resource's) stops dbt and its children; telemetry events and
        ``flowstone/dbt.node/...`` metadata on each materialization.
        """
        from flowstone_dagster.dbt.assets import stream_dbt  # (it imports this module)

        yield from stream_dbt(context, self, args, timeout=timeout)


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
