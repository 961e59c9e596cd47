"""Report files, Kaplan-Meier and log-rank equal to lifelines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from lifelines import KaplanMeierFitter
from lifelines.statistics import logrank_test as lifelines_logrank
from sklearn.metrics import roc_auc_score

from gigaslide.data.splits import kfold_splits
from gigaslide.eval.bootstrap import bootstrap_ci
from gigaslide.eval.probes import run_probe
from gigaslide.eval.reports import format_metric_table, pooled_metrics, write_report
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


def test_report_fold_and_pooled_cis_separate_and_labelled(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    n = 60
    y = np.arange(n) % 2
    X = rng.normal(size=(n, 6)) + 1.2 * np.eye(2, 6)[y]
    ids = [f"s{i}" for i in range(n)]
    df = pd.DataFrame({"slide_id": ids, "case_id": ids, "label": y})
    splits = kfold_splits(df, n_folds=4, seed=0)
    res = run_probe(X, ids, df, splits, method="linear")
    write_report(tmp_path, res.summary, res.per_fold, res.predictions, "classification", n_boot=200, seed=5)
    doc = json.loads((tmp_path / "results.json").read_text())
    # fold summary: mean of the fold AUCs, CI = bootstrap of the mean over the 4 fold values
    folds = np.array([r["auc"] for r in res.per_fold])
    ref = bootstrap_ci(np.mean, folds, n_boot=200, seed=5)
    auc = doc["metrics"]["auc"]
    assert auc["mean"] == pytest.approx(folds.mean())
    assert (auc["ci_low"], auc["ci_high"]) == pytest.approx((ref.low, ref.high))
    assert "over folds" in auc["ci_method"] and auc["n_folds"] == 4
    # pooled: the metric of all out-of-fold predictions (sklearn reference) with a CI over slides
    pooled = doc["pooled"]["auc"]
    preds = res.predictions
    assert pooled["value"] == pytest.approx(roc_auc_score(preds["y"], preds["prob_1"]))
    assert pooled["value"] != pytest.approx(auc["mean"])
    assert pooled["ci_low"] <= pooled["value"] <= pooled["ci_high"]
    assert "pooled test slides" in pooled["ci_method"] and pooled["n"] == n == doc["n_predictions"]
    md = (tmp_path / "summary.md").read_text()
    assert "| metric | fold mean ± std | 95% CI over folds | pooled test | 95% CI pooled |" in md
    row = next(line for line in md.splitlines() if line.startswith("| auc |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells == [
        "auc",
        f"{auc['mean']:.3f} ± {auc['std']:.3f}",
        f"[{auc['ci_low']:.3f}, {auc['ci_high']:.3f}]",
        f"{pooled['value']:.3f}",
        f"[{pooled['ci_low']:.3f}, {pooled['ci_high']:.3f}]",
    ]
    table = format_metric_table(doc["metrics"], doc["pooled"])
    header = [c for c in table.splitlines()[0].split("  ") if c.strip()]
    assert [c.strip() for c in header] == [
        "metric",
        "fold mean ± std",
        "95% CI over folds",
        "pooled test",
        "95% CI pooled",
    ]
    assert f"{pooled['value']:.3f}" in table.splitlines()[1]
    # given pooled metrics (e.g. case-level bags from crossval) are written as they are
    given = pooled_metrics(preds, "classification", ["auc"], n_boot=50, seed=0, unit="cases")
    write_report(tmp_path / "b", res.summary, res.per_fold, preds, "classification", n_boot=50, pooled=given)
    doc_b = json.loads((tmp_path / "b" / "results.json").read_text())
    assert doc_b["pooled"] == given and "pooled test cases" in doc_b["pooled"]["auc"]["ci_method"]
    with pytest.raises(ValueError, match="need value, ci_low, ci_high"):
        write_report(
            tmp_path / "c", res.summary, res.per_fold, preds, "classification", pooled={"auc": {"low": 0}}
        )
