"""Classification and survival metrics in numpy, equal to scikit-learn / lifelines on the same arrays.

* :func:`roc_auc` - binary AUC (Mann-Whitney U with mid-ranks, ties count 1/2) and macro one-vs-rest
  AUC for multi-class scores, as reported in HIPT Table 1 / Giga-SSL Table 2
  (= ``sklearn.metrics.roc_auc_score(..., multi_class="ovr", average="macro")``).
* :func:`balanced_accuracy`, :func:`f1`, :func:`accuracy` - same conventions as scikit-learn
  (macro F1 averages over the labels present in ``y_true`` or ``y_pred``; 0/0 counts as 0).
* :func:`concordance_index` - Harrell's c-index with lifelines' tie rules, taking a RISK score
  (higher risk = shorter survival). ``lifelines.utils.concordance_index(time, -risk, event)`` is equal.

Undefined values (a single class for AUC, no admissible pairs for the c-index) raise
:class:`UndefinedMetricError`, which bootstrap resampling catches to redraw.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from scipy.stats import rankdata


class UndefinedMetricError(ValueError):
    """The metric has no value on these inputs (e.g. AUC with one class in ``y_true``)."""


def _check_finite(name: str, a: np.ndarray) -> None:
    if a.dtype.kind in "fc" and not np.all(np.isfinite(a)):
        bad = int(np.sum(~np.isfinite(a)))
        raise ValueError(f"{name} contains {bad} NaN/inf value(s); drop or impute them before scoring")


def _as_labels(y_true: np.ndarray | Sequence[int]) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"y_true must be 1-D, got shape {y.shape}")
    _check_finite("y_true", y)
    return y


def _binary_auc(pos: np.ndarray, score: np.ndarray) -> float:
    """AUC of ``score`` for the boolean target ``pos``: P(s+ > s-) + 1/2 P(s+ = s-)."""
    n_pos = int(pos.sum())
    n_neg = pos.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError(
            f"AUC is undefined: y_true has a single class ({n_pos} positive, {n_neg} negative samples)"
        )
    ranks = rankdata(score)  # mid-ranks give ties half credit
    u = ranks[pos].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def roc_auc(y_true: np.ndarray | Sequence[int], scores: np.ndarray) -> float:
    """Area under the ROC curve.

    Args:
        y_true: (N,) integer labels. Binary labels must be {0, 1}; multi-class labels index columns.
        scores: (N,) score of class 1, (N, 2) probabilities (column 1 used) or (N, C) class scores
            for the macro-averaged one-vs-rest AUC over the C classes.
    """
    y = _as_labels(y_true)
    s = np.asarray(scores, dtype=np.float64)
    _check_finite("scores", s)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_true has {y.shape[0]} samples but scores has {s.shape[0]}")
    if s.ndim == 2 and s.shape[1] == 2:
        s = s[:, 1]
    if s.ndim == 1:
        labels = np.unique(y)
        if labels.size > 2 or not np.all(np.isin(labels, [0, 1])):
            raise ValueError(f"binary AUC needs labels in {{0, 1}}, got {labels.tolist()}")
        return _binary_auc(y == 1, s)
    if s.ndim != 2:
        raise ValueError(f"scores must be (N,) or (N, C), got shape {s.shape}")
    n_classes = s.shape[1]
    present = np.unique(y)
    missing = sorted(set(range(n_classes)) - set(present.tolist()))
    if missing:
        raise UndefinedMetricError(
            f"macro one-vs-rest AUC is undefined: classes {missing} absent from y_true"
        )
    extra = sorted(set(present.tolist()) - set(range(n_classes)))
    if extra:
        raise ValueError(f"labels {extra} have no score column (scores has {n_classes} columns)")
    return float(np.mean([_binary_auc(y == c, s[:, c]) for c in range(n_classes)]))


def roc_curve(y_true: np.ndarray | Sequence[int], score: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve points (fpr, tpr), one point per distinct threshold, starting at (0, 0)."""
    pos = _as_labels(y_true).astype(bool)
    s = np.asarray(score, dtype=np.float64)
    _check_finite("score", s)
    order = np.argsort(-s, kind="mergesort")
    s_sorted, pos_sorted = s[order], pos[order]
    last_of_threshold = np.r_[np.nonzero(np.diff(s_sorted))[0], s.size - 1]
    tps = np.cumsum(pos_sorted)[last_of_threshold]
    fps = (last_of_threshold + 1) - tps
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    if n_pos == 0 or n_neg == 0:
        raise UndefinedMetricError("ROC curve is undefined: y_true has a single class")
    fpr = np.r_[0.0, fps / n_neg]
    tpr = np.r_[0.0, tps / n_pos]
    return fpr, tpr


