"""Return-risk scoring, run in flowstone's Python workers (scikit-learn, no Dagster needed).

``train_and_score(rows)`` fits a logistic regression on a day's orders (the ``returned``
label) and scores each order with the probability of a return. It runs in a worker process
started by ``PythonWorkerResource``, so a crash in the ML stack costs one call, not the step.
"""

from __future__ import annotations

import logging
from typing import Any

FEATURES = ("quantity", "amount", "tenure_days", "is_hardware")

logger = logging.getLogger("example_project.scoring")


def train_and_score(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each row of ``rows`` with ``return_risk`` (0..1) and the model's accuracy on the day."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features = np.array([[float(row[name]) for name in FEATURES] for row in rows])
    labels = np.array([bool(row["returned"]) for row in rows])
    if len(set(labels.tolist())) < 2:  # one class only: nothing to learn, use the base rate
        risks = np.full(len(rows), float(labels.mean()) if len(rows) else 0.0)
        accuracy = 1.0
    else:
        model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
        model.fit(features, labels)
        risks = model.predict_proba(features)[:, 1]
        accuracy = float(model.score(features, labels))
    logger.info("scored %d orders, training accuracy %.2f", len(rows), accuracy)
    return [
        {**row, "return_risk": round(float(risk), 4), "model_accuracy": round(accuracy, 4)}
        for row, risk in zip(rows, risks, strict=True)
    ]
