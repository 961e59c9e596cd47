"""Multi-crop training data over tiles read straight from slides: the engine's ``EpochData`` for DINO.

:func:`tiles_from_tiling` gathers the tiles of every slide of a ``gigaslide tile`` output (or a
CLAM/TRIDENT patches folder with ``slides``) as one dataset of :class:`~gigaslide.data.TileDataset`
s, at the exact resolution of the tiling; a slide that cannot be used is skipped and reported.
:class:`MultiCropData` cuts an epoch into micro-batches of multi-crop views. Batch ``b`` of epoch
``e`` holds the tiles ``perm_e[b*B*W + r*B : ...]`` of rank ``r`` out of ``W`` (``perm_e`` a seeded
permutation; the last incomplete global batch is dropped, as in DINO), and tile ``i``'s views are
drawn from a generator seeded with ``(seed, epoch, i)``: every batch is a pure function of
``(seed, epoch, index)``, so a resumed run replays the same data and augmentations, whatever the
number of loader workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.ssl.multicrop import MultiCrop, stack_views

log = logging.getLogger(__name__)


@dataclass
class TilingTiles:
    """The tiles of a tiling output: ``dataset[i] -> (uint8 (3, S, S), coord)``, plus what was skipped."""

    dataset: Dataset
    slide_ids: list[str]
    skipped: dict[str, str] = field(default_factory=dict)  # slide_id -> reason
    tile_size: int = 0
    target_mpp: float = float("nan")


def tiles_from_tiling(
    tiling_dir: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
) -> TilingTiles:
    """All tiles of the slides listed by a tiling folder (slides that cannot be read are skipped).

    Raises ``ValueError`` naming the folder when no slide is usable, or when slides were tiled with
    different tile sizes or resolutions (pretraining data must share one physical scale).
    """
    from gigaslide.io import open_slide
    from gigaslide.pipeline.embed_inputs import discover_jobs
    from gigaslide.preprocess.coords_io import read_coords

    jobs = discover_jobs(tiling_dir, slides=slides, slide_mpp=slide_mpp)
    parts: list[TileDataset] = []
    ids: list[str] = []
    skipped: dict[str, str] = {}
    for job in jobs:
        if job.error or job.slide_path is None:
            skipped[job.slide_id] = job.error or "no slide file"
            continue
        try:
            cf = read_coords(job.coords_path, slide_mpp=job.mpp or job.default_mpp)
            ds = TileDataset(job.slide_path, cf.coords, cf.spec, mpp=job.mpp or job.default_mpp)
            with open_slide(job.slide_path, mpp=job.mpp or job.default_mpp) as slide:
                ds._check_geometry(slide)
        except Exception as e:  # one bad slide never stops the run: recorded and reported
            skipped[job.slide_id] = f"{type(e).__name__}: {e}"
            continue
        if len(ds) == 0:
            skipped[job.slide_id] = "no tiles"
            continue
        parts.append(ds)
        ids.append(job.slide_id)
    for sid, why in skipped.items():
        log.warning("pretraining data: slide %s skipped (%s)", sid, why)
    if not parts:
        raise ValueError(
            f"{tiling_dir}: no usable tiles (skipped slides: {skipped or 'none listed'}); run `gigaslide tile` "
            "on your slides first and check that the slide files are where the tiling manifest says"
        )
    sizes = {(p.spec.tile_size, round(p.spec.target_mpp, 4)) for p in parts}
    if len(sizes) > 1:
        raise ValueError(
            f"{tiling_dir}: slides were tiled at different (tile size, mpp) {sorted(sizes)}; "
            "pretrain on one tiling (rerun `gigaslide tile` with one --tile-size/--target-mpp)"
        )
    size, mpp = next(iter(sizes))
    return TilingTiles(ConcatDataset(parts), ids, skipped, tile_size=size, target_mpp=mpp)


def _tile_tensor(item: Any) -> torch.Tensor:
    """``dataset[i]`` as a (3, S, S) uint8 tensor (a TileDataset item is ``(image, coord)``)."""
    img = item[0] if isinstance(item, (tuple, list)) else item
    if isinstance(img, np.ndarray):
        img = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1)
    return img


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The augmentation RNG of tile ``index`` in ``epoch``: a pure function of its three arguments."""
    s = int(np.random.default_rng([int(seed), int(epoch), int(index)]).integers(0, 2**62))
    return torch.Generator().manual_seed(s)


