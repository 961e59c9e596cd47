"""Slide-embedding store: round trip with provenance, foreign layouts, mean-pooled folders, errors."""

from __future__ import annotations

import hashlib

import h5py
import numpy as np
import pytest
import torch

import gigaslide
from gigaslide.data.embeddings import (
    load_slide_embeddings,
    read_embeddings,
    write_embeddings,
)
from gigaslide.data.features_io import write_features


def test_round_trip_with_provenance(tmp_path):
    ckpt = tmp_path / "fold0.pt"
    ckpt.write_bytes(b"weights")
    vectors = np.random.default_rng(0).standard_normal((3, 5))
    path = write_embeddings(
        tmp_path / "e.h5", ["s1", "s2", "slide é"], vectors, model="abmil", checkpoint=ckpt,
        feature_encoder="resnet50_trunc", feature_weights_sha256="ab" * 32, random_init=True,
        extra={"fold": 0, "split": "test", "folds": [0, 1]},
    )  # fmt: skip
    emb = read_embeddings(path)
    assert emb.ids == ["s1", "s2", "slide é"] and emb.dim == 5 and len(emb) == 3
    assert emb.vectors.dtype == np.float32
    np.testing.assert_allclose(emb.vectors, vectors.astype(np.float32))
    a = emb.attrs
    assert a["model"] == "abmil" and a["checkpoint"] == str(ckpt)
    assert a["checkpoint_sha256"] == hashlib.sha256(b"weights").hexdigest()
    assert a["feature_encoder"] == "resnet50_trunc" and a["feature_weights_sha256"] == "ab" * 32
    assert a["random_init"] is True and a["gigaslide_version"] == gigaslide.__version__
    assert a["fold"] == 0 and a["split"] == "test" and a["folds"] == [0, 1] and a["created"].endswith("Z")
    np.testing.assert_array_equal(emb.select(["slide é", "s1"]), emb.vectors[[2, 0]])
    with pytest.raises(KeyError, match=r"1 id\(s\) have no embedding: \['nope'\]"):
        emb.select(["nope"])
    assert not list(tmp_path.glob("*.tmp*"))  # atomic: no leftovers


def test_write_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match=r"bad\.h5: embeddings must be \(S, E\) for 2 ids"):
        write_embeddings(tmp_path / "bad.h5", ["a", "b"], np.zeros((3, 4)), model="m")
    with pytest.raises(ValueError, match=r"duplicated id\(s\) \['a'\]"):
        write_embeddings(tmp_path / "bad.h5", ["a", "a"], np.zeros((2, 4)), model="m")
    with pytest.raises(ValueError, match=r"non-finite embedding\(s\) for \['b'\]"):
        write_embeddings(tmp_path / "bad.h5", ["a", "b"], np.array([[0.0], [np.nan]]), model="m")
    with pytest.raises(ValueError, match="would overwrite a provenance field"):
        write_embeddings(tmp_path / "bad.h5", ["a"], np.zeros((1, 2)), model="m", extra={"model": "x"})
    assert not (tmp_path / "bad.h5").exists()


def test_foreign_layouts_and_errors(tmp_path):
    X = np.arange(12, dtype=np.float32).reshape(3, 4)
    ids = ["a", "b", "c"]
    with h5py.File(tmp_path / "e.h5", "w") as f:
        f["embeddings"] = X
        f["slide_ids"] = np.array(ids, dtype="S")
    torch.save({"embeddings": torch.from_numpy(X), "slide_ids": ids}, tmp_path / "e.pt")
    np.savez(tmp_path / "e.npz", embeddings=X, slide_ids=np.array(ids))
    for name in ("e.h5", "e.pt", "e.npz"):
        emb = load_slide_embeddings(tmp_path / name)
        assert emb.ids == ids and emb.attrs.get("model") is None
        np.testing.assert_array_equal(emb.vectors, X)
    np.savez(tmp_path / "bad.npz", feats=X)
    with pytest.raises(ValueError, match="needs 'embeddings'"):
        read_embeddings(tmp_path / "bad.npz")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_embeddings(tmp_path / "missing.h5")
    (tmp_path / "e.csv").write_text("x")
    with pytest.raises(ValueError, match="unsupported embeddings file"):
        read_embeddings(tmp_path / "e.csv")


def test_feature_folder_is_mean_pooled_and_nd_files_are_reported(tmp_path):
    d = tmp_path / "feats" / "h5_files"
    write_features(d / "s1.h5", np.array([[1.0, 2.0], [3.0, 4.0]]), np.zeros((2, 2)))
    write_features(d / "s2.h5", np.ones((2, 3, 2)), np.zeros((2, 2)))  # region grids: no mean embedding
    (d / ".s3.partial.h5").write_bytes(b"partial")  # an embed job in progress: ignored
    with pytest.warns(UserWarning, match="1 feature file"):
        emb = load_slide_embeddings(tmp_path / "feats")
    assert emb.ids == ["s1"] and emb.attrs["model"] == "mean_pool"
    np.testing.assert_allclose(emb.vectors, [[2.0, 3.0]])
    assert "needs (N, D) tile features" in emb.failed["s2"]
