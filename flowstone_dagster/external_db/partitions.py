"""Which rows of a table an asset's partitions are: Dagster's ``partition_expr`` convention.

A partitioned asset names the column that holds its partition in its definition metadata::

    @dg.asset(partitions_def=daily, metadata={"partition_expr": "day"})
    def orders() -> list[dict]: ...

    @dg.asset(partitions_def=regions_by_day,                    # a MultiPartitionsDefinition
              metadata={"partition_expr": {"date": "day", "region": "region"}})
    def sales() -> list[dict]: ...

:func:`selection_of_dimensions` turns Dagster's table slice (``TableSlice.partition_dimensions``:
per dimension a time window or a list of keys) into a :class:`PartitionSelection`: the row filter
with one condition per dimension (``day = '2025-01-15'``; a time window ``day >= '2025-01-01' AND
day < '2025-01-08'``; ``region IN (...)``), the values to fill in when the data lacks the
partition column, and the check that every stored row belongs to the partitions being written.
Time-window bounds are bound as the column's type (:meth:`DimensionValue.bounds`).

``partition_expr`` is a column name, quoted as an identifier, or, as in Dagster's database I/O
managers, a SQL expression the user wrote (:func:`is_expression`), used as it is.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg

from flowstone_dagster.errors import ConfigurationError
from flowstone_dagster.external_db.adapters import Condition, Where
from flowstone_dagster.external_db.types import Columns, Kind, infer_kind

__all__ = [
    "DimensionValue",
    "PartitionSelection",
    "check_partition_expr",
    "is_expression",
    "selection_of_dimensions",
]


@dataclass(frozen=True)
class DimensionValue:
    """One dimension of one partition: a key (``key``, a partition key string or any value
    for :meth:`PartitionSelection.of`) or a time window (``start``/``end``, as dates when the
    partitions are whole days)."""

    column: str
    key: Any = None
    start: dt.datetime | dt.date | None = None
    end: dt.datetime | dt.date | None = None
    #: The partitions definition's time zone, for whole-day windows (held as dates).
    zone: dt.tzinfo | None = None
    #: Several keys (a range of static partitions): ``column IN keys``; empty matches nothing.
    keys: tuple[Any, ...] | None = None

    @property
    def is_window(self) -> bool:
        return self.start is not None

    def bounds(self, kind: Kind | None) -> tuple[Any, Any]:
        """The window's bounds as values comparable with a column of ``kind``.

        A ``timestamp`` column (no time zone) holds wall-clock times: the bounds are the
        window's wall-clock times in the partitions definition's time zone, without the zone
        (binding the aware bounds would make the database compare them as UTC, or as the
        session's zone). A ``timestamptz`` column gets the instants; a ``date`` column dates.
        """
        start, end = self.start, self.end
        if kind == "timestamp" or (kind is None and isinstance(start, dt.datetime)):
            # Also a column of unknown type or an expression: the window's wall-clock times,
            # as Dagster's database I/O managers compare them.
            return _wall_clock(start), _wall_clock(end)
        if kind == "timestamptz":
            return _instant(start, self.tz), _instant(end, self.tz)
        if kind == "date" and isinstance(start, dt.datetime) and isinstance(end, dt.datetime):
            return start.date(), end.date()
        return start, end

    @property
    def tz(self) -> dt.tzinfo | None:
        return self.start.tzinfo if isinstance(self.start, dt.datetime) else self.zone

    def conditions(self, kind: Kind | None = None, *, expression: bool = False) -> list[Condition]:
        column = self.column
        if self.is_window:
            start, end = self.bounds(kind)
            return [
                Condition(column, ">=", start, expression),
                Condition(column, "<", end, expression),
            ]
        if self.keys is not None:
            return [Condition(column, "in", self.keys, expression)]
        return [Condition(column, "=", self.key, expression)]

    def describe(self) -> str:
        if self.is_window:
            return f"{self.column} >= {self.start} AND {self.column} < {self.end}"
        if self.keys is not None:
            shown = ", ".join(map(str, self.keys[:5])) + (", ..." if len(self.keys) > 5 else "")
            return f"{self.column} IN ({shown})"
        return f"{self.column} = {self.key}"

    def matches(self, value: Any) -> bool:
        if self.is_window:
            return isinstance(value, (dt.date, dt.datetime)) and _in_window(value, self)
        if self.keys is not None:
            return value in self.keys or str(value) in map(str, self.keys)
        return bool(value == self.key or str(value) == str(self.key))


@dataclass
class PartitionSelection:
    """The rows of the partitions an output or input covers.

    ``alternatives``: each partition (or time window) as its per-dimension values; a row
    belongs to the selection when it matches all dimensions of one alternative. ``single``:
    the selection is exactly one partition, so missing partition columns can be filled in.
    """

    alternatives: list[list[DimensionValue]]
    single: bool
    columns: list[str] = field(default_factory=list)
    #: Whether a partition column that is neither in the data nor in the table may be a SQL
    #: expression (Dagster's ``partition_expr``); ``ExternalDB``'s ``partition=`` names columns.
    expressions: bool = False

    def _is_expression(self, column: str, known: Any) -> bool:
        return self.expressions and column not in known and is_expression(column)

    @classmethod
    def of(cls, values: Mapping[str, Any]) -> PartitionSelection:
        """The rows whose columns equal ``values`` (``{"day": date(2025, 1, 15)}``): one
        partition, outside Dagster."""
        if not values:
            raise ConfigurationError("must name at least one column", field="partition")
        columns = [_check_column(column, "partition") for column in values]
        return cls([[DimensionValue(c, key=values[c]) for c in columns]], True, columns)

    @property
    def is_empty(self) -> bool:
        """Whether the selection matches no row (a dimension with no key: an input whose
        partition mapping maps to no upstream partition)."""
        return all(
            any(value.keys == () for value in alternative) for alternative in self.alternatives
        )

    def where(self, kinds: Mapping[str, Kind | None] | None = None) -> Where:
        """The row filter; ``kinds`` are the table's column kinds (time-window bounds are
        bound as the column's type: see :meth:`DimensionValue.bounds`)."""
        kinds = kinds or {}
        if len(self.alternatives) > 1 and len(self.columns) == 1:
            values = [alternative[0] for alternative in self.alternatives]
            if all(not value.is_window for value in values):  # one dimension, several keys
                return [[Condition(self.columns[0], "in", tuple(v.key for v in values))]]
        return [
            [
                condition
                for value in alternative
                for condition in value.conditions(
                    kinds.get(value.column),
                    expression=self._is_expression(value.column, kinds),
                )
            ]
            for alternative in self.alternatives
        ]

    def describe(self) -> str:
        parts = [" AND ".join(v.describe() for v in alt) for alt in self.alternatives[:5]]
        more = f" (and {len(self.alternatives) - 5} more)" if len(self.alternatives) > 5 else ""
        return " OR ".join(f"({p})" if len(parts) > 1 else p for p in parts) + more

    def apply(self, data: Columns) -> None:
        """Fill in missing partition columns (one partition only), turn time columns given as
        ISO strings into dates/datetimes, and check that every row belongs to the selection.

        Raises ``ValueError`` naming the row and the partition when a row does not belong.
        """
        for position, column in enumerate(self.columns):
            sample = self.alternatives[0][position]
            if self._is_expression(column, data.names):
                continue  # a SQL expression: the database evaluates it, rows are not checked
            if column not in data.names:
                if not self.single:
                    raise ValueError(
                        f"the data has no partition column {column!r}; it can only be filled in "
                        f"when one partition is stored, and this run stores {self.describe()}"
                    )
                value: Any = sample.start if sample.is_window else sample.key
                data.add(column, [value] * data.rows, _kind_of_fill(value))
                continue
            index = data.names.index(column)
            if sample.is_window and any(type(v) is str for v in data.values[index]):
                data.values[index] = _normalize_times(data.values[index], sample)
                data.kinds[index] = infer_kind(column, data.values[index])
        self._check_rows(data)

    def _check_rows(self, data: Columns) -> None:
        if not data.rows:
            return
        checked = [p for p, column in enumerate(self.columns) if column in data.names]
        if not checked:
            return
        columns = [self.columns[p] for p in checked]
        alternatives = [[alternative[p] for p in checked] for alternative in self.alternatives]
        indexes = [data.names.index(column) for column in columns]
        combos = set(zip(*(data.values[i] for i in indexes), strict=True))
        for combo in combos:
            if not any(_matches(combo, alternative) for alternative in alternatives):
                row = next(
                    r
                    for r in range(data.rows)
                    if tuple(data.values[i][r] for i in indexes) == combo
                )
                found = ", ".join(
                    f"{column}={value!s}" for column, value in zip(columns, combo, strict=True)
                )
                raise ValueError(
                    f"row {row + 1} ({found}) is outside the partition being stored "
                    f"({self.describe()}); a store replaces exactly its partition's rows, so every "
                    "row must belong to it (or leave the partition column out to have it filled in)"
                )


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*")


def is_expression(partition_expr: str) -> bool:
    """Whether ``partition_expr`` is a SQL expression (``CAST(at AS DATE)``) rather than a
    column name. Only consulted for a name that is not a column of the data or the table: such
    a name that is a plain identifier is a column to fill in; anything else is SQL the user
    wrote, used as it is (as in Dagster's database I/O managers)."""
    return _NAME.fullmatch(partition_expr) is None


def _wall_clock(value: Any) -> Any:
    if isinstance(value, dt.datetime):
        return value.replace(tzinfo=None)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time())
    return value


