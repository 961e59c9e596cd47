"""Cross-validation driver: outputs, case-grouped splits, resume, case-level bags, survival."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.data.cohort import Cohort
from gigaslide.data.splits import load_split_csvs
from gigaslide.experiments.crossval import run_crossval
from gigaslide.train.config import TrainConfig

KW = {"hidden_dims": [16, 8], "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cohort(build, root: Path, task: str = "classification") -> Cohort:
    """18 cases; every third case has two slides. Positive cases carry shifted tiles (tests/conftest.py)."""
    return Cohort(build(root, task=task), root, task=task)


def _cfg(**kw) -> TrainConfig:
    base = dict(epochs=3, lr=5e-3, warmup_epochs=0, folds=3, val_fraction=0.2, model_kwargs=KW, bootstrap=50)
    return TrainConfig(**{**base, **kw})


def test_outputs_splits_and_resume(tmp_path: Path, feature_cohort) -> None:
    cohort = _cohort(feature_cohort, tmp_path / "data")
    out = tmp_path / "run"
    res = run_crossval(cohort, "abmil", "classification", _cfg(), out)
    for name in (
        "results.json",
        "per_fold.csv",
        "predictions.csv",
        "summary.md",
        "roc.png",
        "config.yaml",
        "label_map.json",
        "pooled.json",
        "splits/splits_0.csv",
        "checkpoints/fold2.pt",
        "folds/fold0.json",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "label_map.json").read_text()) == {"benign": 0, "tumor": 1}
    assert set(res.summary) == {"auc", "balanced_accuracy", "accuracy", "f1"}
    assert set(res.pooled["auc"]) == {"value", "ci_low", "ci_high", "ci_method", "n"}
    assert res.pooled["auc"]["ci_low"] <= res.pooled["auc"]["value"] <= res.pooled["auc"]["ci_high"]
    assert res.pooled["auc"]["n"] == len(cohort) and "pooled test slides" in res.pooled["auc"]["ci_method"]
    # splits: slide ids grouped by case, every slide tested exactly once
    splits = load_split_csvs(out / "splits", df=cohort.table)
    case_of = dict(zip(cohort.table["slide_id"], cohort.table["case_id"]))
    for sp in splits:
        sets = [{case_of[s] for s in getattr(sp, n)} for n in ("train", "val", "test")]
        assert not (sets[0] & sets[1]) and not (sets[0] & sets[2]) and not (sets[1] & sets[2])
    tested = [s for sp in splits for s in sp.test]
    assert sorted(tested) == sorted(cohort.slide_ids)
    assert len(res.predictions) == len(cohort) and sorted(res.predictions["fold"].unique()) == [0, 1, 2]
    # attention per slide with coords and the tile geometry for heatmaps
    with h5py.File(out / "attention" / "c00_s1.h5") as f:
        assert f["coords"].shape[0] == f["scores"].shape[0] > 0
        assert f["coords"].attrs["patch_size_level0"] == 512
        assert np.isclose(f["scores"][:].sum(), 1.0, atol=1e-5)
    # resume: nothing to do, same numbers
    again = run_crossval(cohort, "abmil", "classification", _cfg(), out)
    assert again.skipped_folds == [0, 1, 2] and again.summary == res.summary
    # an unfinished fold is retrained, deterministically
    (out / "folds" / "fold1.json").unlink()
    third = run_crossval(cohort, "abmil", "classification", _cfg(), out)
    assert third.skipped_folds == [0, 2]
    assert third.per_fold[1] == res.per_fold[1]
    with pytest.raises(ValueError, match="different configuration"):
        run_crossval(cohort, "abmil", "classification", _cfg(lr=1e-3), out)


def test_case_level_and_budget(tmp_path: Path, feature_cohort) -> None:
    cohort = _cohort(feature_cohort, tmp_path / "data")
    out = tmp_path / "run"
    res = run_crossval(cohort, "abmil", "classification", _cfg(case_level=True, train_fraction=0.5), out)
    assert len(res.predictions) == 18  # one row per case
    assert set(res.predictions["sample_id"]) == set(cohort.table["case_id"])
    assert (out / "attention" / "c03_s0.h5").is_file() and (out / "attention" / "c03_s1.h5").is_file()
    full = run_crossval(cohort, "abmil", "classification", _cfg(case_level=True), tmp_path / "full")
    assert all(a["n_train"] < b["n_train"] for a, b in zip(res.per_fold, full.per_fold))
    # few-shot: N training slides per class, whole cases (a 2-slide case may leave a class short)
    few = run_crossval(cohort, "abmil", "classification", _cfg(few_shot=2, epochs=1), tmp_path / "few")
    assert all(2 <= r["n_train"] <= 4 for r in few.per_fold)  # slide-level bags: <= 2 per class


def test_survival_crossval(tmp_path: Path, feature_cohort) -> None:
    cohort = _cohort(feature_cohort, tmp_path / "data", task="survival")
    res = run_crossval(cohort, "abmil", "survival", _cfg(task="survival", n_bins=2), tmp_path / "run")
    assert set(res.summary) == {"c_index"}
    assert {"time", "event", "risk", "fold"} <= set(res.predictions.columns)
    assert (tmp_path / "run" / "km.png").is_file()
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "fold0.pt", weights_only=False)
    assert len(ckpt["time_bins"]) == 3 and ckpt["n_outputs"] == 2
    with pytest.raises(ValueError, match="differs from the cohort"):
        run_crossval(cohort, "abmil", "classification", _cfg(), tmp_path / "x")


def test_unusable_validation_sets_warned_and_recorded(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, feature_cohort
) -> None:
    cohort = _cohort(feature_cohort, tmp_path / "data")
    with caplog.at_level("WARNING", logger="gigaslide.experiments.crossval"):
        res = run_crossval(
            cohort, "abmil", "classification", _cfg(val_fraction=0.0, epochs=2), tmp_path / "a"
        )
    for r in res.per_fold:
        assert r["n_val"] == 0 and r["best_epoch"] == 1  # last epoch kept
        assert r["val_warning"] == (
            f"fold {r['fold']}: validation set is empty; early stopping and best-checkpoint selection are "
            "OFF: the LAST epoch is kept"
        )
        assert r["val_warning"] in caplog.messages  # logged once as a warning, no "WARNING" prefix of its own
    assert pd.read_csv(tmp_path / "a" / "per_fold.csv")["val_warning"].str.contains("LAST epoch").all()
    # given split files whose validation set holds one class, selected on the (undefined) AUC
    table = cohort.table
    tumor = set(table.loc[table.label == 1, "slide_id"])
    cases = sorted(table.case_id.unique())
    test = table.loc[table.case_id.isin(cases[:6]), "slide_id"].tolist()
    val = [s for s in table.loc[table.case_id.isin(cases[6:10]), "slide_id"] if s in tumor]
    train = sorted(set(table.slide_id) - set(test) - set(val))
    split_dir = tmp_path / "given"
    split_dir.mkdir()
    n = max(len(train), len(val), len(test))
    pad = lambda xs: xs + [""] * (n - len(xs))  # noqa: E731
    pd.DataFrame({"train": pad(train), "val": pad(val), "test": pad(test)}).to_csv(split_dir / "splits_0.csv")
    caplog.clear()
    with caplog.at_level("WARNING", logger="gigaslide.experiments.crossval"):
        res = run_crossval(
            cohort,
            "abmil",
            "classification",
            _cfg(monitor="metric", epochs=2),
            tmp_path / "b",
            splits_dir=split_dir,
        )
    row = res.per_fold[0]
    assert row["val_warning"].startswith(
        f"fold 0: validation set ({len(val)} slide(s)) lacks class(es) ['0']"
    )
    assert "FIRST epoch is kept" in row["val_warning"] and row["best_epoch"] == 0
    assert row["val_warning"] in caplog.messages
