"""Refusals that keep results honest: one class, mixed encoders/weights, random-init features in reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.cohort import Cohort, CohortError
from gigaslide.data.features_io import write_features
from gigaslide.data.provenance import ProvenanceError, check_provenance
from gigaslide.experiments.crossval import run_crossval
from gigaslide.train.config import TrainConfig

ENC_A = {"encoder": "resnet50_trunc", "weights": "/w/a.pth", "weights_sha256": "a" * 64, "random_init": False}
ENC_B = {"encoder": "resnet50_trunc", "weights": "/w/b.pth", "weights_sha256": "b" * 64, "random_init": False}
RANDOM = {"encoder": "vit_small", "weights": "RANDOM-INIT", "weights_sha256": "c" * 64, "random_init": True}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _folder(root: Path, attrs_of, n: int = 12, labels=None) -> tuple[Path, Path]:
    """``n`` slides of 8-d features; slide i gets ``attrs_of(i)`` and label ``labels[i]``."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = labels[i] if labels is not None else ["neg", "pos"][i % 2]
        feats = rng.normal(size=(6, 8)).astype(np.float32) + 2.0 * (label == "pos")
        coords = np.stack([np.arange(6) * 256, np.zeros(6)], axis=1)
        write_features(root / "h5_files" / f"s{i:02d}.h5", feats, coords, attrs=attrs_of(i))
        rows.append({"slide_id": f"s{i:02d}", "case_id": f"c{i:02d}", "label": label})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root, root / "labels.csv"


def test_single_class_refused_in_train_naming_class_and_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    root, labels = _folder(tmp_path, lambda i: ENC_A, labels=["tumor"] * 12)
    with pytest.raises(CohortError, match=rf"{labels}: every slide has the label 'tumor'"):
        Cohort(labels, root)
    rc = main(["train", "--features", str(root), "--labels", str(labels), "--out", str(tmp_path / "o")])
    assert rc == 2 and "every slide has the label 'tumor'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_single_class_refused_in_probe(tmp_path: Path, method: str, capsys: pytest.CaptureFixture) -> None:
    root, labels = _folder(tmp_path, lambda i: ENC_A, labels=["tumor"] * 12)
    rc = main(["probe", "--embeddings", str(root), "--labels", str(labels), "--method", method,
               "--folds", "3", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc != 0
    err = capsys.readouterr().err
    assert f"{labels}: every slide has the label 'tumor'" in err and "two classes" in err
    assert not (tmp_path / "o" / "results.json").exists()


def test_mixed_weights_refused_naming_two_files(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, labels = _folder(tmp_path, lambda i: ENC_B if i == 7 else ENC_A)
    with pytest.raises(ProvenanceError) as err:
        Cohort(labels, root)
    msg = str(err.value)
    assert (
        "s00.h5" in msg and "s07.h5" in msg and "sha256 aaaaaaaaaaaa" in msg and "sha256 bbbbbbbbbbbb" in msg
    )
    assert "--allow-mixed-features" in msg
    # probe refuses as well, and both accept the explicit flag
    rc = main(["probe", "--embeddings", str(root), "--labels", str(labels), "--method", "knn",
               "--folds", "3", "--k", "3", "--n-boot", "20", "--out", str(tmp_path / "o")])  # fmt: skip
    assert rc != 0 and "s07.h5" in capsys.readouterr().err
    rc = main(["probe", "--embeddings", str(root), "--labels", str(labels), "--method", "knn",
               "--folds", "3", "--k", "3", "--n-boot", "20", "--out", str(tmp_path / "o"),
               "--allow-mixed-features"])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "o" / "results.json").read_text())
    assert doc["features"]["mixed"] and len(doc["features"]["sources"]) == 2
    assert "WARNING: the features mix 2 encoders/weights" in (tmp_path / "o" / "summary.md").read_text()
    assert Cohort(labels, root, allow_mixed_features=True).provenance.mixed


def test_different_encoders_refused_and_unrecorded_files_not_compared(tmp_path: Path) -> None:
    other = {**ENC_A, "encoder": "uni"}
    root, labels = _folder(tmp_path, lambda i: other if i == 3 else ENC_A)
    with pytest.raises(ProvenanceError, match="encoder uni"):
        Cohort(labels, root)
    files = {f"s{i:02d}": root / "h5_files" / f"s{i:02d}.h5" for i in range(12)}
    prov = check_provenance({k: v for k, v in files.items() if k != "s03"})
    assert prov.encoder == "resnet50_trunc" and prov.weights_sha256 == "a" * 64 and not prov.mixed
    plain, _ = _folder(tmp_path / "clam", lambda i: {})  # CLAM-like files record nothing
    prov = check_provenance({f"s{i}": plain / "h5_files" / f"s{i:02d}.h5" for i in range(12)})
    assert prov.n_unrecorded == 12 and prov.encoder is None and not prov.random_init


def test_reports_say_random_init(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, labels = _folder(tmp_path, lambda i: RANDOM)
    cohort = Cohort(labels, root)
    assert cohort.provenance.random_init
    cfg = TrainConfig(epochs=1, folds=2, val_fraction=0.0, bootstrap=20, model_kwargs={"hidden_dims": [8, 4]})
    run_crossval(cohort, "abmil", "classification", cfg, tmp_path / "train")
    rc = main(["probe", "--embeddings", str(root), "--labels", str(labels), "--method", "linear",
               "--folds", "2", "--n-boot", "20", "--out", str(tmp_path / "probe")])  # fmt: skip
    assert rc == 0
    for out in (tmp_path / "train", tmp_path / "probe"):
        doc = json.loads((out / "results.json").read_text())
        assert doc["random_init_features"] is True and doc["features"]["encoder"] == "vit_small"
        summary = (out / "summary.md").read_text()
        assert "WARNING: the features come from a RANDOM-INIT encoder" in summary
        assert "Features: encoder vit_small, weights RANDOM-INIT" in summary
    # pretrained features: no warning, the encoder and weights are stated
    root2, labels2 = _folder(tmp_path / "ok", lambda i: ENC_A)
    run_crossval(Cohort(labels2, root2), "abmil", "classification", cfg, tmp_path / "train_ok")
    doc = json.loads((tmp_path / "train_ok" / "results.json").read_text())
    assert doc["random_init_features"] is False
    summary = (tmp_path / "train_ok" / "summary.md").read_text()
    assert (
        "RANDOM-INIT" not in summary
        and "encoder resnet50_trunc, weights /w/a.pth (sha256 aaaaaaaaaaaa)" in summary
    )
