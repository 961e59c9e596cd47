"""DINO pretraining of the LongViT encoder on tissue regions of cached whole-slide images.

LongViT (Wang et al. 2023, Table 5) is pretrained with DINO at 1,024^2: global views 1,024^2 at crop
scale (0.4, 1), local views 512^2 at scale (0.05, 0.4), AdamW, peak learning rate 2e-3 for a batch
of 1,024 (= DINO's 5e-4 per 256), 10 warm-up epochs, drop path 0.1. The reference crops 100 random
regions of 1,024-1,536 px per slide at 20x; here the crops are drawn from the tissue region of each
slide's rendered image (``gigaslide slide-images`` cache, any resolution): :class:`TissueRegions`
cuts the bounding box of the image's tissue tokens, and :class:`~gigaslide.ssl.multicrop.MultiCrop`
draws DINO's views inside it. ``samples_per_slide`` repeats each slide per epoch (the reference's
many regions per slide).

The student is ``MultiCropWrapper(LongViT(n_classes=0, pooling_norm="norm"), DINOHead)`` (the
reference pretraining backbone: LayerNorm on every token, then the mean), the teacher its EMA copy;
the recipe is :class:`~gigaslide.ssl.dino.DINOObjective` on the training engine. The checkpoint
(``out_dir/checkpoint.pth``) has DINO's layout (``student``, ``teacher``, ``dino_loss``, ...):
:func:`gigaslide.models.slide.longvit_weights.load_longvit_weights` loads the teacher backbone into
a ``create_slide_model("longvit", ...)`` strictly (``init_new_head=True`` for a classifier).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gigaslide.data.slide_images import IMAGENET_MEAN, IMAGENET_STD, prepare_slide_images
from gigaslide.preprocess.slide_image import SlideImageSpec, load_slide_image
from gigaslide.ssl.crop_data import MultiCropData
from gigaslide.ssl.dino import DINOConfig, DINOObjective, dino_head, dino_loss, fit_dino, teacher_kwargs
from gigaslide.ssl.multicrop import MultiCrop, MultiCropConfig, MultiCropWrapper

log = logging.getLogger(__name__)


def longvit_dino_config(**overrides: Any) -> DINOConfig:
    """DINOConfig with LongViT's Table 5 crops (1,024^2 global, 512^2 local); ``overrides`` replace fields."""
    crops = MultiCropConfig(global_size=1024, local_size=512, n_local=8, mean=IMAGENET_MEAN, std=IMAGENET_STD)
    return dataclasses.replace(DINOConfig(crops=crops), **overrides)


class TissueRegions(Dataset):
    """The tissue region of each cached slide image, as uint8 (3, h, w); item ``i`` is slide ``i % n``.

    The region is the bounding box of the image's tissue tokens (the whole content area when the
    cache has no token mask, or when it is empty).
    """

    def __init__(self, images: Mapping[str, str | os.PathLike[str]], samples_per_slide: int = 1) -> None:
        if samples_per_slide < 1:
            raise ValueError(f"samples_per_slide must be >= 1, got {samples_per_slide}")
        self.ids = sorted(images)
        self.paths = {k: Path(images[k]) for k in self.ids}
        self.samples_per_slide = int(samples_per_slide)
        if not self.ids:
            raise ValueError("no slide images to pretrain on")

    def __len__(self) -> int:
        return len(self.ids) * self.samples_per_slide

    def region(self, slide_id: str) -> tuple[int, int, int, int]:
        """(top, left, height, width) in image pixels of the tissue box of ``slide_id``."""
        img = load_slide_image(self.paths[slide_id])
        if img is None:
            raise FileNotFoundError(
                f"{self.paths[slide_id]}: slide image cache missing or incomplete; run `gigaslide slide-images` again"
            )
        cw, ch = img.content_size
        if img.token_mask is not None and img.token_mask.any():
            rows, cols = np.nonzero(img.token_mask)
            p = img.patch_size
            top, left = int(rows.min()) * p, int(cols.min()) * p
            return top, left, (int(rows.max()) + 1) * p - top, (int(cols.max()) + 1) * p - left
        return 0, 0, int(ch), int(cw)

    def __getitem__(self, idx: int) -> Tensor:
        slide_id = self.ids[idx % len(self.ids)]
        top, left, h, w = self.region(slide_id)
        img = load_slide_image(self.paths[slide_id])
        assert img is not None
        crop = np.array(img.pixels[top : top + h, left : left + w])  # (h, w, 3) uint8
        return torch.from_numpy(crop).permute(2, 0, 1)  # (3, h, w)


class LongViTMultiCrop(MultiCropWrapper):
    """MultiCropWrapper whose backbone is a LongViT: the slide embedding (B, D) feeds the head."""

    def forward(self, crops: Tensor | Sequence[Tensor]) -> Tensor:
        if isinstance(crops, Tensor):
            crops = [crops]
        outputs = []
        start = 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            outputs.append(self.backbone(torch.cat(list(crops[start:end]))).embedding)  # (n * B, D)
            start = end
        return self.head(torch.cat(outputs))  # (n_crops * B, out_dim)


