"""dbt's results as Python objects, read from an invocation's ``run_results.json``.

``run_results.json`` is the truth about what dbt did (dbt's console text is for people); the
``manifest.json`` next to it adds each node's name, kind and compiled SQL path::

    from flowstone_dagster.dbt.artifacts import read_node_results

    nodes = read_node_results(Path("target/run-1234"), project_dir=Path("my_project"))
    [(n.name, n.status, n.execution_time, n.rows_affected) for n in nodes]
    # [('raw_orders', 'success', 0.11, 5), ('orders', 'success', 0.14, None), ...]

Both files are read from the invocation's own target directory, so concurrent invocations of
the same project never read each other's results.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "FAILED_STATUSES",
    "DbtNodeResult",
    "read_node_results",
    "read_run_results",
]

#: ``run_results.json`` statuses that mean a node failed (``warn`` and ``skipped`` do not).
FAILED_STATUSES = frozenset({"error", "fail", "runtime error"})


@dataclass(frozen=True)
class DbtNodeResult:
    """One model, seed, snapshot or test of an invocation, from ``run_results.json``.

    ``status`` is dbt's (``success``, ``error``, ``skipped`` for models and seeds; ``pass``,
    ``fail``, ``warn``, ``error``, ``skipped`` for tests). ``execution_time`` is in seconds;
    ``rows_affected`` is what the adapter reported (``None`` when it reports nothing, as DuckDB
    does for ``CREATE TABLE AS``); ``failures`` is a test's failing row count; ``compiled_path``
    the absolute path of the compiled SQL in the invocation's target directory.
    """

    unique_id: str
    name: str
    resource_type: str
    status: str
    execution_time: float
    message: str | None = None
    rows_affected: int | None = None
    failures: int | None = None
    compiled_path: str | None = None
    relation_name: str | None = None

    @property
    def failed(self) -> bool:
        """Whether dbt reports the node as failed (``error``, ``fail``)."""
        return self.status in FAILED_STATUSES

    def as_dict(self) -> dict[str, Any]:
        """A plain dict (what :class:`~flowstone_dagster.errors.DbtFailed` carries)."""
        return asdict(self)


def read_run_results(target_path: Path) -> dict[str, Any] | None:
    """``run_results.json`` of an invocation, or ``None`` when dbt wrote none (a fatal error)."""
    path = target_path / "run_results.json"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None
    loaded: dict[str, Any] = orjson.loads(data)
    return loaded


def _manifest_nodes(target_path: Path) -> Mapping[str, Mapping[str, Any]]:
    try:
        manifest = orjson.loads((target_path / "manifest.json").read_bytes())
    except FileNotFoundError:
        return {}
    nodes: dict[str, Mapping[str, Any]] = {}
    for section in ("nodes", "sources", "snapshots", "unit_tests"):
        nodes.update(manifest.get(section) or {})
    return nodes


def _compiled_path(node: Mapping[str, Any], target_path: Path, project_dir: Path) -> str | None:
    """Where dbt wrote the node's compiled SQL, if it did (seeds have none)."""
    compiled = node.get("compiled_path")
    if compiled:
        path = Path(compiled)
        path = path if path.is_absolute() else project_dir / path
    elif node.get("original_file_path") and node.get("package_name"):
        path = target_path / "compiled" / node["package_name"] / node["original_file_path"]
    else:
        return None
    return str(path) if path.is_file() else None


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def read_node_results(target_path: Path, *, project_dir: Path) -> list[DbtNodeResult]:
    """The per-node results of the invocation whose target directory is ``target_path``.

    Empty when dbt wrote no ``run_results.json`` (it failed before running any node).
    """
    run_results = read_run_results(target_path)
    if not run_results:
        return []
    manifest_nodes = _manifest_nodes(target_path)
    results: list[DbtNodeResult] = []
    for raw in run_results.get("results", []):
        unique_id = str(raw.get("unique_id", ""))
        node = manifest_nodes.get(unique_id, {})
        adapter_response = raw.get("adapter_response") or {}
        results.append(
            DbtNodeResult(
                unique_id=unique_id,
                name=str(node.get("name") or unique_id.rsplit(".", 1)[-1]),
                resource_type=str(node.get("resource_type") or unique_id.split(".", 1)[0]),
                status=str(raw.get("status", "")),
                execution_time=float(raw.get("execution_time") or 0.0),
                message=raw.get("message"),
                rows_affected=_int_or_none(adapter_response.get("rows_affected")),
                failures=_int_or_none(raw.get("failures")),
                compiled_path=_compiled_path(node, target_path, project_dir) if node else None,
                relation_name=raw.get("relation_name") or node.get("relation_name"),
            )
        )
    return results