def _instant(value: Any, tz: dt.tzinfo | None) -> Any:
    if isinstance(value, dt.datetime):
        return value
    if isinstance(value, dt.date):  # whole days: midnight in the partitions' time zone
        return dt.datetime.combine(value, dt.time(), tz or dt.UTC)
    return value


def _kind_of_fill(value: Any) -> Kind | None:
    return infer_kind("partition", [value])


def _as_time(value: Any, window: DimensionValue) -> Any:
    """A row's time value comparable with the window's bounds."""
    if isinstance(value, str):
        try:
            value = (
                dt.datetime.fromisoformat(value)
                if len(value) > 10
                else dt.date.fromisoformat(value)
            )
        except ValueError:
            raise ValueError(
                f"partition column {window.column!r} holds {value!r}, which is not an ISO date "
                "or timestamp"
            ) from None
    return value


def _normalize_times(values: list[Any], window: DimensionValue) -> list[Any]:
    parsed = {v: _as_time(v, window) for v in set(values) if type(v) is str}
    return [parsed[v] if type(v) is str else v for v in values]


def _in_window(value: Any, window: DimensionValue) -> bool:
    start, end = window.start, window.end
    if start is None or end is None:
        return False
    if isinstance(start, dt.datetime):
        tz = start.tzinfo
        if not isinstance(value, dt.datetime):
            value = dt.datetime.combine(value, dt.time(), tz)
        elif value.tzinfo is None:
            value = value.replace(tzinfo=tz)
        return bool(start <= value < end)
    if isinstance(value, dt.datetime):
        value = (
            value.date() if value.tzinfo is None else value.astimezone(window.zone or dt.UTC).date()
        )
    return bool(start <= value < end)


