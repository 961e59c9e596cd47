"""HIPT stage 2: region token-grid views, the region dataset, `pretrain hipt-region` checkpoints and resume."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.region_features import write_region_features
from gigaslide.models.encoders.hipt_vit4k import create_hipt_vit4k
from gigaslide.ssl.crop_data import MultiCropData
from gigaslide.ssl.hipt_region import pretrain_hipt_region, stage2_dino_config
from gigaslide.ssl.region_crops import RegionCropConfig, RegionCrops, RegionGrids

torch.set_num_threads(1)

D = 8
ARCH = {"embed_dim": 16, "depth": 1, "num_heads": 2}
TINY = stage2_dino_config(out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=1)
TINY_ARGS = ["--epochs", "2", "--batch-size", "4", "--local-crops", "2", "--out-dim", "32",
             "--head-hidden-dim", "16", "--head-bottleneck-dim", "8", "--warmup-epochs", "1",
             "--vit4k-arg", "embed_dim=16", "--vit4k-arg", "depth=1", "--vit4k-arg", "num_heads=2",
             "--device", "cpu", "--no-progress"]  # fmt: skip


def write_regions(folder: Path, n_files: int = 2, m: int = 5, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for s in range(n_files):
        feats = rng.normal(size=(m, 256, D)).astype(np.float32)
        write_region_features(folder / f"s{s}.h5", feats, np.ones((m, 256), bool), np.zeros((m, 2)))
    return folder


def test_default_views_follow_hipt_stage2() -> None:
    cfg = RegionCropConfig()
    assert (cfg.global_size, cfg.local_size, cfg.n_local, cfg.flip_p, cfg.dropout) == (14, 6, 8, 0.5, 0.1)
    dino = stage2_dino_config()
    assert (dino.out_dim, dino.teacher_temp, dino.warmup_teacher_temp_epochs, dino.momentum_teacher) == (
        65536, 0.04, 0, 0.996)  # fmt: skip
    views = RegionCrops(cfg)(torch.randn(384, 16, 16), torch.Generator().manual_seed(0))
    assert [tuple(v.shape) for v in views] == [(384, 14, 14)] * 2 + [(384, 6, 6)] * 8


def test_a_view_is_a_crop_maybe_flipped() -> None:
    grid = torch.arange(3 * 16 * 16, dtype=torch.float32).reshape(3, 16, 16)
    crops = RegionCrops(RegionCropConfig(dropout=0.0, n_local=20))
    flips = 0
    for v in crops(grid, torch.Generator().manual_seed(1)):
        s = v.shape[-1]
        top, left = int(v[0, 0].min()) // 16, int(v[0, 0].min()) % 16
        window = grid[:, top : top + s, left : left + s]
        assert torch.equal(v, window) or torch.equal(v, window.flip(-1))
        flips += int(not torch.equal(v, window))
    assert 3 <= flips <= 19  # about half of the 22 views are flipped


def test_view_dropout_zeroes_a_fraction_and_rescales() -> None:
    grid = torch.ones(64, 16, 16)
    v = RegionCrops(RegionCropConfig(dropout=0.25, flip_p=0.0)).view(
        grid, 14, torch.Generator().manual_seed(0)
    )
    kept = v[v != 0]
    assert torch.allclose(kept, torch.full_like(kept, 1 / 0.75))
    assert abs(float((v == 0).float().mean()) - 0.25) < 0.02
    with pytest.raises(ValueError, match="dropout"):
        RegionCropConfig(dropout=1.0)
    with pytest.raises(ValueError, match="local_size"):
        RegionCropConfig(global_size=6, local_size=14)


def test_region_grids_are_row_major_and_bad_files_are_skipped(tmp_path: Path) -> None:
    folder = write_regions(tmp_path / "rf", n_files=2, m=3)
    (folder / "broken.h5").write_bytes(b"not hdf5")
    grids = RegionGrids(folder)
    assert len(grids) == 6 and grids.in_dim == D and grids.grid_size == 16
    assert list(grids.skipped) == ["broken.h5"]
    from gigaslide.data.region_features import read_region_features

    tokens = read_region_features(folder / "s0.h5").features[1]  # (256, D)
    i, j = 3, 11
    assert torch.allclose(grids[1][:, i, j], torch.from_numpy(tokens[i * 16 + j]))
    with pytest.raises(ValueError, match="no region feature files"):
        RegionGrids(tmp_path)  # holds only the rf/ sub-folder
    with pytest.raises(FileNotFoundError, match="gigaslide embed"):
        RegionGrids(tmp_path / "missing")


def test_batches_are_a_pure_function_of_seed_epoch_index(tmp_path: Path) -> None:
    grids = RegionGrids(write_regions(tmp_path / "rf"))
    crops = RegionCrops(RegionCropConfig(n_local=2))
    a = MultiCropData(grids, crops, batch_size=3, seed=7)  # type: ignore[arg-type]
    b = MultiCropData(grids, crops, batch_size=3, seed=7)  # type: ignore[arg-type]
    first = list(a.batches(1))
    resumed = list(b.batches(1, start=1))
    assert len(first) == 3 and len(resumed) == 2
    for x, y in zip(first[1:], resumed, strict=True):
        assert all(torch.equal(u, w) for u, w in zip(x, y, strict=True))
    other = next(MultiCropData(grids, crops, batch_size=3, seed=8).batches(1))  # type: ignore[arg-type]
    assert not torch.equal(first[0][0], other[0])


def test_cli_writes_the_vit4k_dino_layout_and_loads_strictly(tmp_path: Path, capsys) -> None:
    folder = write_regions(tmp_path / "feats" / "h5_files")
    out = tmp_path / "stage2"
    assert main(["pretrain", "hipt-region", str(tmp_path / "feats"), "--out", str(out), *TINY_ARGS]) == 0
    assert "gigaslide embed" in capsys.readouterr().out
    ck = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=False)
    for name in ("teacher", "student"):
        keys = set(ck[name])
        assert keys and all(k.startswith(("backbone.", "head.")) for k in keys)
        assert "backbone.pos_embed" in keys and "head.last_layer.weight_g" in keys
    assert ck["epoch"] == 2 and "center" in ck["dino_loss"]
    model = create_hipt_vit4k(weights=out / "checkpoint.pth", in_dim=D, **ARCH)
    assert model.weights_info["missing"] == [] and model.weights_info["unexpected"] == []
    teacher = {k.removeprefix("backbone."): v for k, v in ck["teacher"].items() if k.startswith("backbone.")}
    for k, v in model.state_dict().items():
        assert torch.equal(v, teacher[k]), k
    assert folder.is_dir()


def test_same_seed_gives_same_weights(tmp_path: Path) -> None:
    folder = write_regions(tmp_path / "rf")
    kw = dict(epochs=2, batch_size=4, cfg=TINY, crops=RegionCropConfig(n_local=2), vit4k_kwargs=ARCH,
              device="cpu", progress=False)  # fmt: skip
    ta = torch.load(pretrain_hipt_region(folder, tmp_path / "a", **kw), weights_only=False)["teacher"]
    tb = torch.load(pretrain_hipt_region(folder, tmp_path / "b", **kw), weights_only=False)["teacher"]
    tc = torch.load(pretrain_hipt_region(folder, tmp_path / "c", seed=1, **kw), weights_only=False)["teacher"]
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert not torch.equal(ta["backbone.pos_embed"], tc["backbone.pos_embed"])


def test_dropout_in_vit4k_kwargs_reaches_the_student_only() -> None:
    from gigaslide.ssl.hipt_region import build_hipt_region

    kw = {"in_dim": D, **ARCH, "drop_rate": 0.5}
    obj = build_hipt_region(2, TINY, RegionCropConfig(n_local=2), vit4k_kwargs=kw)
    x = torch.randn(4, D, 14, 14)
    assert obj.teacher.training and obj.student.training  # the teacher's head BatchNorm uses batch stats
    with torch.no_grad():
        assert torch.equal(obj.teacher.backbone(x), obj.teacher.backbone(x))  # no dropout in the teacher
        assert not torch.equal(obj.student.backbone(x), obj.student.backbone(x))
    assert all(b.drop_path.p == 0.0 for b in obj.teacher.backbone.blocks)
    with pytest.raises(ValueError, match="drop_path_rate"):
        build_hipt_region(2, TINY, vit4k_kwargs={**kw, "drop_path_rate": 0.1})
