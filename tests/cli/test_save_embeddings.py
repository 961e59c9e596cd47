"""`gigaslide train --save-embeddings`: per-fold and out-of-fold slide embeddings, read by `gigaslide probe`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.bags import BagDataset
from gigaslide.data.cohort import Cohort
from gigaslide.data.embeddings import file_sha256, read_embeddings
from gigaslide.data.splits import load_split_csvs
from gigaslide.train.mil import load_slide_model, predict


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_train_saves_embeddings_that_probe_reads(tmp_path: Path, feature_cohort, capsys) -> None:
    data = tmp_path / "data"
    labels = feature_cohort(data, n_cases=12)
    out = tmp_path / "run"
    argv = ["train", "--features", str(data), "--labels", str(labels), "--model", "abmil", "--folds", "3",
            "--epochs", "2", "--device", "cpu", "--set", "model_kwargs.hidden_dims=[16,8]", "--set",
            "bootstrap=20", "--set", "warmup_epochs=0", "--out", str(out), "--save-embeddings"]  # fmt: skip
    assert main(argv) == 0
    assert "slide embeddings:" in capsys.readouterr().out
    cohort = Cohort(labels, data)
    splits = load_split_csvs(out / "splits", df=cohort.table)
    for split in splits:
        emb = read_embeddings(out / "embeddings" / f"fold{split.fold}.h5")
        ckpt = out / "checkpoints" / f"fold{split.fold}.pt"
        assert sorted(emb.ids) == sorted(split.test) and emb.vectors.shape == (len(split.test), 16)
        assert emb.attrs["model"] == "abmil" and emb.attrs["fold"] == split.fold
        assert emb.attrs["checkpoint_sha256"] == file_sha256(ckpt) and emb.attrs["split"] == "test"
        model, _ = load_slide_model(ckpt)  # the same vectors as predicting with the saved checkpoint
        samples = [s for s in cohort.samples() if s.sample_id in set(emb.ids)]
        ref = predict(model, BagDataset(cohort, samples), "cpu")
        np.testing.assert_allclose(
            emb.select([s.sample_id for s in samples]), ref.embeddings, rtol=1e-5, atol=1e-6
        )
    oof = read_embeddings(out / "embeddings" / "out_of_fold.h5")
    assert sorted(oof.ids) == sorted(cohort.slide_ids) and oof.attrs["folds"] == [0, 1, 2]
    # a resumed run re-creates a missing fold file from its checkpoint, identically
    before = read_embeddings(out / "embeddings" / "fold1.h5")
    (out / "embeddings" / "fold1.h5").unlink()
    assert main(argv) == 0
    again = read_embeddings(out / "embeddings" / "fold1.h5")
    assert again.ids == before.ids
    np.testing.assert_allclose(again.vectors, before.vectors, rtol=1e-6, atol=1e-7)
    capsys.readouterr()
    rc = main(["probe", "--embeddings", str(out / "embeddings" / "out_of_fold.h5"), "--labels", str(labels),
               "--method", "knn", "--k", "3", "--folds", "3", "--n-boot", "20", "--out", str(tmp_path / "p")])  # fmt: skip
    assert rc == 0
    doc = json.loads((tmp_path / "p" / "results.json").read_text())
    assert doc["config"]["embeddings_provenance"]["model"] == "abmil"
    assert doc["n_predictions"] == len(cohort.slide_ids)
