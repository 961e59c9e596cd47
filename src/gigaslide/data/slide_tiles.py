"""Tiles read on the fly from whole slides, one slide per micro-batch: the data of end-to-end training.

Each micro-batch is one slide: ``K`` tile indices drawn from its tissue coordinates (with
replacement when the slide has fewer than ``K`` tiles), read from the slide file at the tile spec's
exact resolution, augmented, normalised for the encoder. Everything random derives from
``(seed, epoch, slide position)``: a resumed run and every process of a distributed run draw the
same tiles.

In distributed end-to-end training the ``K`` tiles are split over ``shares`` encoder processes
(uneven splits allowed, ``np.array_split``): each process reads only its share
(``share_index``), the aggregator process reads none (``read=False``) and only needs the label
and the split sizes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.transforms import IMAGENET_MEAN, IMAGENET_STD, normalize_batch
from gigaslide.preprocess.tiling_spec import TileSpec


@dataclass(frozen=True)
class SlideTiles:
    """Where the tiles of one slide come from, and its target."""

    slide_id: str
    slide_path: Path
    coords: np.ndarray  # (N, 2) int64 level-0 corners of the tissue tiles
    spec: TileSpec
    target: int  # class index
    mpp: float | None = None  # level-0 mpp for slides whose metadata lacks it


@dataclass
class SlideBatch:
    """One slide's micro-batch (this process's share of its tiles)."""

    slide_id: str
    images: torch.Tensor | None  # (k, 3, H, W) float32, normalised; None where nothing is read
    target: torch.Tensor  # (1,) int64
    sizes: list[int]  # tiles per share (sum = K)
    tile_index: np.ndarray  # (k,) rows of this share in the slide's coordinates


class TileAugment:
    """Per-tile flips, 90-degree rotations and brightness/contrast/saturation jitter of (3, H, W)
    float tiles in [0, 1]; the parameters come from a NumPy generator (reproducible per tile)."""

    def __init__(self, jitter: float = 0.1) -> None:
        if not 0.0 <= jitter < 1.0:
            raise ValueError(f"jitter must be in [0, 1), got {jitter}")
        self.jitter = float(jitter)

    def __call__(self, x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:  # (3, H, W)
        if rng.random() < 0.5:
            x = x.flip(-1)
        if rng.random() < 0.5:
            x = x.flip(-2)
        x = torch.rot90(x, int(rng.integers(4)), dims=(-2, -1))
        if self.jitter > 0:
            lo, hi = 1.0 - self.jitter, 1.0 + self.jitter
            b, c, s = rng.uniform(lo, hi, size=3)
            x = x * b
            mean = x.mean()
            x = (x - mean) * c + mean
            gray = (0.299 * x[0] + 0.587 * x[1] + 0.114 * x[2]).unsqueeze(0)
            x = (x - gray) * s + gray
        return x.clamp_(0.0, 1.0)


class SlideTileEpochs:
    """:class:`~gigaslide.train.engine.EpochData` of end-to-end training: one slide per micro-batch.

    Args:
        slides: the slides (with targets) of this set.
        k: tiles per slide and step.
        input_size: encoder input side (tiles are resized to it); mean/std: its normalisation.
        seed: base seed of slide order, tile draws and augmentations.
        fraction: share of the slides visited per epoch (the paper trains on 50% per epoch).
        augment: per-tile augmentation, or None (evaluation, exact-equivalence tests).
        shares, share_index: split the K tiles over ``shares`` processes and read share
            ``share_index`` only; ``read=False`` reads nothing (the aggregator process).
        shuffle: visit slides in a random order per epoch (training) or in the given order.
    """

    def __init__(
        self,
        slides: Sequence[SlideTiles],
        k: int,
        input_size: int,
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
        seed: int = 0,
        fraction: float = 1.0,
        augment: TileAugment | None = None,
        shares: int = 1,
        share_index: int = 0,
        read: bool = True,
        shuffle: bool = True,
    ) -> None:
        if k < 1:
            raise ValueError(f"tiles per slide must be >= 1, got {k}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction of slides per epoch must be in (0, 1], got {fraction}")
        if shares < 1 or not 0 <= share_index < shares:
            raise ValueError(f"share {share_index} of {shares} is not valid")
        if shares > k:
            raise ValueError(
                f"{shares} encoder processes for {k} tiles per slide: use at least one tile per process"
            )
        empty = [s.slide_id for s in slides if len(s.coords) == 0]
        if empty:
            raise ValueError(
                f"slide(s) {empty[:5]} have no tissue tile; drop them or retile with a lower --min-tissue"
            )
        self.slides = list(slides)
        self.k, self.seed, self.fraction = int(k), int(seed), float(fraction)
        self.input_size = (int(input_size), int(input_size))
        self.mean = torch.tensor(list(mean), dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32).view(1, 3, 1, 1)
        self.augment, self.shares, self.share_index, self.read = augment, shares, share_index, read
        self.shuffle = shuffle
        self._datasets: dict[str, TileDataset] = {}

    def __len__(self) -> int:
        if not self.slides:
            return 0
        return max(1, round(self.fraction * len(self.slides)))

    def order(self, epoch: int) -> np.ndarray:
        """Indices of the slides visited in ``epoch``, in order."""
        n = len(self.slides)
        perm = np.random.default_rng([self.seed, 11, epoch]).permutation(n) if self.shuffle else np.arange(n)
        return perm[: len(self)]

    def draw(self, epoch: int, position: int, n_tiles: int) -> np.ndarray:
        """(K,) tile rows of the slide at ``position`` in ``epoch`` (with replacement if it has fewer than K)."""
        rng = np.random.default_rng([self.seed, 13, epoch, position])
        return rng.choice(n_tiles, size=self.k, replace=n_tiles < self.k)

    def _dataset(self, s: SlideTiles) -> TileDataset:
        if s.slide_id not in self._datasets:
            self._datasets[s.slide_id] = TileDataset(s.slide_path, s.coords, s.spec, mpp=s.mpp)
        return self._datasets[s.slide_id]

    def batches(self, epoch: int, start: int = 0) -> Iterator[SlideBatch]:
        order = self.order(epoch)
        for pos in range(start, len(order)):
            s = self.slides[int(order[pos])]
            rows = self.draw(epoch, pos, len(s.coords))
            parts = np.array_split(np.arange(self.k), self.shares)
            mine = parts[self.share_index]
            images = self._read(s, rows[mine], epoch, pos, mine) if self.read else None
            target = torch.tensor([s.target], dtype=torch.long)
            yield SlideBatch(s.slide_id, images, target, [len(p) for p in parts], rows[mine])

    def _read(self, s: SlideTiles, rows: np.ndarray, epoch: int, pos: int, slots: np.ndarray) -> torch.Tensor:
        tiles = self._dataset(s).__getitems__([int(r) for r in rows]).images  # (k, 3, S, S) uint8
        x = tiles.to(torch.float32).div_(255.0)
        if self.augment is not None:
            # the augmentation of a tile depends on its slot among the K draws, not on the process
            x = torch.stack([
                self.augment(x[j], np.random.default_rng([self.seed, 17, epoch, pos, int(slot)]))
                for j, slot in enumerate(slots)
            ])  # fmt: skip
        x = (x * 255.0).round_().to(torch.uint8) if self.augment is not None else tiles
        return normalize_batch(x, self.input_size, self.mean, self.std)

    def close(self) -> None:
        """Close every slide handle."""
        for ds in self._datasets.values():
            ds.close()
        self._datasets.clear()
