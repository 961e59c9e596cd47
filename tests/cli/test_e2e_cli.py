"""`gigaslide e2e` on a synthetic cohort: naive and cached modes write the same weights; outputs load."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.slide_tiles import SlideTileEpochs, SlideTiles, TileAugment
from gigaslide.models.encoders import create_encoder
from gigaslide.synth.cohort import make_cohort
from gigaslide.train.mil import load_slide_model


@pytest.fixture(scope="module")
def cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("e2e_cohort")
    make_cohort(root, 4, seed=2, width=768, height=768, tile_size=256)
    return root


def _run(cohort: Path, out: Path, *extra: str) -> dict:
    args = [
        "e2e", "--slides", str(cohort / "slides"), "--labels", str(cohort / "labels.csv"), "--out", str(out),
        "--encoder", "resnet18_trunc", "--weights", "random", "--tiles-per-slide", "5", "--input-size", "32",
        "--epochs", "1", "--val-fraction", "0", "--freeze-bn", "--no-augment", "--deterministic", "--optimizer", "sgd", "--lr", "1e-4",
        "--set", "dropout=0.0", *extra,
    ]  # fmt: skip
    assert main(args) == 0
    return json.loads((out / "results.json").read_text())


def test_naive_and_cached_runs_agree_and_outputs_load(cohort: Path, tmp_path: Path) -> None:
    torch.set_num_threads(1)
    naive = _run(cohort, tmp_path / "naive", "--mode", "naive")
    _run(cohort, tmp_path / "cached", "--mode", "cached", "--chunk-size", "2")
    assert naive["encoder_init"].startswith("random") and naive["n_train"] == 4
    a = torch.load(tmp_path / "naive" / "encoder.pth", weights_only=True)
    b = torch.load(tmp_path / "cached" / "encoder.pth", weights_only=True)
    start = create_encoder("resnet18_trunc", weights="random").state_dict()
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the encoder was trained (from seed-0 init)
    for k in a:  # relative L2 distance per tensor (conv kernels differ in rounding with the chunk size)
        if a[k].is_floating_point():
            assert float((a[k] - b[k]).norm()) <= 1e-5 * float(a[k].norm()) + 1e-7, k
        else:
            assert torch.equal(a[k], b[k]), k
    enc = create_encoder("resnet18_trunc", weights=tmp_path / "cached" / "encoder.pth")
    assert enc.weights_info["random_init"] is False
    _model, meta = load_slide_model(tmp_path / "cached" / "aggregator.pt")
    assert meta["model"] == "gated_abmil" and meta["in_dim"] == enc.meta.embed_dim
    # a rerun resumes the finished run: nothing is retrained
    before = (tmp_path / "naive" / "encoder.pth").read_bytes()
    _run(cohort, tmp_path / "naive", "--mode", "naive")
    assert torch.equal(torch.load(tmp_path / "naive" / "encoder.pth", weights_only=True)["conv1.weight"],
                       torch.load(__import__("io").BytesIO(before), weights_only=True)["conv1.weight"])  # fmt: skip


def test_single_class_is_refused(cohort: Path, tmp_path: Path) -> None:
    labels = pd.read_csv(cohort / "labels.csv")
    labels["label"] = "tumor"
    labels.to_csv(tmp_path / "one.csv", index=False)
    args = ["e2e", "--slides", str(cohort / "slides"), "--labels", str(tmp_path / "one.csv"), "--out",
            str(tmp_path / "o"), "--weights", "random"]  # fmt: skip
    assert main(args) == 2


def test_fewer_tiles_than_k_are_drawn_with_replacement_and_shares_partition_k() -> None:
    from gigaslide.preprocess.tiling_spec import TileSpec

    spec = TileSpec(tile_size=8, stride=8, target_mpp=0.5, slide_mpp=0.5, read_level=0, read_downsample=1.0,
                    read_size=8, level0_size=8, level0_stride=8.0, level0_dims=(64, 64))  # fmt: skip
    s = SlideTiles("a", Path("unused.tiff"), np.zeros((3, 2), dtype=np.int64), spec, 1)
    data = [
        SlideTileEpochs([s], k=7, input_size=8, shares=2, share_index=i, read=False, seed=4) for i in (0, 1)
    ]
    parts = [next(d.batches(0)) for d in data]
    assert [p.sizes for p in parts] == [[4, 3], [4, 3]]
    rows = np.concatenate([p.tile_index for p in parts])
    assert len(rows) == 7 and set(rows) <= {0, 1, 2}  # with replacement
    assert np.array_equal(rows, data[0].draw(0, 0, 3))  # the shares together are the one K-draw
    again = SlideTileEpochs([s], k=7, input_size=8, read=False, seed=4)
    assert np.array_equal(next(again.batches(0)).tile_index, rows)
    with pytest.raises(ValueError, match="3 encoder processes for 2 tiles"):
        SlideTileEpochs([s], k=2, input_size=8, shares=3)


def test_augmentation_is_reproducible_per_tile() -> None:
    x = torch.rand(3, 16, 16)
    aug = TileAugment(0.2)
    a = aug(x.clone(), np.random.default_rng([1, 2]))
    b = aug(x.clone(), np.random.default_rng([1, 2]))
    c = aug(x.clone(), np.random.default_rng([1, 3]))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert float(a.min()) >= 0.0 and float(a.max()) <= 1.0


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_distributed_mode_agrees_with_naive(cohort: Path, tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    common = ["--slides", str(cohort / "slides"), "--labels", str(cohort / "labels.csv"), "--encoder",
              "resnet18_trunc", "--weights", "random", "--tiles-per-slide", "5", "--input-size", "32", "--epochs",
              "1", "--val-fraction", "0", "--freeze-bn", "--no-augment", "--deterministic", "--optimizer", "sgd",
              "--lr", "1e-4", "--set", "dropout=0.0"]  # fmt: skip
    assert main(["e2e", *common, "--out", str(tmp_path / "naive"), "--mode", "naive"]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    cmd = [torchrun, "--nproc_per_node", "3", "-m", "gigaslide", "e2e", *common, "--out", str(tmp_path / "dist"),
           "--mode", "distributed"]  # fmt: skip
    done = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=900)
    assert done.stderr.count("uses RANDOM weights") == 1  # printed by rank 0 only
    for name in ("encoder.pth",):
        a = torch.load(tmp_path / "naive" / name, weights_only=True)
        b = torch.load(tmp_path / "dist" / name, weights_only=True)
        for k in a:
            if a[k].is_floating_point():
                assert float((a[k] - b[k]).norm()) <= 1e-5 * float(a[k].norm()) + 1e-7, k
    a = load_slide_model(tmp_path / "naive" / "aggregator.pt")[0].state_dict()
    b = load_slide_model(tmp_path / "dist" / "aggregator.pt")[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)


def test_trained_encoder_embeds_and_aggregator_draws_a_heatmap(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _run(cohort, out, "--mode", "cached", "--chunk-size", "3")
    feats = tmp_path / "feats"
    weights = str(out / "encoder.pth")
    assert main(["embed", str(out / "tiles"), "--encoder", "resnet18_trunc", "--weights", weights, "--out",
                 str(feats), "--batch-size", "8", "--workers", "1"]) == 0  # fmt: skip
    png = tmp_path / "heat.png"
    slide = cohort / "slides" / "slide_000.tiff"
    args = ["heatmap", "--slide", str(slide), "--scores", str(feats / "h5_files" / "slide_000.h5"), "--model",
            str(out / "aggregator.pt"), "--out", str(png), "--max-size", "256"]  # fmt: skip
    assert main(args) == 0 and png.stat().st_size > 0


def test_validation_auc_is_logged_each_epoch(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "val"
    args = ["e2e", "--slides", str(cohort / "slides"), "--labels", str(cohort / "labels.csv"), "--out", str(out),
            "--weights", "random", "--tiles-per-slide", "3", "--input-size", "32", "--epochs", "2",
            "--val-fraction", "0.5", "--slide-fraction", "0.5"]  # fmt: skip
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    split = json.loads((out / "split.json").read_text())
    assert res["n_train"] == len(split["train"]) == 2 and res["n_val"] == 2
    assert not set(split["train"]) & set(split["val"])
    rows = pd.read_csv(out / "epochs.csv")
    assert list(rows["epoch"]) == [0, 1] and rows["val_auc"].between(0, 1).all()
    steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
    assert len(steps) == 2  # half of the 2 training slides per epoch: one step per epoch


@pytest.mark.parametrize("rank", [0, 1])
def test_distributed_mode_warns_of_random_weights_once(
    rank: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Every rank builds the encoder; only rank 0 (the aggregator rank) prints the RANDOM-weights warning."""
    from gigaslide.experiments import e2e
    from gigaslide.utils.dist import DistInfo

    class Built(Exception):
        pass

    def stop(*args, **kwargs):  # the encoder is built: the part under test is over
        raise Built

    monkeypatch.setattr(e2e, "init_distributed", lambda: DistInfo(rank, 2, rank, True))
    monkeypatch.setattr(e2e, "_slide_sources", lambda cfg, r: ([], tmp_path, ["a", "b"]))
    monkeypatch.setattr(e2e, "create_slide_model", stop)
    labels = tmp_path / "labels.csv"
    pd.DataFrame({"slide_id": ["s0", "s1"], "case_id": ["c0", "c1"], "label": ["a", "b"]}).to_csv(labels)
    cfg = e2e.E2EConfig(labels_csv=labels, out_dir=tmp_path / "out", tiles=tmp_path, encoder="resnet18_trunc",
                        weights="random", mode="distributed", val_fraction=0.0)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="gigaslide"), pytest.raises(Built):
        e2e.run_e2e(cfg)
    records = [r for r in caplog.records if "uses RANDOM weights" in r.getMessage()]
    assert len(records) == 1  # rank 0: a warning; other ranks: the same line at INFO level only
    assert records[0].levelno == (logging.WARNING if rank == 0 else logging.INFO)
