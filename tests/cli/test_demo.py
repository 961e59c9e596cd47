"""The demo runs the whole pipeline (DINO-pretrained tile encoder included) on a generated cohort, and
attention MIL learns the synthetic signal."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gigaslide.cli.main import main


def test_demo_end_to_end_learns_signal(tmp_path: Path, capsys) -> None:
    out = tmp_path / "demo"
    argv = ["demo", "--out", str(out), "--n-slides", "16", "--size", "2560", "--folds", "3", "--epochs", "12"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "gigaslide demo results" in printed and "auc=" in printed
    assert "tile encoder: vit_tiny_d4 pretrained with DINO on the demo tiles" in printed

    labels = pd.read_csv(out / "cohort" / "labels.csv")
    assert len(labels) == 16 and set(labels["label"]) == {0, 1}
    manifest = pd.read_csv(out / "features" / "manifest.csv")
    assert (manifest["status"] == "done").all()
    with h5py.File(out / "features" / "h5_files" / f"{labels.slide_id[0]}.h5") as f:
        # the tiles are embedded with the DINO-pretrained teacher, not random weights
        assert f["features"].shape[1] == 192 and not bool(f["features"].attrs["random_init"])
        assert f["features"].attrs["encoder"] == "vit_tiny_d4"
        assert f["coords"].attrs["target_mpp"] == 1.0

    cls = json.loads((out / "train_cls" / "results.json").read_text())["metrics"]
    # attention MIL is clearly better than chance on the synthetic task (generous margin)
    assert cls["auc"]["mean"] > 0.75, cls["auc"]
    surv = json.loads((out / "train_surv" / "results.json").read_text())["metrics"]
    assert 0.0 <= surv["c_index"]["mean"] <= 1.0
    probe = json.loads((out / "probe" / "results.json").read_text())["metrics"]
    assert probe["auc"]["mean"] > 0.75

    preds = pd.read_csv(out / "train_cls" / "predictions.csv")
    assert set(preds["sample_id"]) == set(labels["slide_id"])  # every slide tested exactly once across folds
    assert preds["sample_id"].is_unique
    heat = np.asarray(Image.open(out / "heatmap.png"))
    assert heat.ndim == 3 and heat.shape[2] in (3, 4) and heat.std() > 0
    # the Giga-SSL step: pretrained and untrained aggregator and mean pooling, side by side
    gs = pd.read_csv(out / "gigassl" / "evaluation" / "results.csv")
    assert set(gs["representation"]) == {"giga-ssl", "untrained aggregator", "mean pooling"}
    assert list(gs["budget"].unique()) == ["100%", "25%"] and gs["auc_mean"].between(0, 1).all()
    assert "Giga-SSL linear probe (AUC)" in printed
    # the HIPT step: region grids -> stage-2 DINO -> hipt (ViT_4096 frozen) -> region heatmap
    stage2 = torch.load(out / "hipt" / "stage2" / "checkpoint.pth", map_location="cpu", weights_only=False)
    assert set(stage2) >= {"teacher", "student", "dino_loss"}
    hipt = json.loads((out / "hipt" / "train" / "results.json").read_text())["metrics"]
    assert 0.0 <= hipt["auc"]["mean"] <= 1.0 and "HIPT (stage-2 pretrained ViT_4096" in printed
    assert np.asarray(Image.open(out / "hipt" / "heatmap.png")).std() > 0
    knn = json.loads((out / "hipt" / "knn" / "results.json").read_text())
    assert knn["n_predictions"] == 16 and "HIPT KNN on mean ViT_256 region tokens: AUC" in printed
    assert knn["metrics"]["auc"]["mean"] > 0.75  # k = half the training slides: not the class prior

    ckpt = torch.load(out / "pretrain" / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert ckpt["epoch"] == 1 and {"teacher", "student", "dino_loss"} <= set(ckpt)
    # the LongViT step: slide images -> pretrain longvit -> finetune -> relevance heatmap
    assert json.loads((out / "longvit" / "train" / "results.json").read_text())["n_predictions"] == 16
    assert (out / "longvit" / "pretrain" / "checkpoint.pth").is_file() and "longvit/train" in printed
    assert np.asarray(Image.open(out / "longvit" / "heatmap.png")).std() > 0

    # a rerun resumes every stage: nothing is recomputed, same results
    mtime = (out / "features" / "h5_files" / f"{labels.slide_id[0]}.h5").stat().st_mtime_ns
    assert main(argv) == 0
    assert (out / "features" / "h5_files" / f"{labels.slide_id[0]}.h5").stat().st_mtime_ns == mtime
    again = json.loads((out / "train_cls" / "results.json").read_text())["metrics"]
    assert again["auc"]["mean"] == cls["auc"]["mean"]


@pytest.mark.slow
def test_demo_default_settings(tmp_path: Path) -> None:
    """`make demo` as shipped: 24 slides of 4096 px, 4 folds, 20 epochs."""
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    cls = json.loads((out / "train_cls" / "results.json").read_text())["metrics"]
    assert cls["auc"]["mean"] > 0.75
    assert len(pd.read_csv(out / "cohort" / "labels.csv")) == 24
