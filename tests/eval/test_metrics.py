"""Metrics must equal scikit-learn / lifelines; bootstrap CIs must be deterministic and sensible."""

from __future__ import annotations

import numpy as np
import pytest
from lifelines.utils import concordance_index as lifelines_cindex
from sklearn import metrics as skm

from gigaslide.eval.bootstrap import bootstrap_ci
from gigaslide.eval.metrics import (
    UndefinedMetricError,
    accuracy,
    balanced_accuracy,
    classification_metrics,
    concordance_index,
    f1,
    roc_auc,
    roc_curve,
    summarize_folds,
    survival_metrics,
)


@pytest.mark.parametrize("seed", range(5))
def test_binary_auc_equals_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    y[:2] = [0, 1]
    score = np.round(rng.random(200) + 0.3 * y, 1)  # rounding creates many ties
    assert roc_auc(y, score) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)
    probs = np.stack([1 - score, score], axis=1)
    assert roc_auc(y, probs) == pytest.approx(skm.roc_auc_score(y, score), abs=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_multiclass_macro_ovr_auc_equals_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 4, 300)
    logits = rng.normal(size=(300, 4)) + np.eye(4)[y]
    logits[:, 2] = np.round(logits[:, 2])  # ties in one column
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = skm.roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert roc_auc(y, probs) == pytest.approx(ref, abs=1e-12)
    assert classification_metrics(y, probs)["auc"] == pytest.approx(ref, abs=1e-12)


def test_roc_curve_matches_sklearn_points() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, 100)
    s = np.round(rng.random(100), 1)
    fpr, tpr = roc_curve(y, s)
    rf, rt, _ = skm.roc_curve(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, rf)
    np.testing.assert_allclose(tpr, rt)
    assert np.trapezoid(tpr, fpr) == pytest.approx(roc_auc(y, s))


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("seed", range(4))
def test_label_metrics_equal_sklearn(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n_cls = 2 + seed % 3
    y = rng.integers(0, n_cls, 150)
    p = np.where(
        rng.random(150) < 0.6, y, rng.integers(0, n_cls + (seed == 3), 150)
    )  # seed 3: extra predicted label
    assert accuracy(y, p) == pytest.approx(skm.accuracy_score(y, p))
    assert balanced_accuracy(y, p) == pytest.approx(skm.balanced_accuracy_score(y, p))
    assert f1(y, p, average="macro") == pytest.approx(skm.f1_score(y, p, average="macro"))
    if n_cls == 2 and seed != 3:
        assert f1(y, p) == pytest.approx(skm.f1_score(y, p))


def test_f1_zero_division_and_all_negative() -> None:
    y = np.zeros(10, int)
    p = np.zeros(10, int)
    assert f1(y, p) == pytest.approx(skm.f1_score(y, p, zero_division=0)) == 0.0


def test_classification_metrics_binary_keys_and_values() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 80)
    p1 = np.clip(0.5 * y + 0.5 * rng.random(80), 0, 1)
    probs = np.stack([1 - p1, p1], 1)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    assert set(m) == {"auc", "balanced_accuracy", "accuracy", "f1", "f1_macro"}
    assert m["auc"] == pytest.approx(skm.roc_auc_score(y, p1))
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert classification_metrics(y, p1) == m  # (N,) = P(class 1)


def test_auc_errors() -> None:
    with pytest.raises(UndefinedMetricError, match="single class"):
        roc_auc(np.ones(5, int), np.linspace(0, 1, 5))
    with pytest.raises(ValueError, match="NaN"):
        roc_auc(np.array([0, 1, 0]), np.array([0.1, np.nan, 0.3]))
    with pytest.raises(UndefinedMetricError, match=r"classes \[2\] absent"):
        roc_auc(np.array([0, 1, 0, 1]), np.full((4, 3), 1 / 3))
    assert np.isnan(
        classification_metrics(np.array([0, 1, 0]), np.full((3, 3), 1 / 3), undefined="nan")["auc"]
    )


