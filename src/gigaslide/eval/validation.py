"""Validation and test scores of slide models: the per-epoch selection metric and per-fold test metrics.

``validation_metric(task)`` is what the experiment runner hands to ``train_model`` (AUC or c-index,
NaN when undefined); ``fold_metrics`` scores one fold's test predictions.
"""

from __future__ import annotations

import numpy as np
import torch

from gigaslide.data.cohort import Sample
from gigaslide.eval.metrics import (
    UndefinedMetricError,
    classification_metrics,
    concordance_index,
    survival_metrics,
)
from gigaslide.train.mil import MetricFn, Predictions, survival_risk


def validation_metric(task: str) -> MetricFn:
    """The per-epoch validation score for ``train_model``: AUC (classification) or c-index (survival).

    Returns NaN when the metric is undefined on the set (one class, no comparable pairs).
    """

    def score(samples: list[Sample], logits: np.ndarray) -> float:
        try:
            if task == "classification":
                probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
                y = np.array([s.label for s in samples])
                return float(classification_metrics(y, probs, undefined="nan")["auc"])
            risk = survival_risk(torch.from_numpy(logits)).numpy()
            return float(concordance_index([s.time for s in samples], [s.event for s in samples], risk))
        except (UndefinedMetricError, ValueError):
            return float("nan")

    return score


CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1")
SURVIVAL_METRICS = ("c_index",)


def fold_metrics(task: str, pred: Predictions) -> dict[str, float]:
    """Test metrics of one fold; undefined values (e.g. one class in a tiny fold) become NaN."""
    if task == "classification":
        y = np.array([s.label for s in pred.samples])
        m = classification_metrics(y, pred.probs, undefined="nan")
        return {k: m[k] for k in CLASSIFICATION_METRICS}
    try:
        return survival_metrics([s.time for s in pred.samples], [s.event for s in pred.samples], pred.risk)
    except UndefinedMetricError:
        return {"c_index": float("nan")}
