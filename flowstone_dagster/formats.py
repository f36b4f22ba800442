"""Body formats of the REST I/O manager: how a Python value becomes bytes and back.

=========  =================================  =============================================
format     media type                         Python value
=========  =================================  =============================================
json       ``application/json``               any JSON value (dicts, lists, ...)
ndjson     ``application/x-ndjson``           a list of JSON values, one per line
csv        ``text/csv``                       a list of dicts (all values strings when loaded)
text       ``text/plain; charset=utf-8``      ``str``
bytes      ``application/octet-stream``       ``bytes``
=========  =================================  =============================================

A pandas ``DataFrame`` is accepted when storing ``json``, ``ndjson`` and ``csv`` (as records),
and returned by :func:`decode` when ``as_dataframe`` is set (pandas must be installed).
``datetime``, ``date``, ``Decimal`` and ``UUID`` values are written as ISO strings / strings.
"""

from __future__ import annotations

import csv
import datetime as dt
import decimal
import gc
import io
import json
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from flowstone_dagster.errors import ConfigurationError, DecodeError

__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "RestFormat",
    "decode",
    "encode",
    "gc_paused",
    "json_default",
    "is_dataframe",
    "require_pandas",
    "wants_dataframe",
]

RestFormat = Literal["json", "ndjson", "csv", "text", "bytes"]

MEDIA_TYPES: dict[str, str] = {
    "json": "application/json",
    "ndjson": "application/x-ndjson",
    "csv": "text/csv",
    "text": "text/plain; charset=utf-8",
    "bytes": "application/octet-stream",
}
FORMATS: tuple[str, ...] = tuple(MEDIA_TYPES)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while the block builds many containers.

    Decoding a large JSON body, or building 100,000 row dicts, triggers several full
    collections, each walking every object the process holds: that more than doubled the time
    of a large load. None of these containers can form a cycle, so nothing is lost by deferring
    collection to the end of the block (the collector runs again as usual afterwards; it is
    left alone if it was off).
    """
    if not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def json_default(value: Any) -> Any:
    """``json.dumps``' ``default``: dates and times as ISO strings, decimals and UUIDs as
    strings, sets and tuples as lists."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def is_dataframe(value: Any) -> bool:
    """Whether ``value`` is a pandas DataFrame (without importing pandas)."""
    return type(value).__module__.startswith("pandas") and type(value).__name__ == "DataFrame"


def require_pandas() -> Any:
    try:
        import pandas
    except ImportError:
        raise ConfigurationError(
            "the input is annotated as a pandas DataFrame but pandas is not installed: "
            "pip install pandas",
            field="format",
        ) from None
    return pandas


def encode(value: Any, fmt: str) -> bytes:
    """``value`` as a request body in ``fmt``.

    Raises ``TypeError`` when the value does not fit the format (a str for ``bytes``, ...).
    """
    if fmt == "json":
        if is_dataframe(value):
            return str(value.to_json(orient="records", date_format="iso")).encode()
        return json.dumps(value, default=json_default, separators=(",", ":")).encode()
    if fmt == "ndjson":
        records = value.to_dict(orient="records") if is_dataframe(value) else value
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            raise TypeError(f"ndjson stores a list of records, not {type(value).__name__}")
        lines = [json.dumps(r, default=json_default, separators=(",", ":")) for r in records]
        return ("\n".join(lines) + "\n" if lines else "").encode()
    if fmt == "csv":
        if is_dataframe(value):
            return str(value.to_csv(index=False)).encode()
        return _encode_csv(value)
    if fmt == "text":
        if not isinstance(value, str):
            raise TypeError(f"text stores a str, not {type(value).__name__}")
        return value.encode("utf-8")
    if fmt == "bytes":
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise TypeError(f"bytes stores bytes, not {type(value).__name__}")
        return bytes(value)
    raise ConfigurationError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", field="format")


def _encode_csv(rows: Any) -> bytes:
    if isinstance(rows, (str, bytes, dict)) or not hasattr(rows, "__iter__"):
        raise TypeError(f"csv stores a list of dicts, not {type(rows).__name__}")
    rows = list(rows)
    columns: dict[str, None] = {}
    for row in rows:
        if not isinstance(row, dict):
            raise TypeError(f"csv stores a list of dicts, found a {type(row).__name__}")
        columns.update(dict.fromkeys(row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode("utf-8")


def decode(
    body: bytes,
    fmt: str,
    *,
    url: str,
    encoding: str | None = None,
    as_dataframe: bool = False,
) -> Any:
    """A response body in ``fmt`` as a Python value.

    Raises :class:`~flowstone_dagster.errors.DecodeError` naming the URL and format when the
    body does not decode.
    """
    try:
        if fmt == "bytes":
            return body
        with gc_paused():
            return _decode_text_format(body, fmt, encoding, as_dataframe)
    except (ValueError, UnicodeDecodeError, LookupError, csv.Error) as exc:
        raise DecodeError(
            f"response from {url} is not valid {fmt}: {type(exc).__name__}: {exc}",
            url=url,
            fmt=fmt,
        ) from None


def _decode_text_format(body: bytes, fmt: str, encoding: str | None, as_dataframe: bool) -> Any:
    if fmt == "json":
        value = json.loads(body)
        if as_dataframe:
            return require_pandas().DataFrame(value if isinstance(value, list) else [value])
        return value
    text = body.decode(encoding or "utf-8")
    if fmt == "text":
        return text
    if fmt == "ndjson":
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
        return require_pandas().DataFrame(records) if as_dataframe else records
    if fmt == "csv":
        if as_dataframe:
            return require_pandas().read_csv(io.StringIO(text))
        return list(csv.DictReader(io.StringIO(text)))
    raise ConfigurationError(f"unknown format {fmt!r}; one of {', '.join(FORMATS)}", field="format")


def wants_dataframe(context: Any) -> bool:
    """Whether a Dagster input is annotated as a pandas DataFrame (I/O managers load one)."""
    import dagster as dg

    try:
        annotation = context.dagster_type.typing_type
    except dg.DagsterInvariantViolationError:  # a context built without a type (tests, benches)
        return False
    return getattr(annotation, "__name__", "") == "DataFrame" and str(
        getattr(annotation, "__module__", "")
    ).startswith("pandas")
