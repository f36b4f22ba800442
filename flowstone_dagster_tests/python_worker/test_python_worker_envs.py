"""Workers on another virtualenv, and a scikit-learn model shared between workers."""

import datetime as dt
import pickle
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from flowstone_dagster.errors import PythonWorkerError
from flowstone_dagster.python_worker import PythonWorkerResource
from flowstone_dagster.python_worker.pool import WorkerPool
from flowstone_dagster.python_worker.process import WorkerSpec

pytestmark = pytest.mark.workers

WORKER_MODULES = str(Path(__file__).parent / "worker_modules")

PROBE_MODULE = '''
"""Installed only in the second virtualenv."""
import importlib.metadata
import importlib.util
import sys

def report():
    return {
        "prefix": sys.prefix,
        "probe_version": importlib.metadata.version("flowstone-probe"),
        "has_numpy": importlib.util.find_spec("numpy") is not None,
        "has_dagster": importlib.util.find_spec("dagster") is not None,
    }
'''


@pytest.fixture(scope="module")
def second_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A new virtualenv from the same interpreter, with its own package set: no numpy, no
    dagster, and a package ``flowstone-probe`` 2.0 that the test's environment lacks."""
    root = tmp_path_factory.mktemp("second-venv")
    venv.EnvBuilder(with_pip=False, symlinks=True).create(root)
    (site_packages,) = root.glob("lib/python*/site-packages")
    (site_packages / "flowstone_probe.py").write_text(PROBE_MODULE)
    dist_info = site_packages / "flowstone_probe-2.0.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: flowstone-probe\nVersion: 2.0\n"
    )
    (dist_info / "RECORD").write_text("flowstone_probe.py,,\n")
    return root / "bin" / "python"


def test_a_worker_runs_on_another_virtualenv(second_venv: Path) -> None:
    resource = PythonWorkerResource(python=str(second_venv), paths=[WORKER_MODULES], pool_size=1)
    try:
        report = resource.call("flowstone_probe", "report")
        assert report == {
            "prefix": str(second_venv.parent.parent),
            "probe_version": "2.0",
            "has_numpy": False,
            "has_dagster": False,
        }
        # Plain data crosses between the two environments as usual.
        value = {"when": dt.datetime(2025, 1, 15, 8, 30), "tags": {"a"}, "pair": (1, b"x")}
        assert resource.call("test_module", "echo", (value,)) == value
        # A type the worker's environment lacks is the worker's import error, not a crash.
        with pytest.raises(PythonWorkerError) as raised:  # the raw error, unmapped
            resource.call("ml", "fit_and_save", ("never-written.pkl",), dagster_errors=False)
        assert raised.value.remote_type == "ModuleNotFoundError"
        assert "numpy" in raised.value.remote_message
    finally:
        resource.close()
    with pytest.raises(ModuleNotFoundError):
        __import__("flowstone_probe")  # it is only in the second environment


@pytest.fixture
def model_path(tmp_path: Path) -> Path:
    return tmp_path / "iris-model.pkl"


def test_a_model_fitted_in_one_call_is_used_by_other_workers(model_path: Path) -> None:
    from sklearn.datasets import load_iris

    features, _labels = load_iris(return_X_y=True)
    rows = [features[i : i + 25] for i in range(0, 150, 25)]
    spec = WorkerSpec(python=sys.executable, paths=(WORKER_MODULES,))

    # One call per worker process: the fit and each prediction run in different processes.
    with WorkerPool(spec, size=2, max_calls_per_worker=1) as fresh:
        fitted = fresh.call("ml", "fit_and_save", (str(model_path),))
        predictions = fresh.map("ml", "predict", rows, kwargs={"model_path": str(model_path)})
    assert fitted["score"] > 0.9
    with model_path.open("rb") as file:
        model = pickle.load(file)  # noqa: S301 - the file the test's worker just wrote
    assert {p["pid"] for p in predictions}.isdisjoint({fitted["pid"]})
    assert len({p["pid"] for p in predictions}) == len(rows)
    for batch, prediction in zip(rows, predictions, strict=True):
        np.testing.assert_array_equal(prediction["labels"], model.predict(batch))
        assert not prediction["cached"]

    # A warm pool: each worker loads the model once and keeps it.
    with WorkerPool(spec, size=2) as warm:
        predictions = warm.map("ml", "predict", rows * 3, kwargs={"model_path": str(model_path)})
    loads = [p for p in predictions if not p["cached"]]
    assert 1 <= len(loads) <= 2  # at most one load per worker, never one per call
    assert len({p["pid"] for p in loads}) == len(loads)
    expected = np.concatenate([model.predict(batch) for batch in rows * 3])
    np.testing.assert_array_equal(np.concatenate([p["labels"] for p in predictions]), expected)
