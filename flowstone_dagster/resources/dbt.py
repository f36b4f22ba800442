"""``DbtResource``: run, test, build and seed dbt from Dagster, with results you can act on.

::

    import dagster as dg
    from flowstone_dagster.resources.dbt import DbtResource

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

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypedDict, Unpack

import dagster as dg
from dagster_dbt import DbtCliResource
from dagster_dbt.compat import DBT_PYTHON_VERSION
from dagster_dbt.core.dbt_cli_event import DbtCliEventMessage
from dagster_dbt.core.dbt_cli_invocation import DbtCliInvocation
from dagster_shared.yaml_utils import safe_load_yaml
from packaging import version
from pydantic import Field, PrivateAttr

from flowstone_dagster import telemetry
from flowstone_dagster.errors import CallTimeout, ConfigurationError, DbtFailed, truncate
from flowstone_dagster.resilience import ResilienceResource, current_deadline, resolve
from flowstone_dagster.resources.dbt_artifacts import (
    FAILED_STATUSES,
    DbtNodeResult,
    read_node_results,
    read_run_results,
)
from flowstone_dagster.resources.dbt_errors import (
    DbtExecutableNotFound,
    DbtNothingSelected,
    DbtProfileNotFound,
    DbtProjectNotFound,
    DbtWarehouseUnreachable,
    all_transient,
)
from flowstone_dagster.resources.dbt_output import DbtOutputSummary, parse_dbt_output
from flowstone_dagster.resources.dbt_process import (
    DEFAULT_KILL_GRACE,
    GroupedDbtCliInvocation,
    Watchdog,
    project_target_dir,
    seed_partial_parse,
)

__all__ = [
    "DEFAULT_DBT_TIMEOUT",
    "DbtOptions",
    "DbtResource",
    "DbtResult",
    "DbtSettings",
    "emit_node_events",
    "stream_dbt",
]

#: Default limit of one dbt invocation, in seconds (an hour). ``timeout=None`` removes it.
DEFAULT_DBT_TIMEOUT = 3600.0

# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbtResult:
    """What one dbt command did, from its ``run_results.json``.

    ``nodes`` holds every model, seed, snapshot and test dbt reported, in dbt's order;
    ``output`` is dbt's console text (for people: the brief's ``"PASS" in result.output``);
    ``elapsed`` the wall time of the call in seconds (all attempts); ``attempts`` how many times
    dbt was started (more than 1 after retried connection failures); ``warnings`` dbt's warnings
    (a selection criterion matching nothing next to others that matched).
    """

    command: tuple[str, ...]
    exit_code: int
    nodes: tuple[DbtNodeResult, ...]
    output: str
    elapsed: float
    target_path: Path
    invocation_id: str | None = None
    attempts: int = 1
    warnings: tuple[str, ...] = ()

    @property
    def success(self) -> bool:
        """dbt exited 0 and no node failed."""
        return self.exit_code == 0 and not any(node.failed for node in self.nodes)

    @property
    def models_run(self) -> int:
        """Models dbt executed (succeeded or failed; skipped ones are not counted)."""
        return sum(1 for n in self.nodes if n.resource_type == "model" and n.status != "skipped")

    @property
    def errors(self) -> list[str]:
        """One line per failed node (``"model.shop.orders: <dbt's message>"``); empty on success."""
        return [f"{n.unique_id}: {n.message or n.status}" for n in self.nodes if n.failed]

    @property
    def failed_nodes(self) -> list[DbtNodeResult]:
        """The nodes dbt reports as failed."""
        return [node for node in self.nodes if node.failed]

    @property
    def tests(self) -> list[DbtNodeResult]:
        """The data and unit tests of the command, with their status and failing row count."""
        return [node for node in self.nodes if node.resource_type in ("test", "unit_test")]

    def count(self, status: str) -> int:
        """Nodes with ``status`` (``"success"``, ``"pass"``, ``"fail"``, ``"skipped"``, ...)."""
        return sum(1 for node in self.nodes if node.status == status)

    def summary(self) -> DbtOutputSummary:
        """:func:`parse_dbt_output` of :attr:`output` (what the console said)."""
        return parse_dbt_output(self.output)


# -- settings --------------------------------------------------------------------------------------


class DbtOptions(TypedDict, total=False):
    """Per-call options of :class:`DbtResource`'s methods (each overrides the resource's field).

    ``exclude``: dbt's ``--exclude``; ``vars``: ``--vars`` (a dict, sent as JSON);
    ``full_refresh``: ``--full-refresh``; ``threads``: ``--threads``; ``timeout``: seconds (None:
    no limit); ``target``, ``project_dir``, ``profiles_dir``: as the resource's fields;
    ``extra_args``: more dbt arguments, appended as given.
    """

    exclude: str | None
    vars: Mapping[str, Any] | None
    full_refresh: bool
    threads: int | None
    timeout: float | None
    target: str | None
    project_dir: str
    profiles_dir: str | None
    extra_args: Sequence[str]


@dataclass(frozen=True)
class DbtSettings:
    """Validated, resolved settings of one call (see :meth:`DbtResource.settings`)."""

    project_dir: Path
    profiles_dir: Path
    profile: str | None
    target: str | None
    executable: str
    vars: Mapping[str, Any] = field(default_factory=dict)
    full_refresh: bool = False
    threads: int | None = None
    timeout: float | None = DEFAULT_DBT_TIMEOUT


def _resolve_executable(name: str) -> str:
    """``name`` as an absolute path: itself, on ``PATH``, or next to the running Python."""
    if os.sep in name:
        path = Path(name).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.resolve())
        raise DbtExecutableNotFound(
            f"{name} is not an executable file; point dbt_executable at the dbt program",
            field="dbt_executable",
            service="dbt",
        )
    found = shutil.which(name)
    if found:
        return found
    beside_python = Path(sys.executable).parent / name
    if beside_python.is_file() and os.access(beside_python, os.X_OK):
        return str(beside_python)
    raise DbtExecutableNotFound(
        f"{name!r} is neither on PATH nor in {beside_python.parent}; install dbt-core and an "
        "adapter (pip install 'flowstone-dagster[dbt]') or set dbt_executable to its path",
        field="dbt_executable",
        service="dbt",
    )


def _read_yaml(path: Path, what: str, field_name: str) -> Any:
    try:
        return safe_load_yaml(path.read_text(encoding="utf-8"))
    except Exception as exc:  # unreadable, or not YAML: either way the file needs fixing
        raise ConfigurationError(
            f"cannot read {what} {path}: {exc}", field=field_name, service="dbt"
        ) from exc


def _check_project(project_dir: str) -> tuple[Path, str | None]:
    """The project's absolute directory and its ``profile:`` name."""
    path = Path(project_dir).expanduser().resolve()
    if not (path / "dbt_project.yml").is_file():
        where = "does not exist" if not path.exists() else "holds no dbt_project.yml"
        raise DbtProjectNotFound(
            f"{path} {where}; set project_dir to the directory of your dbt_project.yml",
            field="project_dir",
            service="dbt",
        )
    project = _read_yaml(path / "dbt_project.yml", "dbt project file", "project_dir") or {}
    profile = project.get("profile") if isinstance(project, dict) else None
    return path, str(profile) if profile else None


