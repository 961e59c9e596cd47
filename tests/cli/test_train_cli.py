"""`gigaslide train` / `gigaslide heatmap` end to end on a tiny synthetic cohort; config precedence."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from PIL import Image

from gigaslide.cli.main import main
from gigaslide.cli.train import build_config
from gigaslide.data.features_io import write_features
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.train.config import TrainConfig, apply_overrides, load_config, save_config


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cohort(root: Path, n: int = 12) -> tuple[Path, Path]:
    rng = np.random.default_rng(0)
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.5, level_downsamples=[1.0, 2.0], level0_dims=(1024, 768)
    )
    xs, ys = np.meshgrid(np.arange(0, 1024, 256), np.arange(0, 768, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (12, 2)
    rows = []
    for i in range(n):
        f = rng.normal(size=(len(coords), 8)).astype(np.float32)
        f[:2] += 3.0 * (i % 2)
        write_features(root / "feats" / "h5_files" / f"s{i}.h5", f, coords, coords_attrs=spec.to_attrs())
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i // 2}", "label": ["lo", "hi"][i % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "feats", root / "labels.csv"


def test_train_then_heatmap_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats, labels = _cohort(tmp_path)
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(yaml.safe_dump({"lr": 5e-3, "warmup_epochs": 0, "bootstrap": 20, "epochs": 9}))
    out = tmp_path / "run"
    argv = [
        "train",
        "--features",
        str(feats),
        "--labels",
        str(labels),
        "--model",
        "abmil",
        "--task",
        "classification",
        "--folds",
        "3",
        "--epochs",
        "2",
        "--seed",
        "1",
        "--config",
        str(cfg_file),
        "--set",
        "model_kwargs.hidden_dims=[16,8]",
        "--set",
        "max_tiles=6",
        "--device",
        "cpu",
        "--out",
        str(out),
    ]
    assert main(argv) == 0
    assert "auc" in capsys.readouterr().out
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert used["epochs"] == 2 and used["lr"] == 5e-3 and used["max_tiles"] == 6  # flag beats YAML
    assert used["model_kwargs"] == {"hidden_dims": [16, 8]} and used["_meta"]["label_map"] == {
        "hi": 0,
        "lo": 1,
    }
    assert load_config(out / "config.yaml").epochs == 2  # the written config reloads
    results = json.loads((out / "results.json").read_text())
    assert set(results["metrics"]) >= {"auc", "balanced_accuracy", "f1"}
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["fold0.pt", "fold1.pt", "fold2.pt"]
    assert len(pd.read_csv(out / "predictions.csv")) == 12
    assert main(argv) == 0  # rerun resumes: every fold skipped

    from gigaslide.synth import write_synthetic_slide

    slide = write_synthetic_slide(tmp_path / "s0.tiff", width=1024, height=768, mpp=0.5, seed=0)
    png = tmp_path / "heat.png"
    assert (
        main(
            [
                "heatmap",
                "--slide",
                str(slide),
                "--scores",
                str(out / "attention" / "s0.h5"),
                "--out",
                str(png),
                "--max-size",
                "512",
            ]
        )
        == 0
    )
    assert Image.open(png).size == (512, 384)
    png2 = tmp_path / "heat_model.png"
    assert (
        main(
            [
                "heatmap",
                "--slide",
                str(slide),
                "--scores",
                str(feats / "h5_files" / "s0.h5"),
                "--model",
                str(out / "checkpoints" / "fold0.pt"),
                "--out",
                str(png2),
                "--region",
                "0,0,512,512",
                "--max-size",
                "256",
            ]
        )
        == 0
    )
    assert Image.open(png2).size == (256, 256)


def test_train_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    feats, labels = _cohort(tmp_path, n=4)
    (feats / "h5_files" / "s3.h5").unlink()
    code = main(["train", "--features", str(feats), "--labels", str(labels), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "no feature file" in err and "s3" in err and str(labels) in err
    code = main(
        [
            "train",
            "--features",
            str(feats),
            "--labels",
            str(labels),
            "--out",
            str(tmp_path / "o"),
            "--set",
            "learning_rate=1",
        ]
    )
    assert code == 2 and "unknown training config key(s) ['learning_rate']" in capsys.readouterr().err


def test_config_precedence_and_validation(tmp_path: Path) -> None:
    path = save_config(TrainConfig(lr=1e-3, epochs=7), tmp_path / "c.yaml", meta={"note": 1})
    ns = argparse.Namespace(
        config=path,
        model=None,
        task="survival",
        folds=None,
        monte_carlo=None,
        test_fraction=None,
        val_fraction=0.3,
        train_fraction=0.25,
        few_shot=None,
        case_level=None,
        classes=None,
        epochs=None,
        seed=3,
        cache=None,
        overrides=["epochs=4", "max_tiles=null", "classes=[a, b]"],
    )
    cfg = build_config(ns)
    assert (cfg.lr, cfg.epochs, cfg.task, cfg.train_fraction, cfg.seed) == (1e-3, 4, "survival", 0.25, 3)
    assert cfg.max_tiles is None and cfg.classes == ["a", "b"]
    assert (cfg.val_fraction, cfg.monte_carlo, cfg.test_fraction) == (0.3, None, 0.2)
    with pytest.raises(ValueError, match="test_fraction must be in"):
        apply_overrides(cfg, ["monte_carlo=5", "test_fraction=0.8"])  # 0.8 + 0.3 >= 1
    with pytest.raises(ValueError, match="expected"):
        apply_overrides(cfg, ["epochs=many"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides(cfg, ["epochs"])
    with pytest.raises(ValueError, match="monitor must be one of"):
        apply_overrides(cfg, ["monitor=auc"])


def test_train_monte_carlo_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from gigaslide.data.splits import assert_no_case_leakage, load_split_csvs

    feats, labels = _cohort(tmp_path)
    table = pd.read_csv(labels)
    table["label"] = [["lo", "hi"][int(c[1:]) % 2] for c in table.case_id]  # one label per case
    table.to_csv(labels, index=False)
    out = tmp_path / "mc"
    argv = ["train", "--features", str(feats), "--labels", str(labels), "--monte-carlo", "3",
            "--test-fraction", "0.34", "--val-fraction", "0.2", "--epochs", "1", "--set", "bootstrap=20",
            "--set", "model_kwargs.hidden_dims=[8,4]", "--device", "cpu", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "3 Monte Carlo splits, 0.34 test" in printed
    assert "fold mean ± std" in printed and "95% CI over folds" in printed and "95% CI pooled" in printed
    assert sorted(p.name for p in (out / "splits").glob("splits_*.csv")) == [
        f"splits_{k}.csv" for k in range(3)
    ]
    splits = load_split_csvs(out / "splits", df=table)
    assert_no_case_leakage(splits, table)
    label = table.set_index("slide_id")["label"]
    for sp in splits:
        assert len(set(table.set_index("slide_id").loc[sp.test, "case_id"])) == 2  # round(0.34 * 6) cases
        assert set(label[sp.test]) == set(label[sp.val]) == set(label[sp.train]) == {"lo", "hi"}
    assert splits[0].test != splits[1].test or splits[1].test != splits[2].test
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["monte_carlo"], used["test_fraction"], used["val_fraction"]) == (3, 0.34, 0.2)
    results = json.loads((out / "results.json").read_text())
    assert results["n_folds"] == 3 and "Monte Carlo" in results["title"]
    assert results["n_predictions"] == len(pd.read_csv(out / "predictions.csv")) == 3 * 4
    code = main([*argv[:-2], "--splits", str(out / "splits"), "--out", str(tmp_path / "x")])
    assert code == 2 and "exclude each other" in capsys.readouterr().err
