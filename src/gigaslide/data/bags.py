"""Bags of tile features for slide-level training: per-slide or per-case, with tile subsampling.

A :class:`BagDataset` turns cohort :class:`~gigaslide.data.cohort.Sample` units into tensors.
A case-level bag concatenates the tiles of all the case's slides; ``slide_index`` records which
slide each tile came from so attention can be split back per slide.

Augmentation: in training mode at most ``max_tiles`` tiles are drawn at random per bag and epoch.
The draw depends only on ``(seed, epoch, bag index)``, so results do not depend on iteration
order or worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from gigaslide.data.cohort import Cohort, Sample


@dataclass
class Bag:
    """One bag as tensors."""

    sample: Sample
    features: Tensor  # (N, D) float32, or (N, ...) for N-D items (e.g. region grids (M, T, D))
    coords: Tensor | None  # (N, 2) int64 level-0 corners (None when a feature file has no coords)
    slide_index: Tensor  # (N,) int64 index into sample.slide_ids
    tile_index: Tensor  # (N,) int64 row of each tile in its slide's feature file
    item_mask: Tensor | None = None  # (N, ...) bool per-item mask of the feature files, if any


@dataclass
class BagBatch:
    """Padded batch of bags."""

    x: Tensor  # (B, N, D), or (B, N, ...) for N-D items (region grids (B, M, T, D))
    coords: Tensor | None  # (B, N, 2) or None if any bag lacks coords
    mask: Tensor  # (B, N) bool, True = real tile
    samples: list[Sample]
    bags: list[Bag]
    item_mask: Tensor | None = (
        None  # (B, N, ...) bool per-item mask (False on padding), if the files have one
    )

    def to(self, device: torch.device | str) -> BagBatch:
        coords = self.coords.to(device) if self.coords is not None else None
        item_mask = self.item_mask.to(device) if self.item_mask is not None else None
        return BagBatch(self.x.to(device), coords, self.mask.to(device), self.samples, self.bags, item_mask)


class BagDataset(Dataset):
    """Bags of a list of samples from a cohort.

    Args:
        cohort: the validated cohort providing features.
        samples: the units of this split (``cohort.samples(case_level)`` filtered by the split).
        max_tiles: in training mode, draw at most this many tiles per bag and epoch (None = all).
        train: enables the tile subsampling; evaluation bags always contain every tile.
        seed: base seed of the subsampling.
    """

    def __init__(
        self,
        cohort: Cohort,
        samples: Sequence[Sample],
        max_tiles: int | None = None,
        train: bool = False,
        seed: int = 0,
    ) -> None:
        if max_tiles is not None and max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1 or None, got {max_tiles}")
        self.cohort = cohort
        self.samples = list(samples)
        self.max_tiles = max_tiles
        self.train = train
        self.seed = int(seed)
        self.epoch = 0

    @property
    def task(self) -> str:
        return self.cohort.task

    @property
    def dim(self) -> int:
        return self.cohort.dim

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose tile draw :meth:`__getitem__` returns."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def labels(self) -> np.ndarray:
        """(n,) int64 class indices (classification)."""
        return np.array([s.label for s in self.samples], dtype=np.int64)

    def times(self) -> np.ndarray:
        """(n,) float64 follow-up times (survival)."""
        return np.array([s.time for s in self.samples], dtype=np.float64)

    def events(self) -> np.ndarray:
        """(n,) int64 event indicators, 1 = observed (survival)."""
        return np.array([s.event for s in self.samples], dtype=np.int64)

    def __getitem__(self, i: int) -> Bag:
        sample = self.samples[i]
        feats, coords, masks, slide_idx, tile_idx = [], [], [], [], []
        has_coords = True
        for k, sid in enumerate(sample.slide_ids):
            fb = self.cohort.load(sid)
            feats.append(fb.features)
            masks.append(fb.mask)
            if fb.coords is None:
                has_coords = False
            else:
                coords.append(fb.coords)
            slide_idx.append(np.full(fb.n_tiles, k, dtype=np.int64))
            tile_idx.append(np.arange(fb.n_tiles, dtype=np.int64))
        s_idx = np.concatenate(slide_idx)
        t_idx = np.concatenate(tile_idx)
        n = s_idx.shape[0]
        keep: np.ndarray | None = None
        if self.train and self.max_tiles is not None and n > self.max_tiles:
            rng = np.random.default_rng([self.seed, self.epoch, i])
            keep = np.sort(rng.choice(n, size=self.max_tiles, replace=False))
        x = _gather(feats, keep)  # (N', D) or (N', ...)
        c = _gather(coords, keep) if has_coords else None
        m = None
        if any(mk is not None for mk in masks):  # slides without a mask: every entry is real
            shape = next(mk.shape[1:] for mk in masks if mk is not None)
            full = [
                mk if mk is not None else np.ones((f.shape[0], *shape), bool) for mk, f in zip(masks, feats)
            ]
            m = _gather(full, keep)  # (N', ...)
        if keep is not None:
            s_idx, t_idx = s_idx[keep], t_idx[keep]
        return Bag(
            sample=sample,
            features=torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
            coords=torch.from_numpy(np.asarray(c, dtype=np.int64)) if c is not None else None,
            slide_index=torch.from_numpy(s_idx),
            tile_index=torch.from_numpy(t_idx),
            item_mask=torch.from_numpy(np.asarray(m, dtype=bool)) if m is not None else None,
        )


def _gather(parts: list[np.ndarray], keep: np.ndarray | None) -> np.ndarray:
    """Rows ``keep`` of the row-wise concatenation of ``parts`` without materialising all rows."""
    if keep is None:
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)
    offsets = np.cumsum([0] + [p.shape[0] for p in parts])
    out = []
    for k, p in enumerate(parts):
        sel = keep[(keep >= offsets[k]) & (keep < offsets[k + 1])] - offsets[k]
        if sel.size:
            out.append(np.asarray(p[sel]))
    return np.concatenate(out, axis=0)


def collate_bags(bags: Sequence[Bag]) -> BagBatch:
    """Pad bags to the longest one: x (B, N, ...) zeros on padding, mask (B, N) True on real tiles.

    Per-item masks (N, ...) become ``item_mask`` (B, N, ...), False on padding and True for bags
    whose files have none.
    """
    if not bags:
        raise ValueError("cannot collate an empty list of bags")
    n_max = max(b.features.shape[0] for b in bags)
    item = tuple(bags[0].features.shape[1:])
    if any(tuple(b.features.shape[1:]) != item for b in bags):
        raise ValueError(
            f"cannot collate bags of different item shapes: {[tuple(b.features.shape[1:]) for b in bags]}"
        )
    x = torch.zeros(len(bags), n_max, *item, dtype=torch.float32)
    mask = torch.zeros(len(bags), n_max, dtype=torch.bool)
    with_coords = all(b.coords is not None for b in bags)
    coords = None
    if with_coords:
        coords = torch.zeros(len(bags), n_max, *bags[0].coords.shape[1:], dtype=torch.int64)  # type: ignore[union-attr]
    item_mask = None
    mask_shape = next((tuple(b.item_mask.shape[1:]) for b in bags if b.item_mask is not None), None)
    if mask_shape is not None:
        item_mask = torch.zeros(len(bags), n_max, *mask_shape, dtype=torch.bool)
    for j, b in enumerate(bags):
        n = b.features.shape[0]
        x[j, :n] = b.features
        mask[j, :n] = True
        if coords is not None and b.coords is not None:
            coords[j, :n] = b.coords
        if item_mask is not None:
            item_mask[j, :n] = b.item_mask if b.item_mask is not None else True
    return BagBatch(x=x, coords=coords, mask=mask, samples=[b.sample for b in bags], bags=list(bags),
                    item_mask=item_mask)  # fmt: skip
