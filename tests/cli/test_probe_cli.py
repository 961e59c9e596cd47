"""`gigaslide probe` end to end on a tiny synthetic feature directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gigaslide.cli.main import main
from gigaslide.data.features_io import write_features
from gigaslide.data.splits import load_split_csvs
from gigaslide.eval.reports import _fmt


def _features_dir(root: Path, n_slides: int = 40, seed: int = 0) -> tuple[Path, Path]:
    """Two classes; each slide's tiles carry a class-dependent mean shift."""
    rng = np.random.default_rng(seed)
    feat_dir = root / "feats" / "h5_files"
    rows = []
    for i in range(n_slides):
        label = i % 2
        feats = rng.normal(size=(int(rng.integers(5, 15)), 8)).astype(np.float32)
        feats[:, 0] += 3.0 * label
        coords = np.stack([np.arange(feats.shape[0]) * 256, np.zeros(feats.shape[0])], 1)
        write_features(feat_dir / f"slide{i:02d}.h5", feats, coords)
        rows.append(
            {
                "slide_id": f"slide{i:02d}",
                "case_id": f"case{label}_{i // 4:02d}",
                "label": ["LUAD", "LUSC"][label],
            }
        )
    labels = root / "labels.csv"
    pd.DataFrame(rows).to_csv(labels, index=False)
    return feat_dir.parent, labels


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_probe_cli_end_to_end(tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    feats, labels = _features_dir(tmp_path)
    out = tmp_path / "out"
    rc = main(["probe", "--embeddings", str(feats), "--labels", str(labels), "--method", method,
               "--folds", "4", "--k", "5", "--n-boot", "100", "--out", str(out)])  # fmt: skip
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert doc["metrics"]["auc"]["mean"] > 0.9
    assert doc["config"]["classes"] == ["LUAD", "LUSC"]
    assert doc["n_folds"] == 4
    for name in ("per_fold.csv", "predictions.csv", "summary.md", "roc.png", "splits/splits_0.csv"):
        assert (out / name).exists()
    preds = pd.read_csv(out / "predictions.csv")
    assert sorted(preds.slide_id) == [f"slide{i:02d}" for i in range(40)]
    printed = capsys.readouterr().out
    assert printed.startswith(f"{method} probe (classification, 4 folds) -> {out}")
    auc_row = next(line for line in printed.splitlines() if line.startswith("auc "))
    assert _fmt(doc["metrics"]["auc"]["mean"]) in auc_row and "{" not in printed  # a table, not JSON


def test_probe_cli_reuses_splits_and_few_shot(tmp_path: Path) -> None:
    feats, labels = _features_dir(tmp_path)
    first = tmp_path / "first"
    assert (
        main(
            [
                "probe",
                "--embeddings",
                str(feats),
                "--labels",
                str(labels),
                "--folds",
                "4",
                "--n-boot",
                "50",
                "--out",
                str(first),
            ]
        )
        == 0
    )
    second = tmp_path / "second"
    args = ["probe", "--embeddings", str(feats), "--labels", str(labels), "--splits", str(first / "splits"),
            "--few-shot", "4", "--n-boot", "50", "--out", str(second)]  # fmt: skip
    assert main(args) == 0
    orig = load_split_csvs(first / "splits")
    fs = load_split_csvs(second / "splits")
    for a, b in zip(orig, fs):
        assert a.test == b.test and set(b.train) <= set(a.train) and len(b.train) == 8


def test_probe_cli_npz_and_missing_ids(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    ids = np.array([f"s{i}" for i in range(30)])
    y = np.arange(30) % 2
    np.savez(tmp_path / "emb.npz", embeddings=rng.normal(size=(30, 4)) + y[:, None], slide_ids=ids)
    labels = tmp_path / "labels.csv"
    df = pd.DataFrame(
        {"slide_id": [*ids, "lost1", "lost2"], "case_id": [*ids, "x", "y"], "label": [*y, 0, 1]}
    )
    df.to_csv(labels, index=False)
    rc = main(["probe", "--embeddings", str(tmp_path / "emb.npz"), "--labels", str(labels), "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err  # the same status and one line as `train` for an unknown slide
    assert (
        err.startswith("gigaslide probe: error: 2 labelled slide(s) have no embedding")
        and "lost1, lost2" in err
    )
    df.iloc[:30].to_csv(labels, index=False)
    out = tmp_path / "o"
    assert main(["probe", "--embeddings", str(tmp_path / "emb.npz"), "--labels", str(labels), "--folds", "3",
                 "--train-fraction", "0.5", "--n-boot", "50", "--out", str(out)]) == 0  # fmt: skip
    assert json.loads((out / "results.json").read_text())["config"]["train_fraction"] == 0.5


def test_probe_cli_unreadable_feature_file_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import sys
    import warnings

    feats, labels = _features_dir(tmp_path, n_slides=12)
    (feats / "h5_files" / "slide03.h5").write_bytes(b"not an hdf5 file")

    def show(message, category, filename, lineno, file=None, line=None):  # what Python does outside pytest
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        rc = main(["probe", "--embeddings", str(feats), "--labels", str(labels), "--folds", "3", "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    # the warning is one clean line: no source line, no file:lineno, no category name
    assert lines[0] == "gigaslide probe: warning: 1 feature file(s) unreadable, skipped: ['slide03']"
    assert lines[1].startswith("gigaslide probe: error: 1 labelled slide(s)") and "slide03" in lines[1]
    assert "not a readable HDF5" in lines[1] and len(lines) == 2


def test_embedding_file_formats_and_label_errors(tmp_path: Path) -> None:
    import h5py
    import torch

    from gigaslide.cli.probe import read_labels_csv
    from gigaslide.data.embeddings import load_slide_embeddings

    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = ["a", "b", "c"]
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["embeddings"] = X
        f["slide_ids"] = np.array(ids, dtype="S")
    torch.save({"embeddings": torch.from_numpy(X), "slide_ids": ids}, tmp_path / "e.pt")
    np.savez(tmp_path / "bad.npz", feats=X)
    for name in ("e.h5", "e.pt"):
        emb = load_slide_embeddings(tmp_path / name)
        assert emb.ids == ids
        np.testing.assert_array_equal(emb.vectors, X)
    with pytest.raises(ValueError, match="needs 'embeddings'"):
        load_slide_embeddings(tmp_path / "bad.npz")
    bag = tmp_path / "feat_dir"
    write_features(bag / "s1.h5", np.ones((3, 2)) * [[1.0], [2.0], [3.0]], np.zeros((3, 2)))
    np.testing.assert_allclose(load_slide_embeddings(bag).vectors, [[2.0, 2.0]])  # mean over tiles
    csv = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["1", "2"], "label": [0, None]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"missing 'label' for slide_id \[1\] b"):
        read_labels_csv(csv)
    pd.DataFrame({"slide_id": ["a", "b"], "label": [0, 1]}).to_csv(csv, index=False)
    with pytest.raises(ValueError, match=r"missing column\(s\) \['case_id'\].*repeat slide_id"):
        read_labels_csv(csv)


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_probe_cli_monte_carlo(tmp_path: Path, method: str, capsys: pytest.CaptureFixture[str]) -> None:
    from gigaslide.data.splits import assert_no_case_leakage

    feats, labels = _features_dir(tmp_path)
    out = tmp_path / "mc"
    rc = main(["probe", "--embeddings", str(feats), "--labels", str(labels), "--method", method, "--k", "5",
               "--monte-carlo", "4", "--test-fraction", "0.25", "--val-fraction", "0.1", "--n-boot", "50",
               "--out", str(out)])  # fmt: skip
    assert rc == 0
    assert sorted(p.name for p in (out / "splits").glob("splits_*.csv")) == [
        f"splits_{k}.csv" for k in range(4)
    ]
    table = pd.read_csv(labels)
    splits = load_split_csvs(out / "splits", df=table)
    assert_no_case_leakage(splits, table)
    info = table.set_index("slide_id")
    for sp in splits:
        assert info.loc[sp.test, "case_id"].nunique() == 5  # 25% of 20 cases
        assert set(info.loc[sp.test, "label"]) == set(info.loc[sp.val, "label"]) == {"LUAD", "LUSC"}
    assert len({tuple(sp.test) for sp in splits}) > 1
    doc = json.loads((out / "results.json").read_text())
    assert doc["n_folds"] == 4 and doc["config"]["splits_source"] == "monte_carlo_splits"
    assert doc["config"]["test_fraction"] == 0.25 and "Monte Carlo" in doc["title"]
    assert (
        doc["n_predictions"]
        == sum(len(sp.test) for sp in splits)
        == len(pd.read_csv(out / "predictions.csv"))
    )
    assert doc["metrics"]["auc"]["mean"] > 0.9 and doc["pooled"]["auc"]["value"] > 0.9
    printed = capsys.readouterr().out
    auc_row = next(line for line in printed.splitlines() if line.startswith("auc "))
    assert _fmt(doc["metrics"]["auc"]["mean"]) in auc_row and _fmt(doc["pooled"]["auc"]["value"]) in auc_row
    rc = main(["probe", "--embeddings", str(feats), "--labels", str(labels), "--monte-carlo", "2",
               "--splits", str(out / "splits"), "--out", str(tmp_path / "x")])  # fmt: skip
    assert rc == 2 and "exclude each other" in capsys.readouterr().err