def _profiles_candidates(project_dir: Path, profiles_dir: str | None) -> list[Path]:
    """Where dbt looks for profiles.yml, in dbt's order."""
    if profiles_dir:
        return [Path(profiles_dir).expanduser().resolve()]
    from_env = os.environ.get("DBT_PROFILES_DIR")
    if from_env:
        return [Path(from_env).expanduser().resolve()]
    return [project_dir, Path.home() / ".dbt"]


def _check_profile(
    project_dir: Path, profiles_dir: str | None, profile: str | None, target: str | None
) -> Path:
    """The directory of the ``profiles.yml`` that has ``profile`` (and ``target``)."""
    candidates = _profiles_candidates(project_dir, profiles_dir)
    found = next((d for d in candidates if (d / "profiles.yml").is_file()), None)
    field_name = "profiles_dir"
    if found is None:
        searched = ", ".join(str(d) for d in candidates)
        raise DbtProfileNotFound(
            f"no profiles.yml in {searched}; set profiles_dir to the directory holding the "
            "profiles.yml with your warehouse connection",
            field=field_name,
            service="dbt",
        )
    profiles = _read_yaml(found / "profiles.yml", "profiles file", field_name) or {}
    if profile is None or "{{" in profile or not isinstance(profiles, dict):
        return found  # a templated profile name is dbt's to resolve
    if profile not in profiles:
        known = ", ".join(sorted(k for k in profiles if k != "config")) or "none"
        raise DbtProfileNotFound(
            f"{found / 'profiles.yml'} has no profile {profile!r} (it has: {known}); add it "
            "or set `profile`",
            field="profile",
            service="dbt",
        )
    entry = profiles[profile] if isinstance(profiles[profile], dict) else {}
    outputs = entry.get("outputs") if isinstance(entry.get("outputs"), dict) else {}
    wanted = target or entry.get("target")
    if wanted and "{{" not in str(wanted) and outputs and wanted not in outputs:
        raise DbtProfileNotFound(
            f"profile {profile!r} in {found / 'profiles.yml'} has no target {wanted!r} "
            f"(it has: {', '.join(sorted(outputs))})",
            field="target",
            service="dbt",
        )
    return found


