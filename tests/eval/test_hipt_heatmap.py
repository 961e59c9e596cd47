"""`gigaslide heatmap` for a trained `hipt` run: slide-level attention over regions painted as squares."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from gigaslide.cli.main import main
from gigaslide.data.region_features import write_region_features
from gigaslide.eval.heatmap import attention_from_checkpoint, read_scores
from gigaslide.preprocess.tiling_spec import TileSpec

D, SIDE, REGION = 8, 4, 512  # regions of 512 level-0 px (4096 px in real runs), 4x4 token grids
W, H = 1024, 1024


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_hipt_run_attention_paints_region_squares(tmp_path: Path) -> None:
    from gigaslide.synth import write_synthetic_slide

    spec = TileSpec.create(tile_size=REGION, target_mpp=0.5, slide_mpp=0.5, level_downsamples=[1.0],
                           level0_dims=(W, H))  # fmt: skip
    corners = np.array([[0, 0], [512, 0], [0, 512], [512, 512]])
    rng = np.random.default_rng(0)
    rows = []
    for i in range(9):
        feats = rng.normal(size=(4, SIDE * SIDE, D)).astype(np.float32)
        if i % 2:
            feats[1, :, :3] += 2.0  # the signal sits in the top-right region
        write_region_features(tmp_path / "feats" / f"s{i}.h5", feats, np.ones((4, SIDE * SIDE), bool), corners,
                              attrs={"slide_id": f"s{i}"}, coords_attrs=spec.to_attrs())  # fmt: skip
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "label": ["lo", "hi"][i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    run = tmp_path / "run"
    argv = ["train", "--features", str(tmp_path / "feats"), "--labels", str(tmp_path / "labels.csv"),
            "--model", "hipt", "--folds", "3", "--epochs", "2", "--device", "cpu", "--out", str(run),
            "--set", "model_kwargs.freeze_4k=true", "--set", "bootstrap=5", "--set", "warmup_epochs=0"]  # fmt: skip
    assert main(argv) == 0
    scores = read_scores(run / "attention" / "s1.h5")
    assert scores.tile_size_level0 == REGION  # one square per region
    assert np.array_equal(scores.coords, corners) and np.isclose(scores.scores.sum(), 1.0, atol=1e-5)

    slide = write_synthetic_slide(tmp_path / "s1.tiff", width=W, height=H, mpp=0.5, seed=0)
    png = tmp_path / "heat.png"
    assert main(["heatmap", "--slide", str(slide), "--scores", str(run / "attention" / "s1.h5"), "--out",
                 str(png), "--max-size", "256", "--alpha", "1.0"]) == 0  # fmt: skip
    img = np.asarray(Image.open(png).convert("RGB"), dtype=np.float64)
    assert img.shape[:2] == (256, 256)
    # each 128 px quadrant is one region: uniform inside, quadrants ranked like their attention
    quads = [img[y : y + 128, x : x + 128] for y, x in ((0, 0), (0, 128), (128, 0), (128, 128))]
    assert all(q.reshape(-1, 3).std(0).max() < 1.0 for q in quads)
    colours = {tuple(np.round(q[64, 64])) for q in quads}
    assert len(colours) == len(set(np.round(scores.scores, 6)))

    # the same map from the checkpoint and the region feature file
    ts = attention_from_checkpoint(tmp_path / "feats" / "s1.h5", run / "checkpoints" / "fold0.pt")
    assert ts.tile_size_level0 == REGION and ts.scores.shape == (4,)
    with h5py.File(run / "attention" / "s1.h5") as f:
        fold = int(f["scores"].attrs["fold"])
    if fold == 0:
        assert np.allclose(ts.scores, scores.scores, atol=1e-5)
    png2 = tmp_path / "heat_model.png"
    assert main(["heatmap", "--slide", str(slide), "--scores", str(tmp_path / "feats" / "s1.h5"), "--model",
                 str(run / "checkpoints" / "fold0.pt"), "--out", str(png2), "--max-size", "128"]) == 0  # fmt: skip
    assert Image.open(png2).size == (128, 128)
