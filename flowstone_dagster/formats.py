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
import math
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, Literal

from flowstone_dagster.errors import ConfigurationError, DecodeError

__all__ = [
    "FORMATS",
    "MEDIA_TYPES",
    "NonFinite",
    "OwnedBody",
    "RestFormat",
    "decode",
    "dumps_json",
    "encode",
    "gc_paused",
    "json_default",
    "is_dataframe",
    "iter_records",
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
    strings, sets and tuples as lists, numpy scalars as the Python value (a non-finite float
    as ``None``), numpy ``datetime64`` as its ISO string, pandas ``NaT`` as ``None``."""
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        if type(value).__name__ == "NaTType":  # pandas.NaT subclasses datetime
            return None
        return value.isoformat()
    if isinstance(value, (decimal.Decimal, uuid.UUID)):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    kind = type(value)
    if kind.__module__ == "numpy":
        if kind.__name__ == "datetime64":
            return None if str(value) == "NaT" else str(value)
        if hasattr(value, "item"):  # np.int64, np.float32, np.bool_, ...
            item = value.item()
            return None if isinstance(item, float) and not math.isfinite(item) else item
    if kind.__name__ == "NaTType":
        return None
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as ``None`` and every dict key a string (the
    slow path of :func:`dumps_json`, only for values the fast path refuses)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {_json_key(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    converted = json_default(value)
    return converted if converted is value else _json_safe(converted)


def _json_key(key: Any) -> Any:
    if isinstance(key, (str, int, bool)) or key is None:
        return key
    if isinstance(key, float):
        return key if math.isfinite(key) else str(key)
    converted = json_default(key)
    return converted if isinstance(converted, (str, int, float, bool)) else str(converted)


#: What a store does with NaN and infinities: ``null`` (JSON cannot hold them) or an error.
NonFinite = Literal["null", "error"]


def _strict_default(value: Any) -> Any:
    """:func:`json_default` that refuses a non-finite numpy float instead of writing null."""
    if type(value).__module__ == "numpy" and hasattr(value, "item"):
        item = value.item()
        if isinstance(item, float) and not math.isfinite(item):
            raise ValueError(f"Out of range float values are not JSON compliant: {item!r}")
    return json_default(value)


def _non_finite_error(exc: ValueError) -> TypeError:
    return TypeError(
        f"it holds NaN or an infinity, which JSON cannot represent ({exc}); set non_finite to "
        "'null' to store them as null, or clean the value"
    )


def dumps_json(value: Any, *, non_finite: NonFinite = "null") -> str:
    """``value`` as compact, valid JSON: NaN and infinities become ``null`` (never the
    invalid tokens ``NaN``/``Infinity``), or with ``non_finite="error"`` raise ``TypeError``;
    numpy scalars and dates serialise, and dict keys that are dates or numpy numbers become
    strings."""
    if non_finite == "error":
        try:
            return json.dumps(
                value, default=_strict_default, separators=(",", ":"), allow_nan=False
            )
        except ValueError as exc:
            if "Circular reference" in str(exc):
                raise
            raise _non_finite_error(exc) from None
    try:
        return json.dumps(value, default=json_default, separators=(",", ":"), allow_nan=False)
    except (ValueError, TypeError) as exc:
        if "Circular reference" in str(exc):
            raise
        return json.dumps(
            _json_safe(value), default=json_default, separators=(",", ":"), allow_nan=False
        )


def _check_finite_frame(frame: Any) -> None:
    """Raise ``TypeError`` when a DataFrame's numeric columns hold NaN or an infinity."""
    import numpy

    numeric = frame.select_dtypes("number")
    if numeric.size and not numpy.isfinite(numeric.to_numpy(dtype=float)).all():
        bad = [c for c in numeric.columns if not numpy.isfinite(numeric[c].to_numpy(float)).all()]
        raise _non_finite_error(ValueError(f"columns {', '.join(map(str, bad))}"))


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


def encode(value: Any, fmt: str, *, non_finite: NonFinite = "null") -> bytes:
    """``value`` as a request body in ``fmt``.

    Raises ``TypeError`` when the value does not fit the format (a str for ``bytes``, ...), and
    with ``non_finite="error"`` when a ``json``/``ndjson`` value holds NaN or an infinity.
    """
    if fmt in ("json", "ndjson") and non_finite == "error" and is_dataframe(value):
        _check_finite_frame(value)
    if fmt == "json":
        if is_dataframe(value):
            return str(value.to_json(orient="records", date_format="iso")).encode()
        return dumps_json(value, non_finite=non_finite).encode()
    if fmt == "ndjson":
        records = value.to_dict(orient="records") if is_dataframe(value) else value
        if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
            raise TypeError(f"ndjson stores a list of records, not {type(value).__name__}")
        lines = [dumps_json(r, non_finite=non_finite) for r in records]
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


class OwnedBody:
    """A response body handed to :func:`decode` with its only reference, so that the decoder
    can drop the bytes once it has their text: a 100 MB body is then not held beside its text
    while the value is built (what bare ``json.loads(response.content)`` also achieves).

    The caller must keep no other reference::

        handle = OwnedBody(body)
        del body
        value = decode(handle, "json", url=url)
    """

    __slots__ = ("_body",)

    def __init__(self, body: bytes) -> None:
        self._body = body

    def take(self) -> bytes:
        body, self._body = self._body, b""
        return body


def decode(
    body: bytes | OwnedBody,
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
            return body.take() if isinstance(body, OwnedBody) else body
        text = _text_of(body, fmt, encoding)  # an OwnedBody's bytes are dropped here
        with gc_paused():
            return _decode_text(text, fmt, as_dataframe)
    except (ValueError, UnicodeDecodeError, LookupError, csv.Error) as exc:
        raise DecodeError(
            f"response from {url} is not valid {fmt}: {type(exc).__name__}: {exc}",
            url=url,
            fmt=fmt,
        ) from None


_UTF8_BOM = b"\xef\xbb\xbf"


def _text_of(body: bytes | OwnedBody, fmt: str, encoding: str | None) -> str:
    """The body's text: JSON in the encoding RFC 8259 detection finds, others in ``encoding``
    (else UTF-8); a byte-order mark before JSON, ndjson or CSV is not data (else the first CSV
    column is ``'\\ufeffid'``)."""
    raw = body.take() if isinstance(body, OwnedBody) else body
    if fmt == "json":
        detected = json.detect_encoding(raw)
        # utf-8-sig strips a BOM while decoding (no copy of the body to slice it off).
        return str(raw, "utf-8-sig" if detected == "utf-8" else detected, "surrogatepass")
    if fmt == "text":
        return str(raw, encoding or "utf-8")
    if encoding is None or encoding.lower().replace("_", "-") in ("utf-8", "utf8"):
        return str(raw, "utf-8-sig")
    return str(raw, encoding).removeprefix("\ufeff")  # a BOM under a declared charset


def _decode_text(text: str, fmt: str, as_dataframe: bool) -> Any:
    if fmt == "json":
        value = json.loads(text)
        if as_dataframe:
            return require_pandas().DataFrame(value if isinstance(value, list) else [value])
        return value
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


class _ChunkReader(io.RawIOBase):
    """A binary file over an iterator of byte chunks (for the standard library's line and
    text readers), holding one chunk at a time."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._pending = b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: Any) -> int:
        while not self._pending:
            chunk = next(self._chunks, None)
            if chunk is None:
                return 0
            self._pending = chunk
        size = min(len(target), len(self._pending))
        target[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        return size


def iter_records(
    chunks: Iterable[bytes], fmt: str, *, url: str, encoding: str | None = None
) -> Iterator[Any]:
    """The records of a body, decoded as its chunks arrive: memory stays at about one chunk
    and one record, whatever the body's size.

    ``ndjson``: one JSON value per line; ``csv``: one dict per row; ``json``: each element of a
    top-level array (another top-level value is one record). A UTF-8 byte-order mark is
    skipped. Raises :class:`~flowstone_dagster.errors.DecodeError` naming the URL, the format
    and where (the line, or for JSON the character)."""
    if fmt not in ("json", "ndjson", "csv"):
        raise ConfigurationError(
            f"streaming records needs the json, ndjson or csv format, not {fmt!r}", field="format"
        )
    stream = io.BufferedReader(_ChunkReader(chunks), buffer_size=1024 * 1024)
    if fmt == "json":
        encoding = None  # RFC 8259: JSON between systems is UTF-8, whatever the header says
    if stream.peek(3)[:3] == _UTF8_BOM and encoding in (None, "utf-8", "UTF-8", "utf8"):
        stream.read(3)
    text = io.TextIOWrapper(stream, encoding=encoding or "utf-8", newline="")
    if fmt == "json":
        array = _JsonArrayReader(text)
        try:
            yield from array
        except (ValueError, UnicodeDecodeError) as exc:
            raise DecodeError(
                f"response from {url} is not valid json at character {array.position}: "
                f"{type(exc).__name__}: {getattr(exc, 'msg', exc)}",
                url=url,
                fmt=fmt,
            ) from None
        return
    line = 0
    rows = csv.DictReader(text) if fmt == "csv" else None
    try:
        if rows is None:
            for line, raw in enumerate(text, start=1):  # noqa: B007 (line is read on error)
                if raw.strip():
                    yield json.loads(raw)
            return
        yield from rows
    except (ValueError, UnicodeDecodeError, LookupError, csv.Error) as exc:
        line = rows.line_num if rows is not None else line
        raise DecodeError(
            f"response from {url} is not valid {fmt} at line {line}: {type(exc).__name__}: {exc}",
            url=url,
            fmt=fmt,
        ) from None


_JSON_READ = 1024 * 1024
_JSON_WHITESPACE = " \t\n\r"
_JSON_AFTER_VALUE = frozenset(_JSON_WHITESPACE + ",]}")


class _JsonArrayReader:
    """The elements of a top-level JSON array read from ``text`` a chunk at a time (another
    top-level value is yielded whole). The text held is the unparsed rest of the current
    chunk; a value cut by a chunk's end is parsed again with more text, which grows
    geometrically so that a huge element costs linear time."""

    def __init__(self, text: io.TextIOBase) -> None:
        self._text = text
        self._decoder = json.JSONDecoder()
        self._buffer = ""
        self._pos = 0
        self._dropped = 0  # characters before the buffer
        self._eof = False

    @property
    def position(self) -> int:
        """Characters read before the current parse position."""
        return self._dropped + self._pos

    def _fill(self, grow: bool = False) -> bool:
        if self._eof:
            return False
        pending = len(self._buffer) - self._pos
        chunk = self._text.read(max(_JSON_READ, pending) if grow else _JSON_READ)
        if not chunk:
            self._eof = True
            return False
        self._dropped += self._pos
        self._buffer = self._buffer[self._pos :] + chunk
        self._pos = 0
        return True

    def _peek(self) -> str:
        """The next character that is not whitespace (``""`` at the end)."""
        while True:
            buffer = self._buffer
            while self._pos < len(buffer) and buffer[self._pos] in _JSON_WHITESPACE:
                self._pos += 1
            if self._pos < len(buffer):
                return buffer[self._pos]
            if not self._fill():
                return ""

    def _value(self) -> Any:
        self._peek()
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buffer, self._pos)
            except json.JSONDecodeError:
                if self._fill(grow=True):
                    continue
                raise
            # A value is complete when a delimiter follows it: a number cut by the chunk's end
            # ("0" of "0.5", "1" of "1e3") parses, yet goes on in the next chunk.
            if (
                end == len(self._buffer) or self._buffer[end] not in _JSON_AFTER_VALUE
            ) and self._fill(grow=True):
                continue
            self._pos = end
            return value

    def _expect_end(self) -> None:
        if self._peek() != "":
            raise json.JSONDecodeError("Extra data", self._buffer, self._pos)

    def __iter__(self) -> Iterator[Any]:
        first = self._peek()
        if first == "":
            return
        if first != "[":
            yield self._value()
            self._expect_end()
            return
        self._pos += 1
        if self._peek() == "]":
            self._pos += 1
            self._expect_end()
            return
        while True:
            yield self._value()
            separator = self._peek()
            self._pos += 1
            if separator == "]":
                break
            if separator != ",":
                self._pos -= 1
                raise json.JSONDecodeError("Expecting ',' delimiter", self._buffer, self._pos)
        self._expect_end()


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
