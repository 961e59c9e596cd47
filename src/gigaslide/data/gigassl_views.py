"""The Giga-SSL data view: minibatches of B slides, each seen as ``n_views`` sparse maps of T tiles.

For a view of a slide (paper, section 3.2): draw one of the bank's ``n_aug`` tile augmentations, draw
T tiles (default 5) of it without replacement, place them on the tile grid
(:func:`tile_cells`) and apply the slide-level augmentation (:class:`~gigaslide.data.slide_augment.SlideAugment`).

Every draw comes from ``np.random.default_rng([seed, epoch, batch index, slide position, view])``,
so a minibatch is a pure function of (seed, epoch, index) whatever the iteration order, the worker
or a resume mid-epoch; the slide order of an epoch comes from ``default_rng([seed, epoch])``.
Under ``torchrun`` each rank takes its own B slides of every global minibatch of B x world slides.
:class:`GigaSSLViews` has ``__len__`` and ``batches(epoch, start)``: the training engine's data protocol.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from gigaslide.data.gigassl_bank import GigaSSLBank
from gigaslide.data.slide_augment import SlideAugment
from gigaslide.preprocess.tiling_spec import TileSpec


def tile_cells(coords: np.ndarray, spec: TileSpec, grid_unit: float | None = None) -> np.ndarray:
    """Level-0 tile corners (N, 2) -> integer map cells (N, 2), relative to the top-left tile.

    ``grid_unit=None``: one tile, one cell (``round(offset / spec.level0_stride)``, exact on the tile
    grid). Otherwise a cell is ``grid_unit`` pixels at the tiling resolution (the paper's d = 224):
    ``floor(round(offset / spec.scale) / grid_unit)``, the offset first rounded to whole pixels at the
    tiling resolution so that level-0 rounding of the corners cannot move a tile to the previous cell.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    if coords.shape[0] == 0:
        return np.zeros((0, 2), dtype=np.int64)
    offset = coords - coords.min(axis=0)
    if grid_unit is None:
        return np.rint(offset / spec.level0_stride).astype(np.int64)
    if grid_unit <= 0:
        raise ValueError(f"grid_unit must be positive, got {grid_unit}")
    return np.floor(np.rint(offset / spec.scale) / grid_unit).astype(np.int64)


@dataclass
class ViewBatch:
    """One minibatch: ``n_views`` views of each of B slides.

    Attributes:
        features: (V, B, T, D) float32 tile embeddings.
        cells: (V, B, T, 2) int64 (x, y) map cells (feed to ``sparseconvmil`` with ``grid_unit=1``).
        aug_index: (V, B) bank augmentation drawn for each view.
        slide_index: (B,) index of each slide in the bank.
        slide_ids: B slide identifiers.
    """

    features: Tensor
    cells: Tensor
    aug_index: Tensor
    slide_index: Tensor
    slide_ids: list[str]

    def to(self, device: torch.device | str) -> ViewBatch:
        return ViewBatch(
            self.features.to(device), self.cells.to(device), self.aug_index, self.slide_index, self.slide_ids
        )


class GigaSSLViews:
    """Views of a bank's slides for contrastive pretraining.

    Args:
        bank: the augmented embedding bank (or its folder).
        batch_size: B slides per minibatch and rank.
        n_tiles: T tiles per view (5 in the paper); at most the bank's tiles per augmentation.
        n_views: views per slide (2 for SimCLR).
        seed: base seed of every draw.
        slide_augment: the slide-level augmentation; None disables it (the "w/o slide-aug" ablation).
        grid_unit: map cell size (see :func:`tile_cells`); None = one tile per cell.
        rank, world_size: this process's share of each global minibatch.
    """

    def __init__(
        self,
        bank: GigaSSLBank | str,
        batch_size: int = 32,
        n_tiles: int = 5,
        n_views: int = 2,
        seed: int = 0,
        slide_augment: SlideAugment | None = SlideAugment(),  # noqa: B008  (frozen dataclass)
        grid_unit: float | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.bank = bank if isinstance(bank, GigaSSLBank) else GigaSSLBank(bank)
        if batch_size < 1 or n_tiles < 1 or n_views < 1:
            raise ValueError(
                f"batch_size, n_tiles and n_views must be >= 1, got {batch_size}, {n_tiles}, {n_views}"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must lie in [0, world_size={world_size}), got {rank}")
        small = [s.slide_id for s in self.bank.slides if s.n_tiles < n_tiles]
        if small:
            raise ValueError(
                f"n_tiles={n_tiles} but the bank holds fewer tiles per augmentation for {len(small)} slide(s) "
                f"(e.g. {small[0]}); lower n_tiles or rebuild the bank with more --n-tiles"
            )
        missing = [s.slide_id for s in self.bank.slides if s.spec is None]
        if missing:
            raise ValueError(
                f"bank files without a tile spec (e.g. {missing[0]}): rebuild them with gigaslide"
            )
        self.batch_size, self.n_tiles, self.n_views = int(batch_size), int(n_tiles), int(n_views)
        self.seed = int(seed)
        self.slide_augment = slide_augment
        self.grid_unit = grid_unit
        self.rank, self.world_size = int(rank), int(world_size)
        self.global_batch = self.batch_size * self.world_size
        if len(self.bank) < self.global_batch:
            raise ValueError(
                f"the bank has {len(self.bank)} slides, fewer than one minibatch of "
                f"{self.batch_size} x {self.world_size} rank(s); lower batch_size"
            )

    def __len__(self) -> int:
        """Minibatches per epoch (the last incomplete one is dropped: contrastive batches need B slides)."""
        return len(self.bank) // self.global_batch

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The permutation of the bank's slides for ``epoch`` (identical on every rank)."""
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.bank))

    def view(self, slide: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, int]:
        """One view of slide ``slide``: features (T, D), cells (T, 2), augmentation index."""
        meta = self.bank.slides[slide]
        aug = int(rng.integers(meta.n_aug))
        rows = np.sort(rng.choice(meta.n_tiles, size=self.n_tiles, replace=False))
        feats, coords = self.bank.view(slide, aug, rows)  # reads only these rows
        assert meta.spec is not None
        cells = tile_cells(coords, meta.spec, self.grid_unit)
        if self.slide_augment is not None:
            cells = self.slide_augment(cells, rng)
        return feats, cells, aug

    def batch(self, epoch: int, index: int) -> ViewBatch:
        """Minibatch ``index`` of ``epoch`` on this rank."""
        if not 0 <= index < len(self):
            raise IndexError(f"minibatch {index} out of range [0, {len(self)})")
        order = self.epoch_order(epoch)
        first = index * self.global_batch + self.rank * self.batch_size
        slides = order[first : first + self.batch_size]
        feats = np.zeros((self.n_views, self.batch_size, self.n_tiles, self.bank.dim), dtype=np.float32)
        cells = np.zeros((self.n_views, self.batch_size, self.n_tiles, 2), dtype=np.int64)
        augs = np.zeros((self.n_views, self.batch_size), dtype=np.int64)
        for j, slide in enumerate(slides):
            position = self.rank * self.batch_size + j
            for v in range(self.n_views):
                rng = np.random.default_rng([self.seed, epoch, index, position, v])
                feats[v, j], cells[v, j], augs[v, j] = self.view(int(slide), rng)
        return ViewBatch(
            torch.from_numpy(feats),
            torch.from_numpy(cells),
            torch.from_numpy(augs),
            torch.from_numpy(slides.astype(np.int64)),
            [self.bank.slides[int(s)].slide_id for s in slides],
        )

    def batches(self, epoch: int, start: int = 0) -> Iterator[ViewBatch]:
        """The minibatches of ``epoch`` from ``start`` on."""
        for index in range(start, len(self)):
            yield self.batch(epoch, index)
