"""One dbt command: its settings, environment, per-invocation target path and result."""

from __future__ import annotations

import functools
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
from typing import Any, TypedDict

import dagster as dg
import yaml
from dagster_dbt.compat import DBT_PYTHON_VERSION
from dagster_dbt.core.dbt_cli_event import DbtCliEventMessage
from packaging import version

from flowstone_dagster import telemetry
from flowstone_dagster.dbt.artifacts import (
    FAILED_STATUSES,
    DbtNodeResult,
)
from flowstone_dagster.dbt.errors import (
    DbtExecutableNotFound,
    DbtNothingSelected,
    DbtProfileNotFound,
    DbtProjectNotFound,
)
from flowstone_dagster.dbt.output import DbtOutputSummary, parse_dbt_output
from flowstone_dagster.dbt.process import (
    project_target_dir,
)
from flowstone_dagster.errors import ConfigurationError, DbtFailed, truncate
from flowstone_dagster.resilience import ResilienceResource

__all__ = ["DEFAULT_DBT_TIMEOUT", "DbtOptions", "DbtResult", "DbtSettings", "emit_node_events"]


#: Default limit of one dbt invocation, in seconds (an hour). ``timeout=None`` removes it.
DEFAULT_DBT_TIMEOUT = 3600.0

# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbtResult:
    """What one dbt command did, from its ``run_results.json``.

    ``nodes`` holds every model, seed, snapshot and test dbt reported, in dbt's order;
    ``output`` is dbt's console text (for people, and checks such as ``"PASS" in result.output``);
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
        return yaml.safe_load(path.read_text(encoding="utf-8"))
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
    """``failure`` with ``flowstone/dbt.command/exit_code`` and
    ``flowstone/dbt.command/failed/<unique id>`` metadata."""
    failed = {
        f"flowstone/dbt.command/failed/{node['unique_id']}": truncate(
            f"{node['status']}: {node.get('message') or ''} ({node.get('compiled_path')})", 500
        )
        for node in error.failed_nodes[:20]
    }
    enriched = dg.Failure(
        description=failure.description,
        metadata={**failure.metadata, "flowstone/dbt.command/exit_code": error.exit_code, **failed},
        allow_retries=failure.allow_retries,
    )
    enriched.__cause__ = failure.__cause__
    return enriched