@functools.cache
def _cli_version(executable: str) -> version.Version:
    """dbt's version: the installed dbt-core's, else what ``<executable> --version`` says."""
    if DBT_PYTHON_VERSION is not None:
        return DBT_PYTHON_VERSION
    output = subprocess.run(
        [executable, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout
    match = re.search(r"(\d+\.\d+\.\d+)", output)
    return version.parse(match.group(1)) if match else version.parse("1.11.0")


def _describe_args(args: Sequence[str]) -> tuple[str, ...]:
    """The dbt arguments for messages and telemetry, with ``--vars`` values hidden."""
    shown: list[str] = []
    hide_next = False
    for arg in args:
        if hide_next:
            shown.append("<vars>")
            hide_next = False
        else:
            shown.append(arg)
            hide_next = arg == "--vars"
    return tuple(shown)


# -- one invocation --------------------------------------------------------------------------------


@dataclass
class _Console:
    """dbt's JSON log events, turned back into the console text a person would have seen."""

    lines: list[str] = field(default_factory=list)
    error_messages: list[str] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)
    nothing_to_do: bool = False
    node_started: bool = False

    def add(self, event: DbtCliEventMessage) -> None:
        info = event.raw_event.get("info", {})
        name = info.get("name", "")
        message = str(info.get("msg", ""))
        stamp = str(info.get("ts", ""))[11:19]
        self.lines.append(f"{stamp}  {message}" if stamp else message)
        if info.get("level") == "error":
            self.error_messages.append(message)
        if name == "NoNodesForSelectionCriteria":
            self.unmatched.append(message)
        elif name == "NothingToDo":
            self.nothing_to_do = True
        elif name in ("NodeStart", "LogStartLine"):
            self.node_started = True

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")


def _failure_messages(console: _Console, nodes: Sequence[DbtNodeResult]) -> list[str]:
    failed = [node.message or node.status for node in nodes if node.status in FAILED_STATUSES]
    return failed or console.error_messages


def _new_target_path(project_dir: Path, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return project_target_dir(project_dir) / f"flowstone-{command}-{stamp}-{uuid.uuid4().hex[:8]}"


def _dbt_env(settings: DbtSettings, target_path: Path) -> dict[str, str]:
    """The environment dagster-dbt gives dbt, plus plain (uncoloured) messages."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "DAGSTER_DBT_CLI": "true",
        "DBT_SEND_ANONYMOUS_USAGE_STATS": "false",
        "DBT_LOG_FORMAT": "json",
        "DBT_USE_COLORS": "false",
        "DBT_TARGET_PATH": str(target_path),
        "DBT_LOG_PATH": str(target_path),
        "DBT_PROFILES_DIR": str(settings.profiles_dir),
        "DBT_PROJECT_DIR": str(settings.project_dir),
    }


def _node_measures(node: DbtNodeResult) -> dict[str, Any]:
    measures: dict[str, Any] = {
        "unique_id": node.unique_id,
        "resource_type": node.resource_type,
        "status": node.status,
        "execution_time_s": round(node.execution_time, 6),
    }
    if node.rows_affected is not None:
        measures["rows_affected"] = node.rows_affected
    if node.failures is not None:
        measures["failures"] = node.failures
    return measures


def emit_node_events(nodes: Sequence[DbtNodeResult]) -> None:
    """One ``flowstone.dbt.node`` event per node (outcome ``ok``, ``error`` or ``skipped``)."""
    for node in nodes:
        outcome = "error" if node.failed else "skipped" if node.status == "skipped" else "ok"
        telemetry.emit(
            "flowstone.dbt.node",
            outcome=outcome,
            duration_s=node.execution_time,
            **_node_measures(node),
        )


#: Commands that execute nodes: for them, running no node means the selection matched nothing.
_NODE_COMMANDS = frozenset({"run", "test", "build", "seed", "snapshot"})


def _raise_for_outcome(result: DbtResult, command: str, selection: str | None) -> None:
    """Raise what the result means, if it is not a success."""
    shown = " ".join(result.command)
    if result.exit_code != 0 or any(node.failed for node in result.nodes):
        failed = result.failed_nodes
        if failed:
            detail = "; ".join(f"{n.name} ({n.status}): {n.message or ''}" for n in failed[:5])
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
            message = f"`{shown}` failed with exit code {result.exit_code}: {detail}{more}"
        else:
            errors = result.summary().errors or result.output.strip().splitlines() or ["no output"]
            message = f"`{shown}` failed with exit code {result.exit_code}: {errors[-1]}"
        raise DbtFailed(
            truncate(message, 2000),
            exit_code=result.exit_code,
            output=result.output,
            failed_nodes=[node.as_dict() for node in failed],
        )
    if not result.nodes and command in _NODE_COMMANDS:
        what = f"select {selection!r}" if selection else "the default selection"
        raise DbtNothingSelected(
            f"`{shown}` ran nothing: dbt could not find any node matching {what} "
            "(dbt warned and exited 0); check the model name, or the select/exclude arguments",
            exit_code=result.exit_code,
            output=result.output,
        )


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
        default=None, description="--threads for every call. Null: the profile's setting."
    )
    full_refresh: bool = Field(
        default=False, description="Pass --full-refresh to run, build and seed by default."
    )
    timeout: float | None = Field(
        default=DEFAULT_DBT_TIMEOUT,
        description="Seconds one dbt invocation may take before dbt and its children are "
        "stopped and CallTimeout is raised. Null: no limit.",
    )
    kill_grace: float = Field(
        default=DEFAULT_KILL_GRACE,
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
        default="dbt", description="Name in errors, telemetry and the resilience policy."
    )
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
        threads = opts.get("threads", self.threads)
        if threads is not None and threads < 1:
            raise ConfigurationError("must be at least 1", field="threads", service=self.service)
        timeout = opts.get("timeout", self.timeout)
        if timeout is not None and timeout <= 0:
            raise ConfigurationError("must be positive", field="timeout", service=self.service)
        if self.kill_grace < 0:
            raise ConfigurationError("must not be negative", field="kill_grace")
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
        ``Failure`` (with ``dbt/failed/...`` metadata) or ``RetryRequested`` whose
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


# -- @dbt_assets -----------------------------------------------------------------------------------


def _with_node_metadata(dagster_event: Any, event: DbtCliEventMessage, attempt: int) -> Any:
    """Add ``flowstone/dbt.node/...`` metadata from the node's result event to its Dagster event.

    dbt's result events (``LogModelResult``, ``LogSeedResult``, ``LogTestResult``, ...) carry the
    node's status, execution time and the adapter's message (``INSERT 5``, ``OK``).
    """
    data = event.raw_event.get("data", {})
    # node_status is run_results.json's word ("success", "pass"); data.status the console's ("OK").
    status = (data.get("node_info") or {}).get("node_status") or data.get("status")
    if not status or not hasattr(dagster_event, "with_metadata"):
        return dagster_event
    metadata: dict[str, Any] = {
        "flowstone/dbt.node/status": str(status),
        "flowstone/dbt.command/attempts": attempt,
    }
    if isinstance(data.get("execution_time"), (int, float)):
        metadata["flowstone/dbt.node/execution_time_s"] = round(data["execution_time"], 6)
    if data.get("result_message"):
        metadata["flowstone/dbt.node/message"] = str(data["result_message"])
    existing = dict(getattr(dagster_event, "metadata", None) or {})
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


@contextmanager
def _dagster_errors(resilience: ResilienceResource, service: str) -> Iterator[None]:
    """The one mapping of a dbt call's errors to Dagster control flow.

    ``resilience.dagster_retries`` (so the resource's ``dagster_errors`` decides, default on;
    with no resilience configured, :func:`~flowstone_dagster.resilience.resolve`'s default): a
    ``Failure`` (allow_retries as the error is retryable) or a ``RetryRequested``. A
    ``Failure`` caused by ``DbtFailed`` also carries the exit code and the failed nodes.
    """
    try:
        with resilience.dagster_retries(service=service):
            yield
    except dg.Failure as failure:
        cause = failure.__cause__
        if not isinstance(cause, DbtFailed):
            raise
        raise _with_failed_nodes(failure, cause)  # noqa: B904 - carries its own (redacted) cause


def _with_failed_nodes(failure: dg.Failure, error: DbtFailed) -> dg.Failure:
    """``failure`` with ``dbt/exit_code`` and ``dbt/failed/<unique id>`` metadata."""
    failed = {
        f"dbt/failed/{node['unique_id']}": truncate(
            f"{node['status']}: {node.get('message') or ''} ({node.get('compiled_path')})", 500
        )
        for node in error.failed_nodes[:20]
    }
    enriched = dg.Failure(
        description=failure.description,
        metadata={**failure.metadata, "dbt/exit_code": error.exit_code, **failed},
        allow_retries=failure.allow_retries,
    )
    enriched.__cause__ = failure.__cause__
    return enriched
