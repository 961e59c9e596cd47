"""`pretrain_longvit` / `gigaslide pretrain longvit`: DINO on slide images, checkpoint layout, strict load, resume."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.slide_images import IMAGENET_MEAN, IMAGENET_STD, prepare_slide_images
from gigaslide.models.slide import create_slide_model
from gigaslide.models.slide.longvit_weights import load_longvit_weights
from gigaslide.preprocess.slide_image import SlideImageSpec, load_slide_image
from gigaslide.ssl.longvit_dino import (
    TissueRegions,
    longvit_dino_config,
    pretrain_longvit,
    teacher_backbone_state,
)
from gigaslide.ssl.multicrop import MultiCropConfig

torch.set_num_threads(1)

MODEL = {"embed_dim": 32, "depth": 2, "num_heads": 4}
TINY = longvit_dino_config(
    out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, warmup_epochs=1, warmup_teacher_temp_epochs=1,
    lr=0.5, momentum_teacher=0.9, freeze_last_layer=0,
    crops=MultiCropConfig(global_size=64, local_size=32, n_local=2, mean=IMAGENET_MEAN, std=IMAGENET_STD),
)  # fmt: skip


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    from gigaslide.synth import make_cohort

    root = tmp_path_factory.mktemp("cohort")
    table = make_cohort(root, n_slides=3, seed=0, width=1024, height=1024)
    return [Path(p) for p in table["path"]]


@pytest.fixture(scope="module")
def cache(slides: list[Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("images")
    report = prepare_slide_images(slides, SlideImageSpec(target_size=256), out)
    assert not report.failed and len(report.images) == 3
    return out


def _run(source, out: Path, epochs: int = 3):
    return pretrain_longvit(source, out, image_size=256, epochs=epochs, batch_size=2, samples_per_slide=4,
                            cfg=TINY, model_kwargs=MODEL, device="cpu", progress=False)  # fmt: skip


def test_tissue_regions_are_the_token_mask_box(cache: Path) -> None:
    ds = TissueRegions(
        {p.stem: p for p in cache.glob("*.npy") if ".tokens" not in p.name}, samples_per_slide=2
    )
    assert len(ds) == 6
    sid = ds.ids[0]
    img = load_slide_image(ds.paths[sid])
    rows, cols = np.nonzero(img.token_mask)
    top, left, h, w = ds.region(sid)
    assert (top, left) == (rows.min() * 32, cols.min() * 32)
    assert (h, w) == ((rows.max() + 1) * 32 - top, (cols.max() + 1) * 32 - left)
    x = ds[3]  # slide 3 % 3 = 0
    assert x.dtype == torch.uint8 and tuple(x.shape) == (3, h, w)
    assert torch.equal(
        x, torch.from_numpy(np.array(img.pixels[top : top + h, left : left + w])).permute(2, 0, 1)
    )
    with pytest.raises(ValueError, match="samples_per_slide"):
        TissueRegions({sid: ds.paths[sid]}, samples_per_slide=0)


def test_trains_loss_decreases_and_teacher_loads_strictly(cache: Path, tmp_path: Path) -> None:
    ckpt_path = _run(cache, tmp_path / "run")
    rows = [line.split(",") for line in (tmp_path / "run" / "epochs.csv").read_text().strip().splitlines()]
    losses = [float(r[rows[0].index("loss")]) for r in rows[1:]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    assert losses[1] < 0.8 * losses[0] and min(losses) < math.log(64)
    ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=True)
    assert {"student", "teacher", "dino_loss", "optimizer", "epoch", "engine"} <= set(ckpt)
    assert ckpt["epoch"] == 3 and ckpt["engine"]["step"] == 18  # 12 regions / 2 per batch x 3 epochs
    teacher = ckpt["teacher"]
    assert all(k.startswith(("backbone.", "head.")) for k in teacher)
    assert "backbone.norm.weight" in teacher and "backbone.pos_embed" in teacher
    assert tuple(teacher["backbone.pos_embed"].shape) == (1, 4, 32)  # 64 px global crops, 32 px patches

    # finetuning model: teacher backbone loaded strictly, fc_norm/head from the model's initialisation
    model = create_slide_model("longvit", in_dim=3, n_classes=2, img_size=128, **MODEL)
    load_longvit_weights(model, ckpt_path, init_new_head=True)
    own = model.state_dict()
    backbone = teacher_backbone_state(ckpt_path)
    assert torch.equal(own["encoder.layers.1.ffn.fc1.weight"], backbone["encoder.layers.1.ffn.fc1.weight"])
    assert tuple(own["pos_embed"].shape) == (1, 16, 32)  # interpolated 2x2 -> 4x4
    # same layout as the pretraining model: loads exactly, strict
    pre = create_slide_model("longvit", in_dim=3, n_classes=0, img_size=64, pooling_norm="norm", **MODEL)
    load_longvit_weights(pre, ckpt_path)
    for k, v in pre.state_dict().items():
        assert torch.equal(v, backbone[k]), k
    from gigaslide.models.weights import WeightsMismatchError

    with pytest.raises(WeightsMismatchError, match="init_new_head"):
        load_longvit_weights(
            create_slide_model("longvit", in_dim=3, n_classes=2, img_size=64, **MODEL), ckpt_path
        )


def test_resume_after_interruption_gives_the_same_teacher(cache: Path, tmp_path: Path, monkeypatch) -> None:
    full = torch.load(_run(cache, tmp_path / "full", epochs=2), map_location="cpu", weights_only=True)
    from gigaslide.ssl.dino import DINOObjective

    def crash(self, epoch, ctx):
        if epoch == 1:
            raise KeyboardInterrupt
        return {}

    monkeypatch.setattr(DINOObjective, "on_epoch_end", crash, raising=False)
    with pytest.raises(KeyboardInterrupt):
        _run(cache, tmp_path / "cut", epochs=2)
    assert torch.load(tmp_path / "cut" / "checkpoint.pth", weights_only=True)["epoch"] == 1
    monkeypatch.undo()
    resumed = torch.load(_run(cache, tmp_path / "cut", epochs=2), map_location="cpu", weights_only=True)
    for k, v in full["teacher"].items():
        torch.testing.assert_close(resumed["teacher"][k], v, rtol=0, atol=0, msg=k)


def test_cli_renders_slides_and_reports(slides: list[Path], tmp_path: Path, capsys) -> None:
    out = tmp_path / "cli"
    bad = tmp_path / "broken.tiff"
    bad.write_bytes(b"not a slide")
    argv = ["pretrain", "longvit", *map(str, slides[:2]), str(bad), "--out", str(out), "--image-size", "256",
            "--epochs", "1", "--batch-size", "2", "--samples-per-slide", "2", "--global-size", "64",
            "--local-size", "32", "--local-crops", "1", "--out-dim", "32", "--head-hidden-dim", "16",
            "--head-bottleneck-dim", "8", "--model-arg", "depth=1", "--model-arg", "embed_dim=32",
            "--model-arg", "num_heads=4", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert f"LongViT DINO checkpoint: {out / 'checkpoint.pth'}" in capsys.readouterr().out
    assert sorted(p.name for p in (out / "slide-images").glob("*.json")) == sorted(
        f"{p.stem}.json" for p in slides[:2]
    )
    argv_bad = ["pretrain", "longvit", str(bad), "--out", str(tmp_path / "none"), "--device", "cpu"]
    assert main(argv_bad) != 0
    assert "no usable slide image" in capsys.readouterr().err


def test_dropout_in_model_kwargs_reaches_the_student_only() -> None:
    from gigaslide.ssl.longvit_dino import build_longvit_dino

    obj = build_longvit_dino(2, TINY, model_kwargs={**MODEL, "dropout": 0.5})
    x = torch.randn(2, 3, 64, 64)
    assert obj.teacher.training and obj.student.training  # the teacher's head BatchNorm uses batch stats
    with torch.no_grad():
        assert torch.equal(obj.teacher.backbone(x).embedding, obj.teacher.backbone(x).embedding)
        assert not torch.equal(obj.student.backbone(x).embedding, obj.student.backbone(x).embedding)
