"""One dbt command: its settings, environment, per-invocation target path and result."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict

import dagster as dg
import yaml

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
    DbtTransientFailure,
    DbtWarehouseRejected,
    DbtWarehouseUnreachable,
    classify_failure,
)
from flowstone_dagster.dbt.output import DbtOutputSummary, parse_dbt_output
from flowstone_dagster.dbt.process import (
    project_target_dir,
)
from flowstone_dagster.errors import ConfigurationError, DbtFailed, truncate
from flowstone_dagster.resilience import ResilienceResource

__all__ = [
    "DEFAULT_DBT_TIMEOUT",
    "DbtOptions",
    "DbtResult",
    "DbtSelection",
    "DbtSettings",
    "emit_node_events",
    "first_useful_lines",
    "raise_for_outcome",
    "transient_error",
]


#: Default limit of one dbt invocation, in seconds (an hour). ``timeout=None`` removes it.
DEFAULT_DBT_TIMEOUT = 3600.0

# -- results ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DbtResult:
    """What one dbt command did, from its ``run_results.json``.

    ``nodes`` holds every model, seed, snapshot and test dbt reported, in dbt's order;
    ``output`` is dbt's console text (for people, and checks such as ``"PASS" in result.output``);
    ``elapsed`` the wall time of the call in seconds (all attempts); ``attempts`` how many times
    dbt was started (more than 1 after retried transient failures); ``warnings`` dbt's warnings
    (a selection criterion matching nothing next to others that matched).

    After a retry, ``nodes`` merges both invocations (each node's latest result: the retry ran
    ``dbt retry``, so only the failed and skipped nodes ran again); ``previous`` is the earlier
    attempt's own result, ``target_path`` and ``invocation_id`` are the last invocation's.
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
    previous: DbtResult | None = None

    @property
    def log_path(self) -> Path:
        """dbt's debug log of the (last) invocation."""
        return self.target_path / "dbt.log"

    @property
    def skipped_nodes(self) -> list[DbtNodeResult]:
        """The nodes dbt skipped (downstream of a failure)."""
        return [node for node in self.nodes if node.status == "skipped"]

    @property
    def succeeded_nodes(self) -> list[DbtNodeResult]:
        """The nodes that neither failed nor were skipped (``success``, ``pass``, ``warn``...)."""
        return [node for node in self.nodes if not node.failed and node.status != "skipped"]

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

    ``exclude``: dbt's ``--exclude``; ``selector``: ``--selector`` (a selector of
    ``selectors.yml``); ``allow_empty``: an explicit selection that matches nothing is not an
    error (see :class:`DbtNothingSelected`); ``vars``: ``--vars`` (a dict, sent as JSON);
    ``full_refresh``: ``--full-refresh``; ``threads``: ``--threads``; ``timeout``: seconds (None:
    no limit); ``target``, ``project_dir``, ``profiles_dir``: as the resource's fields;
    ``extra_args``: more dbt arguments, appended as given.
    """

    exclude: str | None
    selector: str | None
    allow_empty: bool
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
    nothing_selected: bool = False
    node_started: bool = False
    #: How many lines dbt had written when the timeout fired (its interrupt output follows).
    lines_at_interrupt: int | None = None

    def add(self, raw_event: Mapping[str, Any]) -> None:
        info = raw_event.get("info") or {}
        name = info.get("name", "")
        message = str(info.get("msg", ""))
        stamp = str(info.get("ts", ""))[11:19]
        self.lines.append(f"{stamp}  {message}" if stamp else message)
        if info.get("level") == "error":
            self.error_messages.append(message)
        if name == "NoNodesForSelectionCriteria":
            self.unmatched.append(message)
        elif name in ("NothingToDo", "NoNodesSelected"):
            self.nothing_selected = True
        elif name in ("NodeStart", "LogStartLine"):
            self.node_started = True

    def interrupted(self) -> None:
        if self.lines_at_interrupt is None:
            self.lines_at_interrupt = len(self.lines)

    def last_lines(self, count: int = 5) -> str:
        """dbt's last lines before the interrupt (its ``KeyboardInterrupt`` output is noise)."""
        end = len(self.lines) if self.lines_at_interrupt is None else self.lines_at_interrupt
        kept = [line for line in self.lines[:end] if line.strip()]
        return "\n".join(kept[-count:]) or "(no output)"

    @property
    def text(self) -> str:
        return "\n".join(self.lines) + ("\n" if self.lines else "")