def build_longvit_dino(
    epochs: int, cfg: DINOConfig, model_kwargs: dict[str, Any] | None = None
) -> DINOObjective:
    """Student and teacher LongViT (``img_size`` = global crop size) with DINO heads, and the loss."""
    from gigaslide.models.slide import create_slide_model

    kw = {"img_size": cfg.crops.global_size, **dict(model_kwargs or {})}
    kw.pop("pooling_norm", None)
    student_backbone = create_slide_model(
        "longvit", in_dim=3, n_classes=0, pooling_norm="norm", drop_path_rate=cfg.drop_path_rate, **kw
    )
    teacher_backbone = create_slide_model(  # no dropout: the teacher runs in training mode (head BatchNorm)
        "longvit", in_dim=3, n_classes=0, pooling_norm="norm", **teacher_kwargs(kw)
    )
    dim = int(student_backbone.embed_dim)
    student = LongViTMultiCrop(student_backbone, dino_head(dim, cfg))
    teacher = LongViTMultiCrop(teacher_backbone, dino_head(dim, cfg))
    return DINOObjective(student, teacher, dino_loss(cfg, cfg.crops.n_crops, epochs), cfg)


def resolve_slide_images(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    cache_dir: str | os.PathLike[str],
    image_size: int,
    slide_mpp: float | None = None,
) -> tuple[dict[str, Path], dict[str, str]]:
    """``{slide_id: cache .npy}`` and ``{slide_id: error}`` from a slide-image cache folder or slides.

    A folder holding ``*.npy`` images with their ``.json`` sidecars (``gigaslide slide-images``) is used
    as it is; anything else (slide files, a slide folder or CSV) is rendered once at ``image_size``
    into ``cache_dir`` (reused by reruns).
    """
    from gigaslide.pipeline.inputs import collect_slides

    items = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    if len(items) == 1 and Path(items[0]).is_dir():
        folder = Path(items[0])
        cached = {
            p.stem: p
            for p in sorted(folder.glob("*.npy"))
            if not p.name.endswith(".tokens.npy") and p.with_suffix(".json").is_file()
        }
        if cached:
            bad = {k: "incomplete cache" for k, p in cached.items() if load_slide_image(p) is None}
            return {k: p for k, p in cached.items() if k not in bad}, bad
    slides: dict[str, Path] = {}
    for item in items:
        for s in collect_slides(item, slide_mpp=slide_mpp):
            slides[s.slide_id] = Path(s.path)
    spec = SlideImageSpec(target_size=image_size, region="tissue")
    report = prepare_slide_images(slides, spec, cache_dir, mpp=slide_mpp)
    return dict(report.images), dict(report.failed)


def pretrain_longvit(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    *,
    image_size: int = 4096,
    epochs: int = 100,
    batch_size: int = 8,
    samples_per_slide: int = 1,
    cfg: DINOConfig | None = None,
    model_kwargs: dict[str, Any] | None = None,
    slide_mpp: float | None = None,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """DINO pretraining of LongViT on slide images; returns ``out_dir/checkpoint.pth`` (DINO's layout).

    ``source``: a ``gigaslide slide-images`` cache folder, or slides (files, folder, CSV) rendered at
    ``image_size`` into ``out_dir/slide-images``. Slides that fail are skipped and logged. Reruns resume.
    """
    from gigaslide.pipeline.extract import resolve_device
    from gigaslide.utils.dist import dist_env, from_main
    from gigaslide.utils.seed import seed_everything

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    cfg = cfg or longvit_dino_config()
    out = Path(out_dir)
    env = dist_env()
    # under torchrun rank 0 renders the slides; every rank trains on the images it lists
    images, failed = from_main(resolve_slide_images, source, out / "slide-images", image_size, slide_mpp)
    for sid, why in failed.items():
        log.warning("LongViT pretraining: slide %s skipped (%s)", sid, why)
    if not images:
        raise ValueError(
            f"{source}: no usable slide image (failed: {failed or 'none found'}); pass slides or a "
            "`gigaslide slide-images` cache folder"
        )
    log.info("LongViT DINO pretraining on %d slide image(s), %d skipped", len(images), len(failed))
    dev = resolve_device(device, env.local_rank if env.is_distributed else None)
    seed_everything(seed)
    objective = build_longvit_dino(epochs, cfg, model_kwargs)
    data = MultiCropData(TissueRegions(images, samples_per_slide), MultiCrop(cfg.crops), batch_size, seed=seed,
                         num_workers=num_workers)  # fmt: skip
    return fit_dino(objective, data, cfg, batch_size, epochs, out, dev, seed, precision, progress)


def teacher_backbone_state(checkpoint: str | os.PathLike[str]) -> dict[str, Tensor]:
    """The teacher LongViT's ``state_dict`` (``backbone.*`` without the prefix) of a pretraining checkpoint."""
    from gigaslide.models.weights import load_checkpoint

    sd = load_checkpoint(checkpoint, checkpoint_key="teacher")
    return {k.removeprefix("backbone."): v for k, v in sd.items() if k.startswith("backbone.")}


__all__ = [
    "LongViTMultiCrop",
    "TissueRegions",
    "build_longvit_dino",
    "longvit_dino_config",
    "pretrain_longvit",
    "resolve_slide_images",
    "teacher_backbone_state",
]
