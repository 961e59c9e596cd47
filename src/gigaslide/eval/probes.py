"""Probes on fixed slide embeddings: KNN (HIPT) and logistic-regression / Cox linear probes (Giga-SSL).

* KNN (HIPT Table 1, bottom): slide embedding = mean of its tile/region embeddings; k nearest training
  slides by cosine similarity (L2-normalised features); class probability = fraction of neighbour
  votes, optionally weighted by ``exp(similarity / T)`` as in DINO's k-NN evaluation.
* Linear (Giga-SSL Tables 2-4): features standardised with training statistics (or L2-normalised),
  scikit-learn ``LogisticRegression`` (L2, lbfgs); the inverse regularisation ``C`` is picked on the
  fold's validation set (macro AUC) along a warm-started grid.
* Survival linear probe: ``lifelines.CoxPHFitter`` with an L2 penalizer picked on validation c-index.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import pandas as pd

from gigaslide.data.split_plan import validation_problem
from gigaslide.data.splits import Split
from gigaslide.eval.metrics import (
    UndefinedMetricError,
    classification_metrics,
    concordance_index,
    roc_auc,
    summarize_folds,
    survival_metrics,
)

log = logging.getLogger(__name__)

DEFAULT_KNN_K = 20  # HIPT's KNN probe; at most half the training set when not given (default_knn_k)
DEFAULT_CS: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
DEFAULT_PENALIZERS: tuple[float, ...] = (0.01, 0.1, 1.0)


class IndexSplit(NamedTuple):
    """Row indices (into X) of one split."""

    fold: int
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


@dataclass
class FoldOutput:
    """Test-set predictions of one fold: ``scores`` (M, C) probabilities or (M,) risks."""

    fold: int
    test_idx: np.ndarray
    scores: np.ndarray
    hparams: dict[str, Any] = field(default_factory=dict)


@dataclass
class ProbeResult:
    """Per-fold metrics, out-of-fold predictions and ``summary`` = {metric: (mean, std)}."""

    per_fold: list[dict[str, Any]]
    predictions: pd.DataFrame
    summary: dict[str, tuple[float, float]]
    config: dict[str, Any]


# ----------------------------------------------------------------------------- feature scaling


def normalize_features(
    X_train: np.ndarray, *others: np.ndarray, method: str = "standard"
) -> tuple[np.ndarray, ...]:
    """Scale (N, E) features: ``standard`` (z-score, training statistics), ``l2`` (unit rows), ``none``."""
    if method == "none":
        return (X_train, *others)
    if method == "l2":
        return tuple(
            a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12) for a in (X_train, *others)
        )
    if method != "standard":
        raise ValueError(f"normalize must be 'standard', 'l2' or 'none', got {method!r}")
    mu = X_train.mean(axis=0)
    sd = X_train.std(axis=0)
    sd[sd < 1e-12] = 1.0  # constant features stay 0 after centring
    return tuple((a - mu) / sd for a in (X_train, *others))


# ----------------------------------------------------------------------------- KNN


def default_knn_k(n_train: int) -> int:
    """HIPT's k = 20, or half the training slides when that is fewer (at least 1)."""
    return int(min(DEFAULT_KNN_K, max(1, n_train // 2)))


def knn_predict_proba(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    n_classes: int,
    k: int | None = None,
    metric: str = "cosine",
    weighting: str = "uniform",
    temperature: float = 0.07,
    fold: int | None = None,
) -> np.ndarray:
    """(M, C) class probabilities of (M, E) test rows from their ``k`` nearest (N, E) training rows.

    ``k=None`` uses :func:`default_knn_k` neighbours (``DEFAULT_KNN_K``, or half the N training rows
    when that is fewer: with all N voting, every prediction would be the training-set class prior).
    An explicit ``k`` larger than N is clamped to N with a warning naming ``fold``.

    ``metric="cosine"`` (L2-normalised dot product) or ``"euclidean"``; ``weighting="uniform"``
    (fraction of votes) or ``"distance"`` (``exp(sim / temperature)`` for cosine, ``1 / d`` for
    euclidean). Ties in distance are broken by training-row order (deterministic).
    """
    if X_train.shape[0] == 0:
        raise ValueError("KNN needs at least one training slide")
    n_train = int(X_train.shape[0])
    if k is None:
        k = default_knn_k(n_train)
    if k > n_train:
        log.warning(
            "%sKNN k=%d exceeds the %d training slide(s); using k=%d: every test slide votes over the whole "
            "training set (with uniform weighting each prediction is the training class prior); lower --k",
            "" if fold is None else f"fold {fold}: ",
            k,
            n_train,
            n_train,
        )
    k = int(min(k, n_train))
    if metric == "cosine":
        a, b = normalize_features(X_train, X_test, method="l2")
        sim = b @ a.T  # (M, N)
        order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
        near = np.take_along_axis(sim, order, axis=1)
        w = np.exp((near - 1.0) / temperature) if weighting == "distance" else np.ones_like(near)
    elif metric == "euclidean":
        d2 = (X_test**2).sum(1)[:, None] + (X_train**2).sum(1)[None, :] - 2.0 * X_test @ X_train.T
        order = np.argsort(d2, axis=1, kind="stable")[:, :k]
        near = np.sqrt(np.maximum(np.take_along_axis(d2, order, axis=1), 0.0))
        w = 1.0 / (near + 1e-8) if weighting == "distance" else np.ones_like(near)
    else:
        raise ValueError(f"metric must be 'cosine' or 'euclidean', got {metric!r}")
    if weighting not in ("uniform", "distance"):
        raise ValueError(f"weighting must be 'uniform' or 'distance', got {weighting!r}")
    votes = np.zeros((X_test.shape[0], n_classes))
    np.add.at(votes, (np.arange(X_test.shape[0])[:, None], y_train[order]), w)
    return votes / votes.sum(axis=1, keepdims=True)


# ----------------------------------------------------------------------------- linear probes


def _score_val(y_val: np.ndarray, probs: np.ndarray) -> float:
    """Validation criterion: AUC, or minus log-loss when AUC is undefined (a class missing)."""
    try:
        return roc_auc(y_val, probs[:, 1] if probs.shape[1] == 2 else probs)
    except UndefinedMetricError:
        p = np.clip(probs[np.arange(y_val.size), y_val], 1e-12, 1.0)
        return float(np.log(p).mean()) - 1.0  # always below any AUC


def linear_probe_fold(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_test: np.ndarray,
    X_val: np.ndarray | None = None,
    y_val: np.ndarray | None = None,
    n_classes: int | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    default_C: float = 1.0,
    normalize: str = "standard",
    max_iter: int = 2000,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit L2 logistic regression on one fold; return (M, C) test probabilities and the chosen C.

    With a validation set, every C of ``Cs`` (ascending, warm-started) is fitted and the one with the
    best validation AUC is kept; without one, ``default_C`` is used.
    """
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    n_classes = int(n_classes or (int(y_train.max()) + 1))
    present = np.unique(y_train)
    if present.size < 2:
        raise ValueError(f"training set has a single class {present.tolist()}; cannot fit a linear probe")
    has_val = X_val is not None and y_val is not None and len(y_val) > 0
    Xv = X_val if has_val else X_train[:0]
    Xtr, Xte, Xv = normalize_features(X_train, X_test, Xv, method=normalize)
    grid = sorted(Cs) if has_val else [default_C]
    clf = LogisticRegression(C=grid[0], max_iter=max_iter, warm_start=True, tol=1e-4)
    best: tuple[float, float, np.ndarray] | None = None

    def full(p: np.ndarray) -> np.ndarray:  # classes absent from training get probability 0
        out = np.zeros((p.shape[0], n_classes))
        out[:, clf.classes_] = p
        return out

    for c in grid:
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(Xtr, y_train)
        score = _score_val(y_val, full(clf.predict_proba(Xv))) if has_val else 0.0
        if best is None or score > best[0]:
            best = (score, c, full(clf.predict_proba(Xte)))
    assert best is not None
    return best[2], {"hp_C": best[1], "hp_C_selected_on_val": bool(has_val)}


def cox_probe_fold(
    X_train: np.ndarray,
    time_train: np.ndarray,
    event_train: np.ndarray,
    X_test: np.ndarray,
    X_val: np.ndarray | None = None,
    time_val: np.ndarray | None = None,
    event_val: np.ndarray | None = None,
    penalizers: Sequence[float] = DEFAULT_PENALIZERS,
    default_penalizer: float = 0.1,
    normalize: str = "standard",
) -> tuple[np.ndarray, dict[str, Any]]:
    """Penalised Cox model (lifelines ``CoxPHFitter``, L2) on one fold: (M,) test log-risks + penalizer."""
    from lifelines import CoxPHFitter

    if int(np.sum(event_train)) == 0:
        raise ValueError("training set has no observed events; cannot fit a Cox model")
    has_val = X_val is not None and time_val is not None and event_val is not None and len(time_val) > 0
    Xv = X_val if has_val else X_train[:0]
    Xtr, Xte, Xv = normalize_features(X_train, X_test, Xv, method=normalize)
    cols = [f"x{i}" for i in range(Xtr.shape[1])]
    train = pd.DataFrame(Xtr, columns=cols).assign(
        _time=np.asarray(time_train, float), _event=np.asarray(event_train, int)
    )
    best: tuple[float, float, np.ndarray] | None = None
    for pen in sorted(penalizers) if has_val else [default_penalizer]:
        cph = CoxPHFitter(penalizer=pen, l1_ratio=0.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cph.fit(train, duration_col="_time", event_col="_event")
        score = 0.0
        if has_val:
            risk_val = np.asarray(cph.predict_log_partial_hazard(pd.DataFrame(Xv, columns=cols)))
            try:
                score = concordance_index(time_val, event_val, risk_val)
            except UndefinedMetricError:
                score = 0.0
        if best is None or score > best[0]:
            best = (score, pen, np.asarray(cph.predict_log_partial_hazard(pd.DataFrame(Xte, columns=cols))))
    assert best is not None
    return best[2], {"hp_penalizer": best[1], "hp_penalizer_selected_on_val": bool(has_val)}


def index_splits(splits: Sequence[Split], ids: Sequence[str]) -> list[IndexSplit]:
    """Map slide-id splits to row indices of ``ids``; raise listing ids that have no embedding."""
    pos = {s: i for i, s in enumerate(map(str, ids))}
    missing = sorted({s for sp in splits for s in sp.all_ids() if s not in pos})
    if missing:
        raise ValueError(
            f"{len(missing)} slide id(s) in the splits have no embedding: {missing[:20]}"
            f"{' ...' if len(missing) > 20 else ''}"
        )
    as_idx = lambda lst: np.asarray([pos[s] for s in lst], dtype=np.int64)  # noqa: E731
    return [IndexSplit(sp.fold, as_idx(sp.train), as_idx(sp.val), as_idx(sp.test)) for sp in splits]


def linear_probe_splits(
    X: np.ndarray,
    y: np.ndarray,
    splits: Sequence[IndexSplit | Split],
    ids: Sequence[str] | None = None,
    Cs: Sequence[float] = DEFAULT_CS,
    normalize: str = "standard",
    max_iter: int = 2000,
) -> list[FoldOutput]:
    """Giga-SSL linear probe over many splits of (N, E) ``X`` and (N,) integer labels ``y``.

    ``splits`` are :class:`IndexSplit` row indices, or :class:`Split` slide ids with ``ids`` (N,).
    """
    X = np.asarray(X, dtype=np.float64)
    y = np.asarray(y, dtype=np.int64)
    if splits and isinstance(splits[0], Split):
        if ids is None:
            raise ValueError("Split objects hold slide ids: pass ids= to map them to rows of X")
        splits = index_splits(splits, ids)  # type: ignore[arg-type]
    n_classes = int(y.max()) + 1
    out = []
    for sp in splits:
        probs, hp = linear_probe_fold(
            X[sp.train],
            y[sp.train],
            X[sp.test],
            X[sp.val],
            y[sp.val],
            n_classes,
            Cs,
            normalize=normalize,
            max_iter=max_iter,
        )
        out.append(FoldOutput(sp.fold, sp.test, probs, hp))
    return out


# ----------------------------------------------------------------------------- cross-validated probe


def _val_warning(problem: str | None, fold: int, method: str, task: str, empty: bool) -> str | None:
    """Loud warning (returned for per_fold.csv) when a fold's validation set cannot pick hyper-parameters."""
    if problem is None or method == "knn":  # KNN does not use the validation set
        return None
    hp = "C" if task == "classification" else "penalizer"
    if empty:
        effect = f"no hyper-parameter selection: the default {hp} is used"
    elif task == "classification":
        effect = "validation AUC is undefined: C is selected on the validation log-likelihood instead"
    else:
        effect = "validation c-index is undefined: every penalizer ties and the smallest is used"
    msg = f"fold {fold}: {problem}; {effect}"
    log.warning("%s", msg)
    return msg


def encode_labels(labels: pd.Series) -> tuple[np.ndarray, list[str]]:
    """Map labels to ``0..C-1`` (sorted; numeric labels sorted numerically) and return the class names."""
    vals = labels.to_numpy()
    try:
        classes = sorted(set(vals.tolist()), key=float)
    except (TypeError, ValueError):
        classes = sorted(set(map(str, vals.tolist())))
        vals = vals.astype(str)
    index = {c: i for i, c in enumerate(classes)}
    return np.asarray([index[v] for v in vals.tolist()], dtype=np.int64), [str(c) for c in classes]


def _check_inputs(X: np.ndarray, ids: Sequence[str]) -> np.ndarray:
    X = np.asarray(X, dtype=np.float64)
    if X.ndim != 2 or X.shape[0] != len(ids):
        raise ValueError(f"embeddings must be (N={len(ids)}, E), got shape {X.shape}")
    bad = ~np.isfinite(X).all(axis=1)
    if bad.any():
        names = [str(ids[i]) for i in np.nonzero(bad)[0][:20]]
        raise ValueError(f"{int(bad.sum())} embedding row(s) contain NaN/inf: {names}")
    dup = pd.Series(list(map(str, ids))).duplicated()
    if dup.any():
        raise ValueError(
            f"duplicate slide ids among embeddings: {sorted(set(np.asarray(ids)[dup.to_numpy()]))[:20]}"
        )
    return X


def run_probe(
    X: np.ndarray,
    ids: Sequence[str],
    df: pd.DataFrame,
    splits: Sequence[Split],
    method: str = "linear",
    task: str = "classification",
    label_col: str = "label",
    time_col: str = "time",
    event_col: str = "event",
    id_col: str = "slide_id",
    **kw: Any,
) -> ProbeResult:
    """Cross-validated probe of (N, E) slide embeddings ``X`` (rows named by ``ids``).

    Args:
        df: labels table with ``id_col`` and ``label_col`` (classification) or ``time_col`` +
            ``event_col`` (survival).
        splits: train/val/test slide ids per fold (see :mod:`gigaslide.data.splits`).
        method: ``"linear"`` (logistic regression / Cox) or ``"knn"`` (classification only).
        **kw: ``k``, ``metric``, ``weighting`` for KNN; ``Cs``, ``normalize``, ``max_iter`` for the
            linear probe; ``penalizers``, ``normalize`` for the Cox probe.

    Returns:
        :class:`ProbeResult`; ``predictions`` has one row per (fold, test slide): slide_id, fold and
        y, label, prob_<c>..., pred (classification) or time, event, risk (survival).
    """
    X = _check_inputs(X, ids)
    if method not in ("linear", "knn"):
        raise ValueError(f"method must be 'linear' or 'knn', got {method!r}")
    if task not in ("classification", "survival"):
        raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
    if task == "survival" and method == "knn":
        raise ValueError(
            "KNN probe is defined for classification only; use method='linear' (Cox) for survival"
        )
    target_cols = [label_col] if task == "classification" else [time_col, event_col]
    missing_cols = [c for c in [id_col, *target_cols] if c not in df.columns]
    if missing_cols:
        raise ValueError(f"labels table lacks column(s) {missing_cols}; it has {list(df.columns)}")
    used = sorted({s for sp in splits for s in sp.all_ids()})
    tab = df.assign(**{id_col: df[id_col].astype(str)}).drop_duplicates(id_col).set_index(id_col)
    unknown = [s for s in used if s not in tab.index]
    if unknown:
        raise ValueError(
            f"{len(unknown)} slide id(s) in the splits are not in the labels table: {unknown[:20]}"
        )
    tab = tab.loc[used]
    na = tab.index[tab[target_cols].isna().any(axis=1)].tolist()
    if na:
        raise ValueError(f"{len(na)} slide(s) have no {'/'.join(target_cols)} value: {na[:20]}")
    rows = index_splits(splits, ids)
    pos = {s: i for i, s in enumerate(map(str, ids))}
    row_of_used = np.asarray([pos[s] for s in used])
    config: dict[str, Any] = {
        "method": method,
        "task": task,
        "n_slides": len(used),
        "embed_dim": int(X.shape[1]),
    }
    config.update({k: (list(v) if isinstance(v, (tuple, list)) else v) for k, v in kw.items()})

    if task == "classification":
        y_used, classes = encode_labels(tab[label_col])
        if len(classes) < 2:
            raise ValueError(
                f"labels table: every slide has the label {classes[0]!r} in column {label_col!r}: "
                "classification needs at least two classes"
            )
        y = np.full(X.shape[0], -1, dtype=np.int64)
        y[row_of_used] = y_used
        config["classes"] = classes
    else:
        time = np.full(X.shape[0], np.nan)
        event = np.zeros(X.shape[0], dtype=np.int64)
        time[row_of_used] = tab[time_col].to_numpy(dtype=float)
        event[row_of_used] = tab[event_col].to_numpy(dtype=float).astype(np.int64)

    per_fold: list[dict[str, Any]] = []
    frames = []
    for sp, split in zip(rows, splits):
        if sp.test.size == 0 or sp.train.size == 0:
            raise ValueError(f"split {sp.fold} has an empty train or test set")
        problem = validation_problem(split, df, task, label_col, time_col, event_col, id_col)
        base = {
            "fold": sp.fold,
            "n_train": int(sp.train.size),
            "n_val": int(sp.val.size),
            "n_test": int(sp.test.size),
            "val_warning": _val_warning(problem, sp.fold, method, task, empty=sp.val.size == 0),
        }
        sid = [str(ids[i]) for i in sp.test]
        if task == "classification":
            n_cls = len(classes)
            if method == "knn":
                probs = knn_predict_proba(
                    X[sp.train], y[sp.train], X[sp.test], n_cls,
                    k=kw.get("k"), metric=kw.get("metric", "cosine"), weighting=kw.get("weighting", "uniform"),
                    fold=sp.fold,
                )  # fmt: skip
                hp: dict[str, Any] = {
                    "hp_k": int(min(kw.get("k") or default_knn_k(sp.train.size), sp.train.size))
                }
            else:
                probs, hp = linear_probe_fold(
                    X[sp.train], y[sp.train], X[sp.test], X[sp.val], y[sp.val], n_cls,
                    Cs=kw.get("Cs", DEFAULT_CS), normalize=kw.get("normalize", "standard"),
                    max_iter=kw.get("max_iter", 2000),
                )  # fmt: skip
            metrics = classification_metrics(y[sp.test], probs, undefined="nan")
            if not np.isfinite(metrics["auc"]):
                warnings.warn(
                    f"fold {sp.fold}: a class is missing from the test set; its AUC is NaN", stacklevel=2
                )
            frame = pd.DataFrame({"slide_id": sid, "fold": sp.fold, "y": y[sp.test]})
            frame["label"] = [classes[i] for i in y[sp.test]]
            for c in range(n_cls):
                frame[f"prob_{c}"] = probs[:, c]
            frame["pred"] = probs.argmax(axis=1)
        else:
            risk, hp = cox_probe_fold(
                X[sp.train], time[sp.train], event[sp.train], X[sp.test], X[sp.val], time[sp.val], event[sp.val],
                penalizers=kw.get("penalizers", DEFAULT_PENALIZERS), normalize=kw.get("normalize", "standard"),
            )  # fmt: skip
            metrics = survival_metrics(time[sp.test], event[sp.test], risk)
            frame = pd.DataFrame(
                {
                    "slide_id": sid,
                    "fold": sp.fold,
                    "time": time[sp.test],
                    "event": event[sp.test],
                    "risk": risk,
                }
            )
        per_fold.append({**base, **metrics, **hp})
        frames.append(frame)
    predictions = pd.concat(frames, ignore_index=True)
    return ProbeResult(per_fold, predictions, summarize_folds(per_fold), config)