def _failure_messages(console: _Console, nodes: Sequence[DbtNodeResult]) -> list[str]:
    failed = [node.message or node.status for node in nodes if node.status in FAILED_STATUSES]
    return failed or console.error_messages


_TRACEBACK_START = "Traceback (most recent call last):"


def first_useful_lines(message: str, count: int = 3, width: int = 300) -> str:
    """The lines of an adapter error a person needs: without Python tracebacks (an adapter's
    error can embed one of many kilobytes), at most ``count`` lines of ``width`` characters."""
    lines = message.splitlines()
    kept: list[str] = []
    frame_indent: int | None = None  # inside a traceback: its frames are indented deeper
    for line in lines:
        indent = len(line) - len(line.lstrip())
        if line.strip() == _TRACEBACK_START:
            frame_indent = indent
            continue
        if frame_indent is not None and (indent > frame_indent or not line.strip()):
            continue  # a frame, or its source line
        frame_indent = None
        if line.strip().startswith(("The above exception", "During handling")):
            continue
        kept.append(line)
    lines = kept
    useful = [line.strip() for line in lines if line.strip()]
    shown = [truncate(line, width) for line in useful[:count]]
    if len(useful) > count:
        shown.append(f"... ({len(useful) - count} more lines)")
    return "\n".join(shown)


