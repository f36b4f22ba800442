"""What crosses between a step and a worker, and the errors for what cannot."""

import datetime as dt
import math
import sys
import threading
import uuid
from collections import OrderedDict
from collections.abc import Iterator
from decimal import Decimal
from fractions import Fraction
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pandas as pd
import pytest

from flowstone_dagster import telemetry
from flowstone_dagster.errors import is_retryable
from flowstone_dagster.python_worker import WorkerDataError
from flowstone_dagster.python_worker.pool import WorkerPool
from flowstone_dagster.python_worker.process import WorkerSpec

pytestmark = pytest.mark.workers

WORKER_MODULES = str(Path(__file__).parent / "worker_modules")


@pytest.fixture(scope="module")
def pool() -> Iterator[WorkerPool]:
    with WorkerPool(WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,)), size=1) as pool:
        yield pool


def _types(value: Any) -> Any:
    """The value's shape with every type spelled out, to compare more than ==."""
    if isinstance(value, dict):
        return (type(value), [(_types(k), _types(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value), [_types(v) for v in value])
    if isinstance(value, (set, frozenset)):
        return (type(value), sorted(repr(_types(v)) for v in value))
    return type(value)


UTC_PLUS_0530 = dt.timezone(dt.timedelta(hours=5, minutes=30))

# The data-mapping table of docs/python_worker.md: every value comes back equal, with the same
# types all the way down (a tuple stays a tuple, a set a set, an int key an int key).
ROUND_TRIP = {
    "none": None,
    "bool": True,
    "int": -7,
    "big int": 2**100,
    "float": 1.5,
    "inf": math.inf,
    "str": "text",
    "unicode str": "ünïcödé ✓ 漢字 \x00 \U0001f600",
    "bytes": b"\x00\xff raw",
    "bytearray": bytearray(b"mutable"),
    "list": [1, "a", None, 2.5],
    "tuple": (1, (2, 3)),
    "empty containers": ([], (), {}, set(), ""),
    "dict": {"a": {"b": [1, 2]}, "c": None},
    "dict with int and tuple keys": {1: "one", (2, 3): "pair"},
    "ordered dict": OrderedDict([("z", 1), ("a", 2)]),
    "set": {1, 2, 3},
    "frozenset": frozenset({"a", "b"}),
    "date": dt.date(2025, 1, 15),
    "naive datetime": dt.datetime(2025, 1, 15, 13, 45, 30, 123456),
    "utc datetime": dt.datetime(2025, 1, 15, 13, 45, tzinfo=dt.UTC),
    "offset datetime": dt.datetime(2025, 1, 15, 13, 45, tzinfo=UTC_PLUS_0530),
    "time": dt.time(23, 59, 59),
    "timedelta": dt.timedelta(days=2, seconds=5),
    "decimal": Decimal("12.3400"),
    "fraction": Fraction(1, 3),
    "complex": 1 + 2j,
    "uuid": uuid.UUID("12345678-1234-5678-1234-567812345678"),
    "path": PurePosixPath("/data/2025-01-15.parquet"),
    "range": range(0, 10, 3),
    "nested": {"rows": [{"id": 1, "tags": {"x"}, "at": dt.date(2025, 1, 1)}], "meta": (1, b"b")},
}


@pytest.mark.parametrize("value", ROUND_TRIP.values(), ids=ROUND_TRIP.keys())
def test_values_round_trip_with_their_types(pool: WorkerPool, value: Any) -> None:
    result = pool.call("test_module", "echo", (value,))
    assert result == value
    assert _types(result) == _types(value)
    # and the worker received the real type, not a look-alike
    assert pool.call("test_module", "describe", (value,)) == type(value).__name__


def test_nan_and_negative_zero_survive(pool: WorkerPool) -> None:
    nan, negative_zero = pool.call("test_module", "echo", ((math.nan, -0.0),))
    assert math.isnan(nan)
    assert math.copysign(1, negative_zero) == -1


NUMPY_CASES = {
    "float64": np.linspace(0, 1, 1000),
    "int32 2-d": np.arange(12, dtype=np.int32).reshape(3, 4),
    "fortran order": np.asfortranarray(np.arange(12.0).reshape(3, 4)),
    "bool": np.array([True, False, True]),
    "datetime64": np.array(["2025-01-15", "2025-01-16"], dtype="datetime64[D]"),
    "structured": np.array([(1, 2.5), (2, 3.5)], dtype=[("id", "i8"), ("v", "f4")]),
    "0-d": np.array(3.25),
    "empty": np.zeros((0, 3)),
    "non-contiguous view": np.arange(20.0)[::2],
    "object dtype": np.array([1, "a", None], dtype=object),
}


@pytest.mark.parametrize("array", NUMPY_CASES.values(), ids=NUMPY_CASES.keys())
def test_numpy_arrays_round_trip(pool: WorkerPool, array: np.ndarray) -> None:
    result = pool.call("test_module", "echo", (array,))
    assert isinstance(result, np.ndarray)
    assert result.dtype == array.dtype
    assert result.shape == array.shape
    np.testing.assert_array_equal(result, array)


def test_large_arrays_cross_out_of_band_and_stay_writable(
    pool: WorkerPool, events: list[telemetry.TelemetryEvent]
) -> None:
    array = np.random.default_rng(7).random(1_000_000)
    result = pool.call("test_module", "echo", (array,))
    np.testing.assert_array_equal(result, array)
    result[0] = -1.0  # backed by our own buffer, not a read-only view
    (event,) = [e for e in events if e.name == "flowstone.worker.call"]
    # the array's 8 MB travel as one raw buffer each way, beside a pickle of a few hundred bytes
    assert event.measures["buffers_in"] == 1
    assert event.measures["buffers_out"] == 1
    assert 8_000_000 <= event.measures["bytes_in"] < 8_001_000
    assert 8_000_000 <= event.measures["bytes_out"] < 8_001_000


def test_pandas_objects_round_trip(
    pool: WorkerPool, events: list[telemetry.TelemetryEvent]
) -> None:
    frame = pd.DataFrame(
        {
            "id": np.arange(10_000, dtype=np.int64),
            "score": np.linspace(0, 1, 10_000),
            "label": pd.Categorical(["a", "b"] * 5_000),
            "name": [f"row-{i}" for i in range(10_000)],
            "at": pd.date_range("2025-01-01", periods=10_000, freq="min", tz="UTC"),
            "flag": [True, False] * 5_000,
        },
        index=pd.RangeIndex(10_000, name="row"),
    )
    result = pool.call("test_module", "echo", (frame,))
    pd.testing.assert_frame_equal(result, frame)
    series = pd.Series([1.5, None, 3.0], index=["x", "y", "z"], name="s")
    pd.testing.assert_series_equal(pool.call("test_module", "echo", (series,)), series)
    first = next(e for e in events if e.name == "flowstone.worker.call")
    assert first.measures["buffers_in"] >= 2  # the numeric blocks crossed out of band


# -- what cannot cross ---------------------------------------------------------------------------


def test_an_unsendable_argument_names_its_type_and_place(
    pool: WorkerPool, events: list[telemetry.TelemetryEvent]
) -> None:
    lock = threading.Lock()
    with pytest.raises(WorkerDataError) as raised:
        pool.call("test_module", "echo", ({"rows": [1, 2], "guard": lock},))
    error = raised.value
    assert error.direction == "argument"
    assert error.path == "args[0]['guard']"
    assert error.value_type == "_thread.lock"
    assert "cannot send args[0]['guard'] (a _thread.lock) to test_module.echo" in str(error)
    assert not is_retryable(error)
    assert not [e for e in events if e.name == "flowstone.worker.call"]  # never sent
    with pytest.raises(WorkerDataError) as raised:
        pool.call("test_module", "echo", kwargs={"value": (i for i in range(3))})
    assert raised.value.path == "kwargs['value']"
    assert raised.value.value_type == "generator"
    with pytest.raises(WorkerDataError, match="function"):
        pool.call("test_module", "echo", (lambda: 1,))


def test_an_unsendable_result_names_its_type_and_the_worker_survives(pool: WorkerPool) -> None:
    (pid,) = pool.pids()
    with pytest.raises(WorkerDataError) as raised:
        pool.call("test_module", "make_generator")
    assert raised.value.direction == "result"
    assert raised.value.value_type == "generator"
    assert "test_module.make_generator returned a value that cannot be sent back" in str(
        raised.value
    )
    with pytest.raises(WorkerDataError) as raised:
        pool.call("test_module", "nested_unpicklable")
    assert raised.value.path == "result['bad']['lock']"
    assert raised.value.value_type == "_thread.lock"
    assert pool.pids() == [pid]
    assert pool.call("test_module", "add", (1, 2)) == 3


class OnlyInTheStep:
    """A type the worker cannot import: this test module is not on its path."""

    def __init__(self, value: int) -> None:
        self.value = value


def test_a_type_the_worker_cannot_import_is_a_data_error(pool: WorkerPool) -> None:
    with pytest.raises(WorkerDataError) as raised:
        pool.call("test_module", "echo", (OnlyInTheStep(1),))
    assert raised.value.direction == "argument"
    message = str(raised.value)
    assert "could not load the arguments of test_module.echo" in message
    assert "No module named 'flowstone_dagster_tests'" in message
    assert "compatible versions" in message
