"""Slide images as training units of the cross-validation harness (LongViT: ``input_kind == "image"``).

The feature harness (``Cohort`` -> ``BagDataset`` -> ``collate_bags`` -> ``model(x (B, N, D), mask)``)
serves image models through three drop-in pieces:

* :class:`ImageCohort`: the label CSV joined with a slide-image cache (``gigaslide slide-images``,
  ``<dir>/<slide_id>.npy`` + sidecars) instead of feature files; ``dim`` is 3 (channels);
* :class:`ImageBagDataset`: one :class:`ImageBag` (uint8 image (3, H, W) + token mask) per sample;
* :func:`collate_any`: :func:`collate_image_bags` for image bags (x (B, 3, H, W) normalised with
  ImageNet mean/std, ``item_mask`` (B, H/p, W/p) tissue tokens, which
  :func:`~gigaslide.models.slide.slide_inputs` passes to image models as ``mask``), :func:`collate_bags`
  otherwise.

    cohort = ImageCohort("labels.csv", "cache/longvit-2048")
    ds = ImageBagDataset(cohort, cohort.samples())
    batch = collate_any([ds[0]])     # BagBatch(x (1, 3, 2048, 2048), item_mask (1, 64, 64), coords None)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from gigaslide.data.bags import BagBatch, BagDataset, collate_bags
from gigaslide.data.cohort import Cohort, CohortError, Sample, _map_labels, read_label_table
from gigaslide.data.features_io import FeatureBag
from gigaslide.data.labels import format_ids
from gigaslide.data.slide_images import normalize_images
from gigaslide.preprocess.slide_image import SlideImage, load_slide_image

log = logging.getLogger(__name__)


@dataclass
class ImageBag:
    """One sample as a slide image."""

    sample: Sample
    image: Tensor  # (3, H, W) uint8
    token_mask: Tensor | None  # (H / p, W / p) bool, True = tissue token


class ImageCohort(Cohort):
    """Validated slides with labels or outcomes and their cached slide images.

    Args:
        labels_csv: the label CSV (``slide_id``, ``case_id``, ``label`` | ``time`` + ``event``).
        images_dir: a ``gigaslide slide-images`` cache folder (``<slide_id>.npy`` + ``.json``).
        task, classes, label_col: as for :class:`~gigaslide.data.cohort.Cohort`.
        input_size: when given, every image must have this larger side (the model's input size).
    """

    def __init__(
        self,
        labels_csv: str | os.PathLike[str],
        images_dir: str | os.PathLike[str],
        task: str = "classification",
        classes: Sequence[str] | None = None,
        label_col: str = "label",
        input_size: int | None = None,
    ) -> None:
        if task not in ("classification", "survival"):
            raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
        self.labels_path, self.features_dir = Path(labels_csv), Path(images_dir)
        self.task, self.cache, self.label_col = task, "lazy", label_col
        if not self.labels_path.is_file():
            raise CohortError(f"{self.labels_path}: label CSV not found")
        if not self.features_dir.is_dir():
            raise CohortError(
                f"{self.features_dir}: slide-image folder not found; run `gigaslide slide-images SLIDES --out "
                f"{self.features_dir} --size N` first"
            )
        table = read_label_table(self.labels_path, task, label_col)
        self.class_names: list[str] | None = None
        if task == "classification":
            table["label"], self.class_names = _map_labels(
                table["label"], table["slide_id"], classes, self.labels_path
            )
        table["path"] = [self.features_dir / f"{s}.npy" for s in table["slide_id"]]
        missing = [s for s, p in zip(table["slide_id"], table["path"]) if load_slide_image(p) is None]
        if missing:
            raise CohortError(
                f"{self.labels_path}: {len(missing)} slide(s) have no complete slide image in {self.features_dir}: "
                f"slide_id {format_ids(missing)}. Render them with `gigaslide slide-images ... --out "
                f"{self.features_dir}` or drop them from the CSV."
            )
        self.table = table.reset_index(drop=True)
        self._index = {s: i for i, s in enumerate(self.table["slide_id"])}
        self._cache = {}
        self.dim = 3
        sizes = {max(self.image(s).pixels.shape[:2]) for s in self.table["slide_id"]}
        if input_size is not None and sizes != {int(input_size)}:
            raise CohortError(
                f"{self.features_dir}: slide images have sides {sorted(sizes)} px but the input size is "
                f"{input_size}; render them with `gigaslide slide-images ... --size {input_size}` into a new folder"
            )
        self.input_size = max(sizes)

    def image(self, slide_id: str) -> SlideImage:
        """The cached :class:`SlideImage` of ``slide_id`` (a memory map)."""
        if slide_id not in self._index:
            raise KeyError(f"slide {slide_id!r} is not in cohort {self.labels_path}")
        img = load_slide_image(self.table.at[self._index[slide_id], "path"])
        if img is None:
            raise CohortError(f"{self.features_dir}: slide image of {slide_id} vanished or is incomplete")
        return img

    def load(self, slide_id: str) -> FeatureBag:
        """Always an error: an image cohort has no tile features."""
        raise CohortError(f"{self.features_dir}: an image cohort has no tile features (slide {slide_id})")

    def __repr__(self) -> str:
        return (
            f"ImageCohort({self.labels_path.name}, task={self.task}, slides={len(self)}, "
            f"cases={self.table['case_id'].nunique()}, images {self.input_size} px, classes={self.class_names})"
        )


class ImageBagDataset(BagDataset):
    """One :class:`ImageBag` per sample of an :class:`ImageCohort` (``max_tiles`` does not apply)."""

    def __init__(
        self,
        cohort: ImageCohort,
        samples: Sequence[Sample],
        max_tiles: int | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        super().__init__(cohort, samples, max_tiles=None, train=train, seed=seed)
        multi = [s.sample_id for s in self.samples if len(s.slide_ids) != 1]
        if multi:
            raise CohortError(
                f"an image model takes one slide image per sample, but case(s) {format_ids(multi)} have several "
                "slides; train slide-level (without --case-level)"
            )

    def __getitem__(self, i: int) -> ImageBag:  # type: ignore[override]
        sample = self.samples[i]
        img = self.cohort.image(sample.slide_ids[0])  # type: ignore[attr-defined]
        pixels = torch.from_numpy(np.array(img.pixels)).permute(2, 0, 1)  # (3, H, W) uint8
        mask = None
        if img.token_mask is not None and img.token_mask.any():
            mask = torch.from_numpy(img.token_mask.copy())
        return ImageBag(sample=sample, image=pixels, token_mask=mask)


def collate_image_bags(bags: Sequence[ImageBag], patch_size: int = 32) -> BagBatch:
    """x (B, 3, H, W) float (ImageNet-normalised), item_mask (B, H/p, W/p) bool (all True without a token mask)."""
    if not bags:
        raise ValueError("cannot collate an empty list of image bags")
    shapes = {tuple(b.image.shape) for b in bags}
    if len(shapes) > 1:
        raise ValueError(f"slide images of one batch differ in size {sorted(shapes)}; use batches of one")
    x = normalize_images(torch.stack([b.image for b in bags]))  # (B, 3, H, W)
    h, w = x.shape[-2:]
    masks = [
        b.token_mask
        if b.token_mask is not None
        else torch.ones(h // patch_size, w // patch_size, dtype=torch.bool)
        for b in bags
    ]
    return BagBatch(
        x=x,
        coords=None,
        mask=torch.ones(len(bags), 1, dtype=torch.bool),  # (B, 1): one image per sample
        samples=[b.sample for b in bags],
        bags=list(bags),  # type: ignore[arg-type]
        item_mask=torch.stack(masks),  # (B, H/p, W/p) tissue tokens: the image model's ``mask``
    )


def collate_any(bags: Sequence[object]) -> BagBatch:
    """:func:`collate_image_bags` for :class:`ImageBag` s, :func:`collate_bags` for feature bags."""
    if bags and isinstance(bags[0], ImageBag):
        return collate_image_bags(bags)  # type: ignore[arg-type]
    return collate_bags(bags)  # type: ignore[arg-type]


def bag_dataset_for(cohort: Cohort) -> type[BagDataset]:
    """The dataset class serving ``cohort``: :class:`ImageBagDataset` for image cohorts, else ``BagDataset``."""
    return ImageBagDataset if isinstance(cohort, ImageCohort) else BagDataset