def _new_target_path(project_dir: Path, command: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    name = f"{TARGET_DIR_PREFIX}{command}-{stamp}-{uuid.uuid4().hex[:8]}"
    return project_target_dir(project_dir) / name


#: Prefix of the per-invocation target directories flowstone creates (and prunes).
TARGET_DIR_PREFIX = "flowstone-"
#: Marker file in the target directory of an invocation that failed.
_FAILED_MARKER = ".flowstone-failed"


def mark_failed(target_path: Path) -> None:
    """Mark ``target_path`` as a failed invocation's (kept longer: ``dbt retry`` needs it)."""
    with contextlib.suppress(OSError):
        target_path.mkdir(parents=True, exist_ok=True)
        (target_path / _FAILED_MARKER).touch()


def prune_target_dirs(project_dir: Path, *, keep: int) -> None:
    """Remove flowstone's per-invocation target directories of ``project_dir`` but the newest
    ``keep``, and the newest ``keep`` of failed invocations. Best effort: a directory another
    process is using or removing is left alone."""
    root = project_target_dir(project_dir)
    try:
        found = [
            (entry.stat().st_mtime, entry)
            for entry in root.iterdir()
            if entry.name.startswith(TARGET_DIR_PREFIX) and entry.is_dir()
        ]
    except OSError:
        return
    found.sort(reverse=True)
    failed = [path for _, path in found if (path / _FAILED_MARKER).exists()]
    kept = {path for _, path in found[:keep]} | set(failed[:keep])
    for _, path in found:
        if path not in kept:
            shutil.rmtree(path, ignore_errors=True)


def merge_results(previous: DbtResult, latest: DbtResult) -> DbtResult:
    """``latest`` (a ``dbt retry`` of ``previous``) with every node's latest result, in
    ``previous``'s order; ``output`` holds both invocations' console text."""
    latest_by_id = {node.unique_id: node for node in latest.nodes}
    nodes = [latest_by_id.pop(node.unique_id, node) for node in previous.nodes]
    nodes += latest_by_id.values()
    return replace(
        latest,
        nodes=tuple(nodes),
        output=previous.output + latest.output,
        warnings=tuple(dict.fromkeys(previous.warnings + latest.warnings)),
        previous=previous,
    )


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


# -- selections -------------------------------------------------------------------------------

_SELECT_FLAGS = {"--select": "select", "-s": "select", "--models": "select", "-m": "select"}
_SELECTION_FLAGS = {**_SELECT_FLAGS, "--exclude": "exclude", "--selector": "selector"}
#: Selection methods whose result depends on state: nothing modified is a normal outcome.
_STATEFUL_METHODS = ("state:", "result:", "source_status:")
_UNMATCHED_CRITERION = re.compile(r"criterion '([^']*)' does not match")


@dataclass(frozen=True)
class DbtSelection:
    """The selection arguments of one dbt command line (each a list of criteria)."""

    select: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    selector: tuple[str, ...] = ()

    @classmethod
    def from_args(cls, args: Sequence[str]) -> DbtSelection:
        """``--select``/``-s``/``--models``/``-m``, ``--exclude`` and ``--selector`` of ``args``
        (each flag takes every following value up to the next flag, as dbt reads them)."""
        found: dict[str, list[str]] = {"select": [], "exclude": [], "selector": []}
        current: str | None = None
        for arg in args:
            flag, _, inline = arg.partition("=")
            if flag in _SELECTION_FLAGS:
                current = _SELECTION_FLAGS[flag]
                if inline:
                    found[current].extend(inline.split())
                continue
            if arg.startswith("-"):
                current = None
            elif current is not None:
                found[current].extend(arg.split())
        return cls(*(tuple(found[key]) for key in ("select", "exclude", "selector")))

    @property
    def explicit(self) -> bool:
        return bool(self.select or self.exclude or self.selector)

    @property
    def stateful(self) -> bool:
        return any(method in criterion for criterion in self.select for method in _STATEFUL_METHODS)

    def describe(self) -> str:
        parts = [
            f"{name} {' '.join(values)!r}"
            for name, values in (
                ("select", self.select),
                ("exclude", self.exclude),
                ("selector", self.selector),
            )
            if values
        ]
        return ", ".join(parts) or "the default selection"


def _emptied_by(
    selection: DbtSelection, unmatched: Sequence[str], command: str, *, subset: bool
) -> tuple[str, str] | None:
    """Which argument emptied an explicit selection, and why; ``None`` when an empty result is
    normal (no explicit selection, a ``state:`` selection, an asset subset's intersection)."""
    missing = {m.group(1) for text in unmatched for m in _UNMATCHED_CRITERION.finditer(text)}
    if not selection.explicit or selection.stateful:
        return None
    typos = [criterion for criterion in selection.select if criterion in missing]
    if typos:
        names = ", ".join(repr(criterion) for criterion in typos)
        return "select", f"select {names} matches no enabled node (check the name)"
    if selection.selector:
        return "selector", f"selector {' '.join(selection.selector)!r} selects no node"
    if subset:
        return None  # dagster-dbt intersected it with the asset subset: legitimately empty
    if selection.exclude and selection.select:
        return "exclude", (
            f"exclude {' '.join(selection.exclude)!r} removed every node that select "
            f"{' '.join(selection.select)!r} matched"
        )
    if selection.exclude:
        return "exclude", f"exclude {' '.join(selection.exclude)!r} removed every node"
    return "select", (
        f"select {' '.join(selection.select)!r} matches no node that `dbt {command}` runs"
    )


# -- outcomes ----------------------------------------------------------------------------------


def _node_dicts(nodes: Sequence[DbtNodeResult]) -> list[dict[str, Any]]:
    return [node.as_dict() for node in nodes]


def _diagnostics(result: DbtResult, service: str) -> dict[str, Any]:
    """What every error about an invocation carries (see :class:`DbtFailed`)."""
    return {
        "exit_code": result.exit_code,
        "output": result.output,
        "failed_nodes": _node_dicts(result.failed_nodes),
        "skipped_nodes": _node_dicts(result.skipped_nodes),
        "succeeded_nodes": _node_dicts(result.succeeded_nodes),
        "command": " ".join(result.command),
        "target_path": result.target_path,
        "invocation_id": result.invocation_id,
        "log_path": result.log_path,
        "service": service,
    }


def _log_hint(result: DbtResult) -> str:
    return f" (dbt's log: {result.log_path})" if result.log_path.exists() else ""


def transient_error(
    result: DbtResult, messages: Sequence[str], *, service: str
) -> DbtTransientFailure | None:
    """The retryable error of a failed invocation whose every failure is transient, else None."""
    if result.exit_code == 0 or not messages:
        return None
    kind = classify_failure(messages)
    if kind not in ("unreachable", "transient"):
        return None
    shown = " ".join(result.command)
    detail = first_useful_lines(messages[0])
    if kind == "unreachable":
        return DbtWarehouseUnreachable(
            f"`{shown}` could not reach the warehouse: {detail}{_log_hint(result)}",
            **_diagnostics(result, service),
        )
    return DbtTransientFailure(
        f"`{shown}` failed transiently: {detail}{_log_hint(result)}",
        **_diagnostics(result, service),
    )


def raise_for_outcome(
    result: DbtResult,
    command: str,
    selection: DbtSelection,
    *,
    unmatched: Sequence[str] = (),
    nothing_selected: bool = False,
    allow_empty: bool = False,
    subset: bool = False,
    service: str = "dbt",
) -> None:
    """Raise what the result means, if it is not a success.

    ``nothing_selected``: dbt said it had nothing to do; ``unmatched`` its warnings about
    criteria that match no node; ``subset``: an asset subset was added to the selection.
    """
    shown = " ".join(result.command)
    if result.exit_code != 0 or any(node.failed for node in result.nodes):
        failed = result.failed_nodes
        messages = [node.message or node.status for node in failed] or (
            result.summary().errors or [line for line in result.output.splitlines() if line][-1:]
        )
        kind = classify_failure(messages)
        if failed:
            detail = "; ".join(
                f"{n.name} ({n.status}): {first_useful_lines(n.message or '')}" for n in failed[:5]
            )
            more = f" and {len(failed) - 5} more" if len(failed) > 5 else ""
        else:
            detail, more = first_useful_lines(messages[-1] if messages else "no output"), ""
        message = f"`{shown}` failed with exit code {result.exit_code}: {detail}{more}"
        if kind in ("authentication", "authorization", "missing object"):
            raise DbtWarehouseRejected(
                f"{message}{_log_hint(result)}. The warehouse refused it ({kind}); not retried: "
                "fix the profile's credentials, grants or database name",
                reason=kind,
                **_diagnostics(result, service),
            )
        raise DbtFailed(
            truncate(message, 4000) + _log_hint(result), **_diagnostics(result, service)
        )
    if not nothing_selected or allow_empty:
        return
    emptied = _emptied_by(selection, unmatched, command, subset=subset)
    if emptied is None:
        return
    argument, why = emptied
    raise DbtNothingSelected(
        f"`{shown}` ran nothing: {why}. dbt only warns and exits 0; pass allow_empty=True "
        "where an empty selection is expected",
        argument=argument,
        **_diagnostics(result, service),
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
    """``failure`` with the command's diagnostics and one ``flowstone/dbt.command/failed/<unique
    id>`` entry per failed node (status, compiled SQL path, then the first lines of the error)."""
    failed = {
        f"flowstone/dbt.command/failed/{node['unique_id']}": truncate(
            f"{node['status']} ({node.get('compiled_path') or 'no compiled SQL'}): "
            + first_useful_lines(node.get("message") or ""),
            2000,
        )
        for node in error.failed_nodes[:20]
    }
    extra: dict[str, Any] = {"flowstone/dbt.command/exit_code": error.exit_code}
    if error.command:
        extra["flowstone/dbt.command/command"] = error.command
    if error.target_path is not None:
        extra["flowstone/dbt.command/target_path"] = dg.MetadataValue.path(str(error.target_path))
    if error.log_path is not None:
        extra["flowstone/dbt.command/log_path"] = dg.MetadataValue.path(str(error.log_path))
    if error.invocation_id:
        extra["flowstone/dbt.command/invocation_id"] = error.invocation_id
    enriched = dg.Failure(
        description=failure.description,
        metadata={**failure.metadata, **extra, **failed},
        allow_retries=failure.allow_retries,
    )
    enriched.__cause__ = failure.__cause__
    return enriched
