"""`pretrain_dino` / `gigaslide pretrain dino`: DINO checkpoint layout, resume, and use through create_encoder + embed."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.models.encoders import create_encoder
from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.ssl.crop_data import tiles_from_tiling
from gigaslide.ssl.dino import DINOConfig, pretrain_dino
from gigaslide.ssl.multicrop import MultiCropConfig
from gigaslide.utils.manifest import Manifest

torch.set_num_threads(1)

TILE, TARGET_MPP = 32, 2.0  # 32 px tiles at 2 um/px: 128 level-0 px on a 0.5 um/px slide
TINY = DINOConfig(out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, warmup_epochs=1,
                  crops=MultiCropConfig(global_size=32, local_size=16, n_local=2))  # fmt: skip
TINY_ARGS = ["--epochs", "2", "--batch-size", "8", "--global-size", "32", "--local-size", "16",
             "--local-crops", "2", "--out-dim", "64", "--head-hidden-dim", "32", "--head-bottleneck-dim", "16",
             "--warmup-epochs", "1", "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip


def make_tiling(root: Path, slides: dict[str, tuple[int, int]]) -> Path:
    """A `gigaslide tile`-style folder (manifest.csv + patches/) over synthetic slides, full tile grids."""
    from gigaslide.io import open_slide
    from gigaslide.synth import write_synthetic_slide

    manifest = Manifest(root / "manifest.csv")
    for i, (sid, (w, h)) in enumerate(slides.items()):
        path = write_synthetic_slide(root / "slides" / f"{sid}.tiff", width=w, height=h, seed=i)
        with open_slide(path) as s:
            spec = TileSpec.create(tile_size=TILE, target_mpp=TARGET_MPP, slide_mpp=s.require_mpp(),
                                   level_downsamples=s.level_downsamples, level0_dims=s.dimensions, min_tissue=0.0)  # fmt: skip
        nx, ny = spec.grid_shape()
        step = spec.level0_stride
        coords = np.array(
            [(round(a * step), round(b * step)) for b in range(ny) for a in range(nx)], dtype=np.int64
        )
        write_coords(root / "patches" / f"{sid}.h5", coords, spec)
        manifest.update(sid, {"path": str(path), "mpp": 0.5, "status": "done", "n_tiles": len(coords),
                              "coords_file": f"patches/{sid}.h5"})  # fmt: skip
    return root


@pytest.fixture(scope="module")
def tiling(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiling(tmp_path_factory.mktemp("tiling"), {"a": (512, 512), "b": (512, 512)})


def test_tiles_come_from_the_slides_and_bad_slides_are_skipped(tiling: Path, tmp_path: Path) -> None:
    t = tiles_from_tiling(tiling)
    assert t.slide_ids == ["a", "b"] and len(t.dataset) == 32 and t.tile_size == TILE and t.target_mpp == 2.0
    img, _coord = t.dataset[0]
    assert img.shape == (3, TILE, TILE) and img.dtype == torch.uint8
    # a slide missing on disk is skipped and reported, the others still train
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(tiling, broken)
    (broken / "manifest.csv").write_text(
        (broken / "manifest.csv").read_text().replace(str(tiling), str(broken))
    )
    (broken / "slides" / "b.tiff").unlink()
    t2 = tiles_from_tiling(broken)
    assert t2.slide_ids == ["a"] and "b" in t2.skipped and "not found" in t2.skipped["b"]
    (broken / "slides" / "a.tiff").unlink()
    with pytest.raises(ValueError, match="no usable tiles"):
        tiles_from_tiling(broken)


def test_checkpoint_has_dino_layout_and_loads_as_the_teacher_encoder(tiling: Path, tmp_path: Path) -> None:
    ckpt_path = pretrain_dino(tiling, "vit_tiny_d4", tmp_path / "run", epochs=2, batch_size=8, cfg=TINY,
                              num_workers=0, device="cpu", progress=False)  # fmt: skip
    assert ckpt_path == tmp_path / "run" / "checkpoint.pth"
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert {"student", "teacher", "dino_loss", "optimizer", "epoch", "engine", "config"} <= set(ckpt)
    assert ckpt["epoch"] == 2
    assert ckpt["dino_loss"]["center"].shape == (1, 64) and float(ckpt["dino_loss"]["center"].abs().sum()) > 0
    teacher, student = ckpt["teacher"], ckpt["student"]
    assert set(teacher) == set(student)
    assert {"head.last_layer.weight_g", "head.last_layer.weight_v", "head.mlp.0.weight"} <= set(teacher)
    assert all(k.startswith(("backbone.", "head.")) for k in teacher)
    assert not torch.equal(
        teacher["backbone.blocks.0.attn.qkv.weight"], student["backbone.blocks.0.attn.qkv.weight"]
    )
    assert ckpt["engine"]["objective"]["dino_config"]["out_dim"] == 64

    encoder = create_encoder("vit_tiny_d4", weights=ckpt_path)  # strict: backbone. stripped, head dropped
    assert encoder.weights_info["random_init"] is False
    for k, v in encoder.state_dict().items():
        assert torch.equal(v, teacher[f"backbone.{k}"]), k
    # any encoder, not only those declaring a droppable head: the DINO head of the checkpoint is dropped
    encoder.checkpoint_drop_prefixes = ()
    from gigaslide.models.weights import load_weights

    info = load_weights(encoder, ckpt_path)
    assert info["dropped"] and all(k.startswith("head.") for k in info["dropped"])

    # gigaslide embed uses the pretrained teacher
    assert main(["embed", str(tiling), "--encoder", "vit_tiny_d4", "--weights", str(ckpt_path), "--out",
                 str(tmp_path / "feats"), "--workers", "0", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    with h5py.File(tmp_path / "feats" / "h5_files" / "a.h5", "r") as f:
        feats = f["features"][:]
        assert feats.shape == (16, 192) and np.isfinite(feats).all()
        attrs = dict(f["features"].attrs)
    from gigaslide.models.weights import sha256_file

    assert not attrs["random_init"] and attrs["weights_sha256"] == sha256_file(ckpt_path)
    x = torch.rand(2, 3, 128, 128)
    with torch.no_grad():
        assert torch.allclose(encoder(x), create_encoder("vit_tiny_d4", weights=ckpt_path)(x))


def test_cli_trains_resumes_and_reports(
    tiling: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cli"
    argv = ["pretrain", "dino", str(tiling), "--encoder", "vit_tiny_d4", "--out", str(out), *TINY_ARGS]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert f"DINO checkpoint: {out / 'checkpoint.pth'}" in printed and "gigaslide embed" in printed
    first = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    rows = (out / "epochs.csv").read_text().strip().splitlines()
    assert len(rows) == 3 and rows[0].startswith("epoch,lr,loss")
    assert main(argv) == 0  # finished run: resumes at the end, trains nothing more
    again = torch.load(out / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert again["engine"]["step"] == first["engine"]["step"] == 8  # 32 tiles / 8 per batch x 2 epochs
    for k, v in first["teacher"].items():
        assert torch.equal(v, again["teacher"][k])


def test_cli_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["pretrain", "dino", str(tmp_path), "--encoder", "vit_tiny_d4", "--out", str(tmp_path / "o"),
                 "--device", "cpu"]) == 2  # fmt: skip
    assert "run `gigaslide tile` first" in capsys.readouterr().err
    assert main(["pretrain"]) == 2


def test_the_teacher_gets_no_dropout_from_encoder_kwargs() -> None:
    from gigaslide.ssl.dino import build_dino

    kw = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
    x = torch.randn(4, 3, 32, 32)
    for extra in ({"drop_rate": 0.5}, {"attn_drop_rate": 0.5}):
        obj = build_dino("hipt_vit256", 2, TINY, encoder_kwargs={**kw, **extra})
        assert obj.teacher.training  # training mode (BatchNorm in the head), yet deterministic
        with torch.no_grad():
            assert torch.equal(obj.teacher.backbone(x), obj.teacher.backbone(x)), extra
            assert not torch.equal(obj.student.backbone(x), obj.student.backbone(x)), extra