class _Batches(Dataset):
    """Dataset of whole micro-batches (for a DataLoader with ``batch_size=None`` and worker processes)."""

    def __init__(self, data: MultiCropData, epoch: int, start: int) -> None:
        self.data, self.epoch, self.start = data, epoch, start
        self.order = data.epoch_order(epoch)

    def __len__(self) -> int:
        return len(self.data) - self.start

    def __getitem__(self, k: int) -> list[torch.Tensor]:
        return self.data.make_batch(self.epoch, self.start + k, self.order)


class MultiCropData:
    """The engine's ``EpochData``: micro-batches of multi-crop views, ``list`` of (B, 3, h, w) per view.

    Args:
        tiles: any dataset whose items are uint8 (3, S, S) tiles or ``(tile, ...)`` tuples.
        augment: the multi-crop transform.
        batch_size: tiles per micro-batch on this rank.
        seed: data seed (permutations and augmentations).
        num_workers: DataLoader worker processes building batches (0 = in this process).
        rank, world_size: this process's shard (defaults: the torchrun environment).
    """

    def __init__(
        self,
        tiles: Dataset,
        augment: MultiCrop,
        batch_size: int,
        seed: int = 0,
        num_workers: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        from gigaslide.utils.dist import dist_env

        env = dist_env()
        self.tiles = tiles
        self.augment = augment
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.rank = env.rank if rank is None else int(rank)
        self.world_size = env.world_size if world_size is None else int(world_size)
        self.n_tiles = len(tiles)  # type: ignore[arg-type]
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(self) == 0:
            raise ValueError(
                f"{self.n_tiles} tiles make no full batch of {self.batch_size} x {self.world_size} rank(s); "
                "lower --batch-size or tile more slides"
            )

    def __len__(self) -> int:
        return self.n_tiles // (self.batch_size * self.world_size)

    def epoch_order(self, epoch: int) -> np.ndarray:
        """(n_tiles,) the tile order of ``epoch`` (identical on every rank)."""
        return np.random.default_rng([self.seed, int(epoch)]).permutation(self.n_tiles)

    def batch_indices(self, epoch: int, index: int, order: np.ndarray | None = None) -> np.ndarray:
        """(B,) tile indices of micro-batch ``index`` of ``epoch`` on this rank."""
        order = self.epoch_order(epoch) if order is None else order
        start = (index * self.world_size + self.rank) * self.batch_size
        return order[start : start + self.batch_size]

    def make_batch(self, epoch: int, index: int, order: np.ndarray | None = None) -> list[torch.Tensor]:
        """Micro-batch ``index`` of ``epoch``: ``n_crops`` tensors (B, 3, h, w), globals first."""
        samples: list[Sequence[torch.Tensor]] = []
        for i in self.batch_indices(epoch, index, order):
            tile = _tile_tensor(self.tiles[int(i)])
            samples.append(self.augment(tile, item_generator(self.seed, epoch, int(i))))
        return stack_views(samples)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[torch.Tensor]]:
        """The micro-batches of ``epoch`` from ``start`` on."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start {start} outside 0..{len(self)}")
        if self.num_workers == 0:
            order = self.epoch_order(epoch)
            for b in range(start, len(self)):
                yield self.make_batch(epoch, b, order)
            return
        loader = DataLoader(
            _Batches(self, epoch, start),
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        yield from loader


def describe_tiles(t: TilingTiles, path: Path | str) -> str:
    """One line: how many tiles of how many slides at which scale, and what was skipped."""
    skipped = f", {len(t.skipped)} slide(s) skipped" if t.skipped else ""
    return (
        f"{len(t.dataset)} tiles of {len(t.slide_ids)} slide(s) from {path} "  # type: ignore[arg-type]
        f"({t.tile_size} px at {t.target_mpp:g} um/px{skipped})"
    )