def _matches(combo: tuple[Any, ...], alternative: Sequence[DimensionValue]) -> bool:
    return all(
        value is not None and dimension.matches(value)
        for value, dimension in zip(combo, alternative, strict=True)
    )


def _check_column(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigurationError(
            f"must be a column name (a non-empty string), got {value!r}", field=field_name
        )
    return value


def _window_of(column: str, window: dg.TimeWindow) -> DimensionValue:
    whole_days = window.start.time() == dt.time() and window.end.time() == dt.time()
    if whole_days:
        return DimensionValue(
            column, start=window.start.date(), end=window.end.date(), zone=window.start.tzinfo
        )
    return DimensionValue(column, start=window.start, end=window.end)


def selection_of_dimensions(
    dimensions: Sequence[tuple[str, dg.TimeWindow | Sequence[str]]], *, single: bool
) -> PartitionSelection:
    """The rows of Dagster's table slice: one condition per dimension, ANDed (a time window,
    or the keys of a range of static partitions), so that any range of a multi-partitioned
    asset is one short filter however many keys it holds. ``single``: one partition is being
    stored (its missing partition columns can be filled in)."""
    values: list[DimensionValue] = []
    for column, partitions in dimensions:
        if isinstance(partitions, dg.TimeWindow):
            values.append(_window_of(column, partitions))
        elif len(partitions) == 1:
            values.append(DimensionValue(column, key=partitions[0]))
        else:
            values.append(DimensionValue(column, keys=tuple(partitions)))
    return PartitionSelection(
        [values], single, [column for column, _ in dimensions], expressions=True
    )


def check_partition_expr(context: dg.InputContext | dg.OutputContext, partition_expr: Any) -> None:
    """A clear ``ConfigurationError`` when a partitioned asset's ``partition_expr`` is missing
    or does not fit its partitions (one entry per dimension of a multi-partitioned asset)."""
    if not context.has_asset_partitions:
        return
    asset = context.asset_key.to_user_string()
    if partition_expr is None:
        raise ConfigurationError(
            f"asset {asset} is partitioned: set its metadata partition_expr to the column that "
            'holds the partition (e.g. metadata={"partition_expr": "day"})',
            field="partition_expr",
        )
    definition = context.asset_partitions_def
    if isinstance(definition, dg.MultiPartitionsDefinition):
        dimensions = [d.name for d in definition.partitions_defs]
        if not isinstance(partition_expr, Mapping) or set(partition_expr) != set(dimensions):
            raise ConfigurationError(
                f"asset {asset} is multi-partitioned: partition_expr must map each dimension "
                f"({', '.join(dimensions)}) to its column, e.g. "
                f"{dict(zip(dimensions, dimensions, strict=True))}; got {partition_expr!r}",
                field="partition_expr",
            )
        for dimension in dimensions:
            _check_column(partition_expr[dimension], f"partition_expr.{dimension}")
    else:
        _check_column(partition_expr, "partition_expr")
