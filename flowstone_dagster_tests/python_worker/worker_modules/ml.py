"""A scikit-learn model fitted and saved in one call, loaded once per worker for predictions."""

import os
import pickle
from typing import Any

import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

# path -> model: the model stays warm in a worker across calls.
_models: dict[str, Any] = {}


def fit_and_save(path: str) -> dict[str, Any]:
    features, labels = load_iris(return_X_y=True)
    model = LogisticRegression(max_iter=500).fit(features, labels)
    with open(path, "wb") as file:
        pickle.dump(model, file)
    return {"pid": os.getpid(), "score": float(model.score(features, labels))}


def predict(rows: np.ndarray, model_path: str) -> dict[str, Any]:
    cached = model_path in _models
    if not cached:
        with open(model_path, "rb") as file:
            _models[model_path] = pickle.load(file)  # noqa: S301 - our own file
    return {
        "pid": os.getpid(),
        "cached": cached,
        "labels": _models[model_path].predict(rows),
    }