def _survival_data(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    time = rng.integers(1, 30, n).astype(float)  # integer times -> many tied times
    event = (rng.random(n) < 0.6).astype(int)
    risk = np.round(-0.05 * time + rng.normal(0, 0.5, n), 1)  # rounded -> tied risks
    return time, event, risk


@pytest.mark.parametrize("seed", range(5))
def test_cindex_equals_lifelines_with_ties(seed: int) -> None:
    time, event, risk = _survival_data(seed)
    ref = lifelines_cindex(time, -risk, event)
    assert concordance_index(time, event, risk) == pytest.approx(ref, abs=1e-12)
    assert survival_metrics(time, event, risk)["c_index"] == pytest.approx(ref, abs=1e-12)


def test_cindex_chunked_equals_unchunked_and_errors() -> None:
    from gigaslide.eval.metrics import concordance_counts

    time, event, risk = _survival_data(7, n=300)
    assert concordance_counts(time, event, risk, chunk_pairs=500) == concordance_counts(time, event, risk)
    with pytest.raises(UndefinedMetricError, match="no admissible pairs"):
        concordance_index(time, np.zeros_like(event), risk)
    with pytest.raises(ValueError, match="NaN"):
        concordance_index(time, event, np.r_[np.nan, risk[1:]])


def test_summarize_folds_mean_std() -> None:
    rows = [{"fold": i, "n_test": 10, "auc": a, "hp_C": 1.0} for i, a in enumerate([0.7, 0.8, 0.9])]
    s = summarize_folds(rows)
    assert set(s) == {"auc"}
    assert s["auc"][0] == pytest.approx(0.8)
    assert s["auc"][1] == pytest.approx(np.std([0.7, 0.8, 0.9], ddof=1))


def test_bootstrap_ci_deterministic_contains_point() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 120)
    s = rng.random(120) + 0.5 * y
    a = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=1)
    b = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=1)
    c = bootstrap_ci(roc_auc, y, s, n_boot=300, seed=2)
    assert tuple(a) == tuple(b) and tuple(a) != tuple(c)
    low, high, point = a
    assert point == pytest.approx(skm.roc_auc_score(y, s))
    assert low < point < high
    assert 0.05 < high - low < 0.4
    assert a.n_boot == 300 and a.n_invalid == 0


def test_bootstrap_counts_undefined_resamples_and_stratifies() -> None:
    y = np.array([1] + [0] * 19)  # a single positive: most resamples lack it
    s = np.linspace(0, 1, 20)
    ci = bootstrap_ci(roc_auc, y, s, n_boot=50, seed=0, max_invalid_fraction=5.0)
    assert ci.n_invalid > 0 and ci.n_boot == 50
    strat = bootstrap_ci(roc_auc, y, s, n_boot=50, seed=0, stratify=y)
    assert strat.n_invalid == 0  # stratified resamples always keep the positive
    with pytest.raises(ValueError, match="undefined on"):
        bootstrap_ci(roc_auc, y, s, n_boot=50, seed=0, max_invalid_fraction=0.1)


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_bootstrap_interval_of_a_mean_is_z_standard_errors(alpha: float) -> None:
    # the percentile interval of a sample mean lies at mean -/+ z_{1-alpha/2} * SE (normal theory)
    x = np.random.default_rng(0).normal(loc=3.0, scale=2.0, size=1000)
    ci = bootstrap_ci(np.mean, x, n_boot=4000, alpha=alpha, seed=0)
    se = x.std() / np.sqrt(x.size)
    z = {0.05: 1.959964, 0.2: 1.281552}[alpha]
    assert ci.point == pytest.approx(x.mean())
    # [alpha, 1 - alpha] would give z = 1.645 (alpha 0.05) or 0.842 (alpha 0.2): 16% / 34% narrower
    assert ci.high - ci.point == pytest.approx(z * se, rel=0.06)
    assert ci.point - ci.low == pytest.approx(z * se, rel=0.06)
