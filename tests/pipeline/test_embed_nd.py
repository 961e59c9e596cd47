"""Embedding with an encoder that returns (B, ...) per tile: files, resume inside a slide, rank sharding."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from embed_synthetic import TARGET_MPP, TILE, make_tiling_dir
from torch import nn

from gigaslide.data.feature_writer import ChunkedFeatureWriter, partial_path_for
from gigaslide.data.features_io import read_features
from gigaslide.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gigaslide.models.encoders import EncoderMeta
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.pipeline.extract import extract_features
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.utils.dist import DistInfo

GRID, CH = 4, 6  # a 2 x 2 grid of 16 px patches, 6 channels each: (B, 4, 6) per batch


class GridEncoder(nn.Module):
    """(B, 3, 32, 32) -> (B, 4, 6) patch tokens, like a region encoder returning a token grid."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, CH, kernel_size=16, stride=16)
        self.meta = EncoderMeta(
            name="toy_grid", embed_dim=CH, input_size=TILE, mean=IMAGENET_MEAN, std=IMAGENET_STD,
            mpp=TARGET_MPP, paper="test", output_shape=(GRID, CH),
        )  # fmt: skip
        self.weights_info = {"random_init": True}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x).flatten(2).transpose(1, 2)  # (B, 4, 6)


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Path:
    return make_tiling_dir(tmp_path_factory.mktemp("nd"), {"a": (512, 384), "b": (256, 256)})


def test_nd_features_written_like_extract_features(tiling, tmp_path):
    enc = GridEncoder()
    s = run_embedding(tiling, enc, tmp_path / "o", batch_size=5, chunk_size=4, device="cpu", progress=False)
    assert s.n_done == 2 and s.n_failed == 0
    bag = read_features(tmp_path / "o" / "h5_files" / "a.h5")
    cf = read_coords(tiling / "patches" / "a.h5")
    assert bag.shape == (len(cf.coords), GRID, CH) and list(bag.attrs["item_shape"]) == [GRID, CH]
    np.testing.assert_array_equal(bag.coords, cf.coords)
    ref = extract_features(tiling / "slides" / "a.tiff", cf.coords, cf.spec, enc, batch_size=7)
    np.testing.assert_allclose(bag.features, ref, rtol=1e-5, atol=1e-6)
    rows = {r["slide_id"]: r for r in csv.DictReader((tmp_path / "o" / "manifest.csv").open())}
    assert rows["a"]["dim"] == f"{GRID}x{CH}"
    with pytest.raises(ValueError, match=r"save_pt writes CLAM's \(N, D\) pt_files"):
        run_embedding(tiling, enc, tmp_path / "pt", save_pt=True, device="cpu", progress=False)


def test_nd_resume_inside_a_slide(tiling, tmp_path, monkeypatch):
    enc = GridEncoder()
    run_embedding(tiling, enc, tmp_path / "ref", batch_size=4, chunk_size=4, device="cpu", progress=False)
    real_commit = ChunkedFeatureWriter._commit
    n = {"commits": 0}

    def crash_third(self, n_rows):
        n["commits"] += 1
        if n["commits"] == 3:
            raise RuntimeError("simulated crash")
        real_commit(self, n_rows)

    out = tmp_path / "o"
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", crash_third)
    first = run_embedding(tiling, enc, out, batch_size=4, chunk_size=4, device="cpu", progress=False)
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", real_commit)
    assert "a" in first.failed and partial_path_for(out / "h5_files" / "a.h5").exists()
    second = run_embedding(tiling, enc, out, batch_size=4, chunk_size=4, device="cpu", progress=False)
    res = {r.slide_id: r for r in second.results}
    assert second.n_failed == 0 and res["a"].resumed_from == 8
    for sid in ("a", "b"):
        np.testing.assert_array_equal(
            read_features(out / "h5_files" / f"{sid}.h5").features,
            read_features(tmp_path / "ref" / "h5_files" / f"{sid}.h5").features,
        )


def test_nd_two_ranks_cover_each_slide_once(tiling, tmp_path):
    """Rank sharding as under torchrun (ranks run one after the other here; barriers are no-ops)."""
    enc, out = GridEncoder(), tmp_path / "o"
    for rank in (1, 0):  # rank 0 last: it merges the rank manifests
        info = DistInfo(rank=rank, world_size=2, local_rank=0, is_distributed=True)
        run_embedding(tiling, enc, out, batch_size=8, device="cpu", progress=False, dist_info=info)
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == ["a", "b"] and {r["rank"] for r in rows} == {"0", "1"}
    assert not list(out.glob("manifest.rank*.csv"))
    for sid in ("a", "b"):
        assert read_features(out / "h5_files" / f"{sid}.h5").item_shape == (GRID, CH)
