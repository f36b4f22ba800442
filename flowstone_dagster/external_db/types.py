"""Column types of the external database I/O manager: inferred from the data, and back.

A store first turns its data (a list of dicts, or a pandas DataFrame) into :class:`Columns`,
one list of values per column, and infers each column's *kind* from its Python values:

=============  ====================================  ====================  ===================
kind           Python values                         PostgreSQL type       SQLite declared type
=============  ====================================  ====================  ===================
integer        ``int``                               ``bigint``            ``INTEGER``
float          ``float`` (``int`` mixed in)          ``double precision``  ``REAL``
numeric        ``decimal.Decimal``                   ``numeric``           ``DECIMAL_TEXT``
text           ``str``                               ``text``              ``TEXT``
boolean        ``bool``                              ``boolean``           ``BOOLEAN``
date           ``datetime.date``                     ``date``              ``DATE``
timestamp      naive ``datetime.datetime``           ``timestamp``         ``TIMESTAMP``
timestamptz    aware ``datetime.datetime``           ``timestamptz``       ``TIMESTAMPTZ``
time           ``datetime.time``                     ``time``              ``TIME``
bytes          ``bytes``, ``bytearray``, memoryview  ``bytea``             ``BLOB``
json           ``dict``, ``list``                    ``jsonb``             ``JSON_TEXT``
uuid           ``uuid.UUID``                         ``uuid``              ``UUID_TEXT``
=============  ====================================  ====================  ===================

``None`` (and, in a DataFrame, ``NaN``/``NaT``/``pd.NA``) is NULL and says nothing about the
type; a column with only NULLs is ``text`` (a DataFrame's numeric or datetime dtype is used
instead when it has one). Any other mix of kinds in one column is a ``TypeError`` naming the
column and two rows. SQLite has no column types of its own: values are stored as ISO-8601 text
(dates, times; timestamps with time zone in UTC, so that text order is time order), decimal
text (exact), JSON text, and loaded back to the same Python types by the declared types above
(whose names keep SQLite's TEXT affinity where text must stay text).
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import operator
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from flowstone_dagster.external_db.errors import InvalidValue
from flowstone_dagster.formats import gc_paused, is_dataframe, json_default

__all__ = [
    "POSTGRES_TYPES",
    "SQLITE_TYPES",
    "Columns",
    "Kind",
    "accepts",
    "copy_text",
    "decode_sqlite_column",
    "gc_paused",
    "infer_kind",
    "invalid_value",
    "kind_of_declared_type",
    "kind_of_postgres_type",
    "kind_of_sqlite_type",
    "payload_size",
    "rows_size",
    "sqlite_param",
    "sqlite_values",
    "to_columns",
]

Kind = Literal[
    "integer",
    "float",
    "numeric",
    "text",
    "boolean",
    "date",
    "timestamp",
    "timestamptz",
    "time",
    "bytes",
    "json",
    "uuid",
]

POSTGRES_TYPES: dict[Kind, str] = {
    "integer": "bigint",
    "float": "double precision",
    "numeric": "numeric",
    "text": "text",
    "boolean": "boolean",
    "date": "date",
    "timestamp": "timestamp",
    "timestamptz": "timestamptz",
    "time": "time",
    "bytes": "bytea",
    "json": "jsonb",
    "uuid": "uuid",
}

SQLITE_TYPES: dict[Kind, str] = {
    "integer": "INTEGER",
    "float": "REAL",
    "numeric": "DECIMAL_TEXT",
    "text": "TEXT",
    "boolean": "BOOLEAN",
    "date": "DATE",
    "timestamp": "TIMESTAMP",
    "timestamptz": "TIMESTAMPTZ",
    "time": "TIME",
    "bytes": "BLOB",
    "json": "JSON_TEXT",
    "uuid": "UUID_TEXT",
}

_KIND_OF_TYPE: dict[type, Kind] = {
    int: "integer",
    float: "float",
    decimal.Decimal: "numeric",
    str: "text",
    bool: "boolean",
    dt.date: "date",
    dt.time: "time",
    bytes: "bytes",
    bytearray: "bytes",
    memoryview: "bytes",
    dict: "json",
    list: "json",
    uuid.UUID: "uuid",
}

# Which kinds of data an existing column of a kind accepts. A column of a type we do not know
# (an enum, an array, ...) accepts anything, and the database decides.
_ACCEPTS: dict[str, frozenset[str]] = {
    "integer": frozenset({"integer"}),
    "float": frozenset({"float", "integer"}),
    "numeric": frozenset({"numeric", "integer", "float"}),
    "text": frozenset({"text", "uuid"}),
    "boolean": frozenset({"boolean"}),
    "date": frozenset({"date"}),
    "timestamp": frozenset({"timestamp", "date"}),
    "timestamptz": frozenset({"timestamptz", "date"}),
    "time": frozenset({"time"}),
    "bytes": frozenset({"bytes"}),
    "json": frozenset({"json"}),
    "uuid": frozenset({"uuid", "text"}),
}


def _kind_of(value: Any) -> Kind:
    kind = _KIND_OF_TYPE.get(type(value))
    if kind is not None:
        return kind
    if isinstance(value, dt.datetime):  # also pandas' Timestamp
        return "timestamp" if value.utcoffset() is None else "timestamptz"
    for base, base_kind in _KIND_OF_TYPE.items():
        if base is not bool and isinstance(value, base):  # subclasses: IntEnum, str enums, ...
            return base_kind
    raise TypeError(f"{type(value).__name__} values cannot be stored in a database column")


def infer_kind(name: str, values: Sequence[Any]) -> Kind | None:
    """The kind of column ``name`` from its values; ``None`` when all are NULL.

    ``int`` and ``float`` together are ``float``; any other mix is a ``TypeError``.
    """
    kinds: dict[Kind, int] = {}
    types = set(map(type, values))
    if not types or types == {type(None)}:
        return None
    if len(types) == 1 and dt.datetime not in types:
        # The common case: one Python type in the whole column (cheap: set(map(type, ...))).
        single = _KIND_OF_TYPE.get(types.pop())
        if single is not None:
            return single
    for row, value in enumerate(values):
        if value is None:
            continue
        try:
            kind = _kind_of(value)
        except TypeError as exc:
            raise TypeError(f"column {name!r}, row {row + 1}: {exc}") from None
        kinds.setdefault(kind, row)
    if not kinds:
        return None
    if len(kinds) == 1:
        return next(iter(kinds))
    if set(kinds) == {"integer", "float"}:
        return "float"
    (first, first_row), (second, second_row) = list(kinds.items())[:2]
    raise TypeError(
        f"column {name!r} mixes {first} values (row {first_row + 1}) and {second} values "
        f"(row {second_row + 1}); store one type per column (convert them, or use a JSON "
        "column of dicts/lists)"
    )


def accepts(existing: str | None, kind: str | None) -> bool:
    """Whether a column of kind ``existing`` (``None``: a type we do not know) takes ``kind``."""
    if existing is None or kind is None:
        return True
    return kind in _ACCEPTS.get(existing, frozenset({existing}))


_KIND_NAMES = frozenset(POSTGRES_TYPES)

_POSTGRES_KINDS: dict[str, Kind] = {
    "int2": "integer",
    "int4": "integer",
    "int8": "integer",
    "float4": "float",
    "float8": "float",
    "numeric": "numeric",
    "text": "text",
    "varchar": "text",
    "bpchar": "text",
    "name": "text",
    "citext": "text",
    "bool": "boolean",
    "date": "date",
    "timestamp": "timestamp",
    "timestamptz": "timestamptz",
    "time": "time",
    "bytea": "bytes",
    "json": "json",
    "jsonb": "json",
    "uuid": "uuid",
}


_DECLARED_KINDS: dict[str, Kind] = {
    "bigint": "integer",
    "integer": "integer",
    "int": "integer",
    "smallint": "integer",
    "double precision": "float",
    "double": "float",
    "float": "float",
    "real": "float",
    "decimal": "numeric",
    "string": "text",
    "str": "text",
    "character varying": "text",
    "boolean": "boolean",
    "datetime": "timestamp",
    "timestamp without time zone": "timestamp",
    "timestamp with time zone": "timestamptz",
    "bytes": "bytes",
    "blob": "bytes",
}


def kind_of_declared_type(type_name: str) -> Kind | None:
    """The kind of a column type as a user declares it (``dagster/column_schema``): PostgreSQL's
    names (``bigint``, ``int8``, ``timestamp with time zone``, ``varchar(20)``), this package's
    kinds (``integer``, ``timestamptz``, ``json``) and common ones (``int``, ``string``,
    ``float``, ``datetime``); ``None`` when unknown."""
    name = type_name.strip().lower().split("(", 1)[0].strip()
    if name in _KIND_NAMES:
        return name  # type: ignore[return-value]
    return _DECLARED_KINDS.get(name) or _POSTGRES_KINDS.get(name)


def kind_of_postgres_type(udt_name: str) -> Kind | None:
    """The kind of a PostgreSQL column by its type name (``information_schema`` udt_name)."""
    return _POSTGRES_KINDS.get(udt_name)


_SQLITE_KINDS: dict[str, Kind] = {declared: kind for kind, declared in SQLITE_TYPES.items()} | {
    "BOOL": "boolean",
    "DATETIME": "timestamp",
    "JSON": "json",
    "NUMERIC": "numeric",
    "DECIMAL": "numeric",
}


def kind_of_sqlite_type(declared: str) -> Kind | None:
    """The kind of a SQLite column by its declared type (our names, then SQLite's affinity)."""
    upper = declared.strip().upper()
    base = upper.split("(", 1)[0].strip()
    if base in _SQLITE_KINDS:
        return _SQLITE_KINDS[base]
    if "INT" in upper:
        return "integer"
    if any(part in upper for part in ("CHAR", "CLOB", "TEXT")):
        return "text"
    if "BLOB" in upper:
        return "bytes"
    if any(part in upper for part in ("REAL", "FLOA", "DOUB")):
        return "float"
    return None


@dataclass
class Columns:
    """Data to store, by column: ``values[i]`` holds column ``names[i]`` for every row."""

    names: list[str]
    values: list[list[Any]]
    kinds: list[Kind | None]
    rows: int

    def add(self, name: str, values: list[Any], kind: Kind | None) -> None:
        self.names.append(name)
        self.values.append(values)
        self.kinds.append(kind)


def _check_name(name: Any) -> str:
    if not isinstance(name, str):
        raise TypeError(f"column names must be strings, found {name!r}")
    if not name or "\x00" in name:
        raise TypeError(f"column name {name!r} is empty or contains a NUL character")
    return name


def _rows_to_columns(rows: Sequence[Any]) -> tuple[list[str], list[list[Any]]]:
    if set(map(type, rows)) - {dict}:  # one C-speed pass; the per-row check only on a miss
        for position, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise TypeError(
                    f"rows must be dicts (mappings of column to value); row {position + 1} is a "
                    f"{type(row).__name__}"
                )
    if not rows:
        return [], []
    every = set().union(*rows)
    names = list(rows[0])
    if len(names) != len(every):  # keys missing from the first row: in order of appearance
        seen = dict.fromkeys(names)
        for row in rows:
            seen.update(dict.fromkeys(row))
        names = list(seen)
    ordered = [_check_name(name) for name in names]
    if set(map(len, rows)) == {len(ordered)}:  # every row has every column
        return ordered, [list(map(operator.itemgetter(name), rows)) for name in ordered]
    return ordered, [[row.get(name) for row in rows] for name in ordered]


_DTYPE_KINDS: dict[str, Kind] = {"i": "integer", "u": "integer", "f": "float", "b": "boolean"}


def _frame_to_columns(frame: Any) -> tuple[list[str], list[list[Any]], list[Kind | None]]:
    """A DataFrame's columns as Python values, NaN/NaT/NA as None, and dtype kinds as hints.

    Numeric, boolean and datetime columns are converted a column at a time (``tolist``,
    ``to_pydatetime``), not a value at a time."""
    import pandas as pd

    names: list[str] = []
    values: list[list[Any]] = []
    hints: list[Kind | None] = []
    for name in frame.columns:
        names.append(_check_name(name))
        series = frame[name]
        kind_code = series.dtype.kind
        missing = series.isna()
        gaps = bool(missing.any())
        if kind_code == "M":
            hints.append("timestamptz" if getattr(series.dtype, "tz", None) else "timestamp")
            _refuse_nanoseconds(name, series)
            column = series.array.to_pydatetime().tolist()
        else:
            hints.append(_DTYPE_KINDS.get(kind_code))
            if kind_code in "iufb" and not gaps:
                column = series.tolist()  # numpy scalars to Python ints/floats/bools in C
            else:
                column = series.astype(object).tolist()
            if kind_code == "O":
                column = [v.to_pydatetime() if isinstance(v, pd.Timestamp) else v for v in column]
        if gaps:
            column = [None if gone else v for v, gone in zip(column, missing.tolist(), strict=True)]
        values.append(column)
    return names, values, hints


def _refuse_nanoseconds(name: str, series: Any) -> None:
    """Timestamps are stored to the microsecond (PostgreSQL's precision, and SQLite's text):
    a value with nanoseconds would change without an error, so it is refused."""
    import numpy as np

    unit = np.datetime_data(series.dtype.base if hasattr(series.dtype, "base") else series.dtype)
    if unit[0] != "ns":
        return
    ticks = series.array.asi8
    lost = np.flatnonzero((ticks % 1000 != 0) & ~series.isna().to_numpy())
    if len(lost):
        row = int(lost[0])
        raise InvalidValue(
            f"column {name!r}, row {row + 1}: {series.iloc[row]} has nanoseconds, which would be "
            "lost (timestamps are stored to the microsecond); round them first, e.g. "
            "frame[column].dt.floor('us')",
            column=name,
            row=row + 1,
        )


def to_columns(data: Any) -> Columns:
    """``data`` (a list of dicts or a DataFrame) by column, with each column's kind.

    Raises ``TypeError`` naming the column and rows when the data cannot be stored.
    """
    with gc_paused():
        return _to_columns(data)


def _to_columns(data: Any) -> Columns:
    if is_dataframe(data):
        names, values, hints = _frame_to_columns(data)
        rows = len(data)
    elif isinstance(data, (str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(f"stores a list of dicts or a pandas DataFrame, not {type(data).__name__}")
    else:
        rows_list = data if isinstance(data, Sequence) else list(data)
        names, values = _rows_to_columns(rows_list)
        hints = [None] * len(names)
        rows = len(rows_list)
    if len(set(names)) != len(names):
        raise TypeError(f"duplicate column names in {names}")
    # A DataFrame dtype (numbers, booleans, datetimes) is the column's kind: its values need
    # no looking at. Object columns (and lists of dicts) are inferred from their values.
    kinds = [
        hint or infer_kind(name, column)
        for name, column, hint in zip(names, values, hints, strict=True)
    ]
    return Columns(names, values, kinds, rows)


# -- encoding ----------------------------------------------------------------------------------


def _to_json(value: Any) -> str:
    return json.dumps(value, default=json_default, allow_nan=False, ensure_ascii=False)


# COPY's text format: backslash escapes, tab between columns, newline between rows, \N = NULL.
_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_NULL = "\\N"


def _escape_all(texts: list[str]) -> list[str] | None:
    """Escape many strings at once: one join, translate and split (C speed, not per value).

    ``None`` when a string contains NUL, which PostgreSQL text cannot hold.
    """
    if not texts:
        return []
    joined = "\x00".join(texts)
    if joined.count("\x00") != len(texts) - 1:
        return None
    return joined.translate(_COPY_ESCAPES).split("\x00")


def _bytea_hex(value: Any) -> str:
    return "\\\\x" + bytes(value).hex()


def _bool_text(value: bool) -> str:
    return "t" if value else "f"


def _iso(value: Any) -> str:
    return str(value.isoformat())


def _copy_encoder(kind: Kind | None, types: set[type]) -> Callable[[Any], str]:
    # Unbound C methods where the column holds exactly one type: no Python frame per value.
    if kind == "boolean":
        return _bool_text
    if kind == "bytes":
        return _bytea_hex
    if kind in ("float", "integer") and types <= {int, float}:
        return float.__repr__ if types == {float} else repr  # 'nan'/'inf' are valid input
    if kind == "date" and types == {dt.date}:
        return dt.date.isoformat
    if kind in ("date", "timestamp", "timestamptz", "time"):
        return dt.datetime.isoformat if types == {dt.datetime} else _iso
    if kind == "json":
        return _to_json
    return str


def copy_text(columns: Columns, kinds: Sequence[Kind | None], start: int, stop: int) -> str:
    """Rows ``start:stop`` of ``columns`` in PostgreSQL COPY text format, one line per row.

    ``kinds`` are the target columns' kinds (the existing table's, else the inferred ones).
    """
    encoded: list[list[str]] = []
    for name, values, kind in zip(columns.names, columns.values, kinds, strict=True):
        chunk = values[start:stop]
        nulls = chunk.count(None)
        present = [v for v in chunk if v is not None] if nulls else chunk
        encode = _copy_encoder(kind, set(map(type, present)))
        if kind in ("text", "json", "uuid", None):
            if all(type(v) is str for v in present[:1]) and set(map(type, present)) <= {str}:
                texts = present
            else:
                texts = [v if type(v) is str else encode(v) for v in present]
            escaped = _escape_all(texts)
            if escaped is None:
                row = start + next(i for i, v in enumerate(chunk) if "\x00" in str(v or ""))
                raise InvalidValue(
                    f"column {name!r}, row {row + 1}: PostgreSQL text cannot contain NUL "
                    "(\\x00) characters; remove them or store the value as bytes",
                    column=name,
                    row=row + 1,
                )
            texts = escaped
        else:
            texts = list(map(encode, present))
        if nulls:
            it = iter(texts)
            texts = [_NULL if v is None else next(it) for v in chunk]
        encoded.append(texts)
    if not encoded:
        return ""
    return "\n".join(map("\t".join, zip(*encoded, strict=True))) + "\n"


_INT64 = range(-(2**63), 2**63)


def _why_invalid(value: Any, kind: Kind | None, postgres: bool) -> str | None:
    """Why the database cannot hold ``value`` (``None``: it can)."""
    if value is None:
        return None
    if isinstance(value, str):
        if postgres and "\x00" in value:
            return "PostgreSQL text cannot contain NUL (\\x00) characters"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return "the text holds a lone surrogate, which is not valid UTF-8"
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        if value not in _INT64 and (kind == "integer" or not postgres):
            return f"{value} is out of range for a 64-bit integer"
        return None
    if isinstance(value, (dict, list)):
        try:
            _to_json(value).encode("utf-8")
        except ValueError:
            return "JSON cannot hold NaN or infinite floats"
        except TypeError as exc:
            return f"cannot be written as JSON ({exc})"
    return None


def invalid_value(
    columns: Columns, kinds: Sequence[Kind | None], *, postgres: bool
) -> InvalidValue | None:
    """The first value of ``columns`` the database cannot hold, as an :class:`InvalidValue`
    naming its column and row (``None`` when every value can be stored). Called after an
    encoding or binding failure, to say where it is."""
    for name, values, kind in zip(columns.names, columns.values, kinds, strict=True):
        for row, value in enumerate(values):
            reason = _why_invalid(value, kind, postgres)
            if reason is not None:
                return InvalidValue(
                    f"column {name!r}, row {row + 1}: {reason}; nothing was written",
                    column=name,
                    row=row + 1,
                )
    return None


def _sqlite_timestamptz(value: Any) -> str:
    if not isinstance(value, dt.datetime):  # a date stored into a timestamptz column
        value = dt.datetime.combine(value, dt.time(), dt.UTC)
    return value.astimezone(dt.UTC).isoformat(timespec="microseconds")


def _sqlite_timestamp(value: Any) -> str:
    if not isinstance(value, dt.datetime):
        value = dt.datetime.combine(value, dt.time())
    return value.isoformat(timespec="microseconds")


def _sqlite_encoder(kind: Kind | None) -> Callable[[Any], Any] | None:
    encoders: dict[str, Callable[[Any], Any]] = {
        "numeric": str,
        "date": _iso,
        "timestamp": _sqlite_timestamp,
        "timestamptz": _sqlite_timestamptz,
        "time": _iso,
        "bytes": bytes,
        "json": _to_json,
        "uuid": str,
        "text": lambda v: v if type(v) is str else str(v),
    }
    return encoders.get(kind or "")


def sqlite_values(columns: Columns, kinds: Sequence[Kind | None]) -> list[list[Any]]:
    """Each column's values as SQLite stores them (see the module docs), NULLs kept."""
    result: list[list[Any]] = []
    for values, kind in zip(columns.values, kinds, strict=True):
        encode = _sqlite_encoder(kind)
        if encode is None:
            result.append(values)
        else:
            result.append([None if v is None else encode(v) for v in values])
    return result


def _decode_bool(value: Any) -> Any:
    return bool(value) if isinstance(value, int) else value


_SQLITE_DECODERS: dict[str, Callable[[str], Any]] = {
    "numeric": decimal.Decimal,
    "date": dt.date.fromisoformat,
    "timestamp": dt.datetime.fromisoformat,
    "timestamptz": dt.datetime.fromisoformat,
    "time": dt.time.fromisoformat,
    "json": json.loads,
    "uuid": uuid.UUID,
}


def decode_sqlite_column(kind: Kind | None, values: list[Any]) -> list[Any]:
    """Values loaded from a SQLite column of ``kind`` back as Python types (text only;
    values SQLite holds as numbers or blobs are returned as they are)."""
    if kind == "boolean":
        return [_decode_bool(v) for v in values]
    decode = _SQLITE_DECODERS.get(kind or "")
    if decode is None:
        return values
    return [decode(v) if type(v) is str else v for v in values]


def sqlite_param(value: Any) -> Any:
    """A single value (a partition key, a time window's bound) as SQLite stores it."""
    if value is None:
        return None
    encode = _sqlite_encoder(_kind_of(value))
    return value if encode is None else encode(value)


def rows_size(rows: Sequence[Sequence[Any]]) -> int:
    """:func:`payload_size` of row tuples, reading each column with ``itemgetter`` (no
    transposition of the rows)."""
    if not rows:
        return 0
    return payload_size([list(map(operator.itemgetter(i), rows)) for i in range(len(rows[0]))])


def payload_size(columns: Sequence[Sequence[Any]]) -> int:
    """The size in bytes of column values: text as UTF-8, bytes as they are, JSON as its text,
    everything else 8 bytes a value. The ``bytes`` measure of telemetry, computed per column at
    C speed (one join per text column), not per value in Python."""
    total = 0
    for values in columns:
        first = next((type(v) for v in values if v is not None), None)
        if first is None:
            continue
        if first not in (str, bytes, memoryview, bytearray, dict, list):
            total += 8 * (len(values) - list(values).count(None))
            continue
        present = [v for v in values if v is not None] if None in values else values
        if first is str:
            try:
                total += len("".join(present).encode("utf-8", "surrogatepass"))
            except TypeError:  # not all text: count each value as its text
                total += sum(len(str(v).encode("utf-8", "surrogatepass")) for v in present)
        elif first in (bytes, memoryview, bytearray):
            total += sum(map(len, present))
        else:
            total += sum(len(_to_json(v).encode()) for v in present)
    return total
