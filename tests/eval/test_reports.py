"""Report files, Kaplan-Meier and log-rank equal to lifelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank

from gigaslide.data.splits import kfold_splits
from gigaslide.eval.probes import run_probe
from gigaslide.eval.reports import write_report
from gigaslide.eval.survival_plots import kaplan_meier, logrank_test


def _surv(seed: int, n: int = 60) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(1, 25, n).astype(float), (rng.random(n) < 0.6).astype(int)


@pytest.mark.parametrize("seed", range(3))
def test_kaplan_meier_equals_lifelines(seed: int) -> None:
    t, e = _surv(seed)
    timeline, surv = kaplan_meier(t, e)
    ref = KaplanMeierFitter().fit(t, e).survival_function_
    np.testing.assert_allclose(timeline, ref.index.to_numpy())
    np.testing.assert_allclose(surv, ref.iloc[:, 0].to_numpy(), atol=1e-12)


@pytest.mark.parametrize("seed", range(3))
def test_logrank_equals_lifelines(seed: int) -> None:
    ta, ea = _surv(seed)
    tb, eb = _surv(seed + 10, n=45)
    tb = tb + 3 * seed  # group B lives longer for seed > 0
    ours = logrank_test(ta, ea, tb, eb)
    ref = lifelines_logrank(ta, tb, event_observed_A=ea, event_observed_B=eb)
    assert ours.statistic == pytest.approx(ref.test_statistic, rel=1e-10)
    assert ours.p_value == pytest.approx(ref.p_value, rel=1e-8)


def test_logrank_no_events_errors() -> None:
    with pytest.raises(ValueError, match="log-rank test undefined"):
        logrank_test(np.ones(3), np.zeros(3), np.ones(3) * 2, np.zeros(3))


def test_classification_report_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    n = 90
    y = np.arange(n) % 3
    X = rng.normal(size=(n, 8)) + 2.0 * np.eye(3, 8)[y]
    ids = [f"s{i}" for i in range(n)]
    df = pd.DataFrame({"slide_id": ids, "case_id": ids, "label": y})
    splits = kfold_splits(df, n_folds=3, seed=0)
    res = run_probe(X, ids, df, splits, method="linear")
    paths = write_report(
        tmp_path,
        res.summary,
        res.per_fold,
        res.predictions,
        "classification",
        splits=splits,
        title="T",
        config=res.config,
        n_boot=200,
    )
    for name in ("results.json", "per_fold.csv", "predictions.csv", "summary.md", "roc.png"):
        assert (tmp_path / name).stat().st_size > 0
    assert not list(tmp_path.glob("*.tmp"))
    doc = json.loads((tmp_path / "results.json").read_text())
    auc = doc["metrics"]["auc"]
    assert auc["mean"] == pytest.approx(res.summary["auc"][0])
    assert auc["ci_low"] <= auc["mean"] <= auc["ci_high"]
    assert doc["n_folds"] == 3 and len(doc["splits"]) == 3 and doc["config"]["classes"] == ["0", "1", "2"]
    assert len(pd.read_csv(tmp_path / "per_fold.csv")) == 3
    assert len(pd.read_csv(tmp_path / "predictions.csv")) == n
    md = (tmp_path / "summary.md").read_text()
    assert "| auc |" in md and f"{res.summary['auc'][0]:.3f}" in md
    assert (tmp_path / "roc.png").read_bytes()[:4] == b"\x89PNG"
    assert set(paths) >= {"results", "per_fold", "predictions", "summary", "roc"}


def test_survival_report_km_and_logrank(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    n = 80
    risk = rng.normal(size=n)
    time = rng.exponential(np.exp(-risk)) * 10
    event = (rng.random(n) < 0.7).astype(int)
    preds = pd.DataFrame(
        {
            "slide_id": [f"s{i}" for i in range(n)],
            "fold": np.arange(n) % 2,
            "time": time,
            "event": event,
            "risk": risk,
        }
    )
    per_fold = [{"fold": 0, "c_index": 0.7}, {"fold": 1, "c_index": 0.66}]
    summary = {"c_index": (0.68, float(np.std([0.7, 0.66], ddof=1)))}
    write_report(tmp_path, summary, per_fold, preds, "survival", n_boot=100)
    doc = json.loads((tmp_path / "results.json").read_text())
    med = preds.groupby("fold")["risk"].transform("median")
    hi = preds["risk"] > med
    ref = lifelines_logrank(time[hi], time[~hi], event[hi], event[~hi])
    assert doc["logrank_p"] == pytest.approx(ref.p_value, rel=1e-8)
    assert doc["logrank_p"] < 0.05  # risk truly drives survival here
    assert (tmp_path / "km.png").read_bytes()[:4] == b"\x89PNG"
    assert not (tmp_path / "roc.png").exists()
    assert "logrank" in (tmp_path / "summary.md").read_text()