def accuracy(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """Fraction of correct predictions."""
    y, p = _as_labels(y_true), _as_labels(y_pred)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in shape")
    return float(np.mean(y == p))


def _confusion(y: np.ndarray, p: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(L, L) confusion matrix, rows = true label, columns = predicted label."""
    yi = np.searchsorted(labels, y)
    pi = np.searchsorted(labels, p)
    cm = np.zeros((labels.size, labels.size), dtype=np.int64)
    np.add.at(cm, (yi, pi), 1)
    return cm


def balanced_accuracy(y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int]) -> float:
    """Mean per-class recall over the classes present in ``y_true`` (scikit-learn convention)."""
    y, p = _as_labels(y_true), _as_labels(y_pred)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in shape")
    labels = np.union1d(y, p)
    cm = _confusion(y, p, labels)
    support = cm.sum(axis=1)
    keep = support > 0
    return float(np.mean(np.diag(cm)[keep] / support[keep]))


def f1(
    y_true: np.ndarray | Sequence[int], y_pred: np.ndarray | Sequence[int], average: str = "binary"
) -> float:
    """F1 score. ``average="binary"``: F1 of label 1; ``"macro"``: unweighted mean over all labels in
    ``y_true`` or ``y_pred``. A 0/0 F1 (label never true nor predicted) counts as 0, as in scikit-learn."""
    y, p = _as_labels(y_true), _as_labels(y_pred)
    if y.shape != p.shape:
        raise ValueError(f"y_true {y.shape} and y_pred {p.shape} differ in shape")
    if average == "binary":
        labels = np.union1d(y, p)
        if not np.all(np.isin(labels, [0, 1])):
            raise ValueError(
                f"binary F1 needs labels in {{0, 1}}, got {labels.tolist()}; use average='macro'"
            )
        tp = np.sum((y == 1) & (p == 1))
        denom = 2 * tp + np.sum((y == 0) & (p == 1)) + np.sum((y == 1) & (p == 0))
        return float(2 * tp / denom) if denom > 0 else 0.0
    if average != "macro":
        raise ValueError(f"average must be 'binary' or 'macro', got {average!r}")
    labels = np.union1d(y, p)
    cm = _confusion(y, p, labels)
    tp = np.diag(cm).astype(np.float64)
    denom = cm.sum(axis=0) + cm.sum(axis=1)  # = 2 tp + fp + fn
    per_class = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    return float(per_class.mean())


def classification_metrics(
    y_true: np.ndarray | Sequence[int], probs: np.ndarray, undefined: str = "raise"
) -> dict[str, float]:
    """AUC, balanced accuracy, accuracy and F1 of class probabilities.

    Args:
        y_true: (N,) labels in ``0..C-1``.
        probs: (N, C) class probabilities (or scores); (N,) is read as P(class 1) for a binary task.

    Returns:
        ``auc`` (binary, or macro one-vs-rest for C > 2), ``balanced_accuracy``, ``accuracy``,
        ``f1`` (binary F1 of class 1 for C = 2, macro F1 otherwise) and ``f1_macro``.
        Predictions are the arg-max class. ``undefined="nan"`` returns ``auc = nan`` instead of raising
        :class:`UndefinedMetricError` when a class is absent from ``y_true``.
    """
    y = _as_labels(y_true).astype(np.int64)
    pr = np.asarray(probs, dtype=np.float64)
    _check_finite("probs", pr)
    if pr.ndim == 1:
        pr = np.stack([1.0 - pr, pr], axis=1)
    if pr.ndim != 2 or pr.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N={y.shape[0]}, C), got shape {pr.shape}")
    pred = pr.argmax(axis=1)
    binary = pr.shape[1] == 2
    try:
        auc = roc_auc(y, pr[:, 1] if binary else pr)
    except UndefinedMetricError:
        if undefined != "nan":
            raise
        auc = float("nan")
    return {
        "auc": auc,
        "balanced_accuracy": balanced_accuracy(y, pred),
        "accuracy": accuracy(y, pred),
        "f1": f1(y, pred, average="binary" if binary else "macro"),
        "f1_macro": f1(y, pred, average="macro"),
    }


def _survival_arrays(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> tuple[np.ndarray, ...]:
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event).ravel()
    r = np.asarray(risk, dtype=np.float64).ravel()
    if not (t.size == e.size == r.size):
        raise ValueError(f"time ({t.size}), event ({e.size}) and risk ({r.size}) differ in length")
    _check_finite("time", t)
    _check_finite("risk", r)
    _check_finite("event", e.astype(np.float64))
    if not np.all(np.isin(e, [0, 1])):
        raise ValueError("event must be 0 (censored) or 1 (event observed)")
    return t, e.astype(bool), r


def concordance_counts(
    time: np.ndarray, event: np.ndarray, risk: np.ndarray, chunk_pairs: int = 4_000_000
) -> tuple[int, int, int]:
    """(concordant, tied-risk, admissible) pair counts of Harrell's c-index, lifelines' tie rules.

    A pair (i, j) is admissible when i had the event and either ``t_i < t_j`` or ``t_i == t_j`` with j
    censored; it is concordant when ``risk_i > risk_j``. Two events at the same time are not compared.
    Vectorised O(n_events * n) in row chunks of at most ``chunk_pairs`` comparisons.
    """
    t, e, r = _survival_arrays(time, event, risk)
    rows = np.nonzero(e)[0]
    step = max(1, chunk_pairs // max(t.size, 1))
    correct = tied = pairs = 0
    for start in range(0, rows.size, step):
        i = rows[start : start + step]
        ti, ri = t[i, None], r[i, None]  # (B, 1)
        admissible = (ti < t[None, :]) | ((ti == t[None, :]) & ~e[None, :])  # (B, N)
        pairs += int(admissible.sum())
        correct += int((admissible & (ri > r[None, :])).sum())
        tied += int((admissible & (ri == r[None, :])).sum())
    return correct, tied, pairs


def concordance_index(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> float:
    """Harrell's c-index of a risk score (higher risk = shorter survival)."""
    correct, tied, pairs = concordance_counts(time, event, risk)
    if pairs == 0:
        raise UndefinedMetricError("c-index is undefined: no admissible pairs (no observed events?)")
    return (correct + 0.5 * tied) / pairs


def survival_metrics(time: np.ndarray, event: np.ndarray, risk: np.ndarray) -> dict[str, float]:
    """``c_index`` of (N,) risks against (N,) times and (N,) event indicators."""
    return {"c_index": concordance_index(time, event, risk)}


def summarize_folds(
    per_fold: Sequence[Mapping[str, object]], ddof: int = 1
) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation (``ddof=1`` like pandas) of every numeric metric over folds.

    Non-numeric entries (and booleans) are ignored; NaN values are left out of the mean of their metric.
    Keys describing the fold rather than a score (``fold``, ``n_*``, ``hp_*`` hyper-parameters) are skipped.
    """
    values: dict[str, list[float]] = {}
    for row in per_fold:
        for k, v in row.items():
            if k == "fold" or k.startswith(("n_", "hp_")) or isinstance(v, bool):
                continue
            if isinstance(v, (int, float, np.integer, np.floating)):
                values.setdefault(k, []).append(float(v))
    out: dict[str, tuple[float, float]] = {}
    for k, vs in values.items():
        a = np.asarray(vs)
        a = a[np.isfinite(a)]
        if a.size == 0:
            out[k] = (float("nan"), float("nan"))
            continue
        std = float(a.std(ddof=ddof)) if a.size > ddof else 0.0
        out[k] = (float(a.mean()), std)
    return out


__all__ = [
    "UndefinedMetricError",
    "accuracy",
    "balanced_accuracy",
    "classification_metrics",
    "concordance_counts",
    "concordance_index",
    "f1",
    "roc_auc",
    "roc_curve",
    "summarize_folds",
    "survival_metrics",
]
