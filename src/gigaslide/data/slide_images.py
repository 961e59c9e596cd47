"""Whole-slide images as model inputs (LongViT): a cached-render job and a dataset over the cache.

    report = prepare_slide_images(slides, SlideImageSpec(target_size=4096), cache_dir="cache/longvit-4096")
    ds = SlideImageDataset(report.images, labels={"slide-1": 0, ...})
    item = ds[0]   # {"slide_id", "image" (3, H, W) uint8, "token_mask" (H/32, W/32) bool, "label"}
    x = normalize_images(batch_images.to(device))   # float (B, 3, H, W), ImageNet mean/std, on the device

Rendering a slide happens once (``render_slide_image`` writes a uint8 ``.npy`` memmap); later epochs
and runs only read the cache. A slide that cannot be read is recorded in ``report.failed`` and the
job carries on.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from gigaslide.io.registry import open_slide
from gigaslide.preprocess.slide_image import SlideImage, SlideImageSpec, load_slide_image, render_slide_image
from gigaslide.preprocess.tissue import TissueParams, detect_tissue

logger = logging.getLogger(__name__)

#: LongViT's input normalisation (ImageNet statistics, as in its reference datasets)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class SlideImageReport:
    """Outcome of :func:`prepare_slide_images`: cache file per slide id, and the slides that failed."""

    images: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    rendered: list[str] = field(default_factory=list)
    reused: list[str] = field(default_factory=list)


def prepare_slide_images(
    slides: Sequence[str | Path] | Mapping[str, str | Path],
    spec: SlideImageSpec,
    cache_dir: str | Path,
    tissue_params: TissueParams | None = None,
    mpp: float | None = None,
) -> SlideImageReport:
    """Render every slide once into ``cache_dir/<slide_id>.npy`` (+ token mask, + JSON); resumable.

    ``slides``: paths (slide id = file stem) or ``{slide_id: path}``. Tissue is detected when
    ``spec.region == "tissue"`` and always used for the token mask. Errors are recorded per slide.
    """
    items = dict(slides) if isinstance(slides, Mapping) else {Path(p).stem: p for p in slides}
    report = SlideImageReport()
    cache_dir = Path(cache_dir)
    for slide_id, path in items.items():
        out = cache_dir / f"{slide_id}.npy"
        try:
            with open_slide(path, mpp=mpp) as slide:
                before = (
                    out.with_suffix(".json").stat().st_mtime_ns if out.with_suffix(".json").exists() else None
                )
                tissue = detect_tissue(slide, tissue_params)
                render_slide_image(slide, spec, out, tissue=tissue)
                after = out.with_suffix(".json").stat().st_mtime_ns
            (report.reused if before == after else report.rendered).append(slide_id)
            report.images[slide_id] = out
        except Exception as e:  # one bad slide must not stop the job: record it and carry on
            report.failed[slide_id] = f"{path}: {type(e).__name__}: {e}"
            logger.warning("slide image for %s failed: %s", slide_id, report.failed[slide_id])
    return report


class SlideImageDataset(torch.utils.data.Dataset):
    """Rendered slide images (uint8, read from the memmap cache) with optional labels."""

    def __init__(self, images: Mapping[str, str | Path], labels: Mapping[str, Any] | None = None) -> None:
        self.ids = sorted(images)
        self.paths = {k: Path(images[k]) for k in self.ids}
        self.labels = dict(labels) if labels is not None else None
        if self.labels is not None:
            missing = [k for k in self.ids if k not in self.labels]
            if missing:
                raise ValueError(f"no label for slide(s) {missing[:5]}; give a label for every cached image")

    def __len__(self) -> int:
        return len(self.ids)

    def image(self, idx: int) -> SlideImage:
        """The cached :class:`SlideImage` of item ``idx``."""
        path = self.paths[self.ids[idx]]
        img = load_slide_image(path)
        if img is None:
            raise FileNotFoundError(
                f"{path}: slide image cache missing or incomplete; run prepare_slide_images again"
            )
        return img

    def __getitem__(self, idx: int) -> dict[str, Any]:
        img = self.image(idx)
        pixels = torch.from_numpy(np.array(img.pixels)).permute(2, 0, 1)  # (3, H, W) uint8, one copy
        item: dict[str, Any] = {"slide_id": self.ids[idx], "image": pixels}
        if img.token_mask is not None:
            item["token_mask"] = torch.from_numpy(img.token_mask.copy())
        if self.labels is not None:
            item["label"] = self.labels[self.ids[idx]]
        return item


def normalize_images(x: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """uint8 (B, 3, H, W) -> ``dtype`` (B, 3, H, W) normalised with ImageNet mean/std (do it on the device)."""
    if x.dim() != 4 or x.shape[1] != 3:
        raise ValueError(f"expected uint8 images (B, 3, H, W), got {tuple(x.shape)}")
    mean = torch.tensor(IMAGENET_MEAN, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=x.device, dtype=dtype).view(1, 3, 1, 1)
    return (x.to(dtype) / 255.0 - mean) / std
