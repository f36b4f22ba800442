"""``parse_dbt_output``: the numbers and errors in dbt's plain console output.

dbt's console text is written for people; :class:`~flowstone_dagster.dbt.DbtResource`
takes its results from ``run_results.json`` instead. This parser is for text you only have as
text (a CI log, a captured ``dbt run`` from elsewhere)::

    from flowstone_dagster.dbt.output import parse_dbt_output

    summary = parse_dbt_output('''
    12:00:01  Running with dbt=1.11.16
    12:00:02  Found 3 models, 2 data tests, 2 seeds, 511 macros
    12:00:03  Finished running 3 table models in 0 hours 0 minutes and 0.32 seconds (0.32s).
    12:00:03  Completed successfully
    12:00:03  Done. PASS=3 WARN=0 ERROR=0 SKIP=0 NO-OP=0 TOTAL=3
    ''')
    summary.models_run   # 3
    summary.errors       # []
    summary.passed       # 3

Lines may carry dbt's ``HH:MM:SS`` prefix and ANSI colours or not; older formats
(``Found 3 models, 2 tests, 0 snapshots``, ``Done. PASS=3 WARN=0 ERROR=0 SKIP=0 TOTAL=3``) parse
too.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

__all__ = ["DbtOutputSummary", "parse_dbt_output"]

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TIMESTAMP = re.compile(r"^\d{2}:\d{2}:\d{2}(?:\.\d+)?\s+")
_VERSION = re.compile(r"Running with dbt=(\S+)")
_FOUND = re.compile(r"^Found (.+)$")
_COUNT = re.compile(r"(\d+)\s+([A-Za-z][A-Za-z -]*?)s?$")
_FINISHED = re.compile(r"^Finished running (.*?) in \d+ hours?")
_DONE = re.compile(r"^Done\.\s+(.*)$")
_DONE_FIELD = re.compile(r"([A-Z-]+)=(\d+)")
_COMPLETED_WITH = re.compile(r"^Completed with (\d+) errors?")
_NODE_RESULT = re.compile(
    r"^\d+ of \d+ (OK created|ERROR creating|SKIP relation|OK loaded|ERROR loading|PASS|FAIL|"
    r"WARN|ERROR)\b(.*)$"
)
_ERROR_HEADER = re.compile(
    r"^(Failure in \S+ .*|(?:Runtime|Database|Compilation|Parsing|Dependency) Error(?: in .*)?"
    r"|Encountered an error:.*)$"
)
_WARNING = re.compile(r"(does not match any enabled nodes|^Nothing to do\.)")


@dataclass(frozen=True)
class DbtOutputSummary:
    """What :func:`parse_dbt_output` read.

    ``found`` maps each kind in the ``Found ...`` line to its count (``{"model": 3,
    "data test": 2, "seed": 2}``; plural ``s`` removed). ``models_run`` is the number of models
    dbt reports as run: from ``Finished running ...``, else the per-model result lines, else
    (for a successful summary without either, like dbt 1.0's) the models found. ``passed``
    ... ``total`` come from the ``Done.`` line (``None`` when absent); ``success`` is ``True`` after
    ``Completed successfully``, ``False`` after ``Completed with N errors`` or a fatal error,
    ``None`` when the text says neither. ``errors`` are dbt's error blocks, one string each
    (``"Failure in model broken_model (models/broken_model.sql)\\n  Runtime Error ..."``);
    ``warnings`` the selection warnings (a criterion matching nothing, ``Nothing to do``).
    """

    dbt_version: str | None = None
    found: dict[str, int] = field(default_factory=dict)
    models_run: int = 0
    passed: int | None = None
    warned: int | None = None
    errored: int | None = None
    skipped: int | None = None
    no_op: int | None = None
    total: int | None = None
    success: bool | None = None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def models_found(self) -> int:
        """Models in the project (the ``Found N models`` count)."""
        return self.found.get("model", 0)

    @property
    def tests_found(self) -> int:
        """Tests in the project: ``data test`` (dbt >= 1.8) plus ``test`` (older dbt)."""
        return self.found.get("data test", 0) + self.found.get("test", 0)


def _clean(line: str) -> str:
    return _TIMESTAMP.sub("", _ANSI.sub("", line)).rstrip()


def _counts(listing: str) -> dict[str, int]:
    """``"3 models, 2 data tests, 0 snapshots"`` -> ``{"model": 3, "data test": 2, ...}``."""
    counts: dict[str, int] = {}
    for part in listing.split(","):
        match = _COUNT.search(part.strip())
        if match:
            counts[match.group(2).strip()] = counts.get(match.group(2).strip(), 0) + int(
                match.group(1)
            )
    return counts


def _models_in(finished: str) -> int:
    """Models in ``"3 table models, 1 view model, 2 seeds"``."""
    return sum(count for kind, count in _counts(finished).items() if kind.endswith("model"))


def _split_error_blocks(text: str) -> tuple[list[str], list[str]]:
    """dbt's error blocks (header and details, one string each), and the other lines."""
    lines = text.splitlines()
    # dbt stamps each log line; the continuation lines of a multi-line message carry no stamp.
    # In stamped text a stamped blank line ends an error block; in unstamped text any blank does.
    stamped = any(_TIMESTAMP.match(_ANSI.sub("", raw)) for raw in lines)
    errors: list[str] = []
    others: list[str] = []
    block: list[str] = []
    for raw in lines:
        line = _clean(raw)
        stripped = line.strip()
        if block:
            ends = (
                stripped.startswith(("compiled code at ", "Failure in "))
                or _DONE.match(stripped)
                or (not stripped and (bool(_TIMESTAMP.match(_ANSI.sub("", raw))) or not stamped))
            )
            if not ends:
                block.append(line)
                continue
            errors.append("\n".join(block).strip())
            block = []
        if _ERROR_HEADER.match(stripped):
            block = [stripped]
            others.append(stripped)  # "Encountered an error" also decides the outcome
        elif stripped:
            others.append(stripped)
    if block:
        errors.append("\n".join(block).strip())
    return errors, others


def parse_dbt_output(text: str) -> DbtOutputSummary:
    """Read the summary numbers, error blocks and selection warnings from dbt console text.

    ::

        >>> s = parse_dbt_output("Running with dbt=1.0.0\\nFound 3 models, 2 tests, 0 snapshots"
        ...                      "\\nCompleted successfully\\n")
        >>> (s.models_run, s.errors, s.success)
        (3, [], True)
    """
    errors, lines = _split_error_blocks(text)
    version: str | None = None
    found: dict[str, int] = {}
    finished_models: int | None = None
    model_lines = 0
    done: dict[str, int] = {}
    success: bool | None = None
    warnings: list[str] = []
    for line in lines:
        if match := _VERSION.search(line):
            version = match.group(1)
        elif match := _FOUND.match(line):
            found = _counts(match.group(1))
        elif match := _FINISHED.match(line):
            finished_models = _models_in(match.group(1))
        elif match := _DONE.match(line):
            done = {key: int(value) for key, value in _DONE_FIELD.findall(match.group(1))}
        elif line.startswith("Completed successfully"):
            success = True
        elif _COMPLETED_WITH.match(line) or line.startswith("Encountered an error"):
            success = False
        elif match := _NODE_RESULT.match(line):
            verb, rest = match.groups()
            if verb in ("OK created", "ERROR creating") and " model " in rest.split("[")[0]:
                model_lines += 1
        elif _WARNING.search(line):
            warnings.append(line)

    if finished_models is not None:
        models_run = finished_models
    elif model_lines:
        models_run = model_lines
    else:
        models_run = found.get("model", 0) if success else 0
    return DbtOutputSummary(
        dbt_version=version,
        found=found,
        models_run=models_run,
        passed=done.get("PASS"),
        warned=done.get("WARN"),
        errored=done.get("ERROR"),
        skipped=done.get("SKIP"),
        no_op=done.get("NO-OP"),
        total=done.get("TOTAL"),
        success=success,
        errors=errors,
        warnings=warnings,
    )
