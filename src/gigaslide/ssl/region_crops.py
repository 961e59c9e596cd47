"""HIPT stage-2 views: multi-crop augmentation of 16x16x384 grids of frozen ViT_256 tokens.

A 4096 px region's (256, 384) tokens are laid out as a (384, 16, 16) grid (token ``i * 16 + j`` at
row ``i``, column ``j``, as in :mod:`gigaslide.data.region_features`). HIPT's stage-2 DINO treats that
grid as an image (paper section 3.3): 2 global crops of 14x14 tokens and ``n_local`` local crops of
6x6 tokens (the scale of DINO's 224 / 96 px crops on 256 px tiles), each cut at a uniformly random
position and flipped left-right with probability 0.5 (the official ``DataAugmentationDINO4K``:
``RandomCrop`` + ``RandomHorizontalFlip`` only, no resizing), then standard dropout (p = 0.1 in the
paper) on every element of every view, scaled by 1 / (1 - p).

:class:`RegionGrids` is the dataset of every region of a set of region feature files
(``gigaslide embed --regions`` outputs); ``dataset[i]`` is a float32 (384, 16, 16) tensor. Its items
plug into :class:`gigaslide.ssl.crop_data.MultiCropData` with :class:`RegionCrops` as the augmentation,
which makes every batch a pure function of ``(seed, epoch, index)``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from gigaslide.data.region_features import read_region_features

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegionCropConfig:
    """Stage-2 view recipe (defaults: HIPT's ``main_dino4k.py`` and paper)."""

    global_size: int = 14
    local_size: int = 6
    n_local: int = 8
    flip_p: float = 0.5
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if not 1 <= self.local_size <= self.global_size:
            raise ValueError(
                f"need 1 <= local_size <= global_size, got {self.local_size}, {self.global_size}"
            )
        if self.n_local < 0:
            raise ValueError(f"n_local must be >= 0, got {self.n_local}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")

    @property
    def n_crops(self) -> int:
        return 2 + self.n_local


class RegionCrops:
    """(C, H, W) token grid + generator -> ``2 + n_local`` views (C, s, s), the 2 global views first."""

    def __init__(self, cfg: RegionCropConfig | None = None) -> None:
        self.cfg = cfg or RegionCropConfig()

    def view(self, grid: torch.Tensor, size: int, g: torch.Generator) -> torch.Tensor:
        """One random ``size`` x ``size`` crop of ``grid`` (C, H, W), maybe flipped, with dropout."""
        _, h, w = grid.shape
        if size > h or size > w:
            raise ValueError(f"crop of {size}x{size} tokens does not fit a {h}x{w} grid")
        top = int(torch.randint(0, h - size + 1, (1,), generator=g))
        left = int(torch.randint(0, w - size + 1, (1,), generator=g))
        x = grid[:, top : top + size, left : left + size]  # (C, s, s)
        if float(torch.rand((), generator=g)) < self.cfg.flip_p:
            x = x.flip(-1)
        p = self.cfg.dropout
        if p > 0:
            keep = torch.rand(x.shape, generator=g) >= p
            x = x * keep / (1.0 - p)
        return x.contiguous()

    def __call__(self, grid: torch.Tensor, g: torch.Generator) -> list[torch.Tensor]:
        c = self.cfg
        views = [self.view(grid, c.global_size, g) for _ in range(2)]
        views += [self.view(grid, c.local_size, g) for _ in range(c.n_local)]
        return views


def region_files(path: str | os.PathLike[str]) -> list[Path]:
    """The region feature files under ``path``: a file, a folder of ``.h5``, or an embed output (``h5_files/``)."""
    p = Path(path)
    if p.is_file():
        return [p]
    if not p.is_dir():
        raise FileNotFoundError(
            f"{p}: no such region feature file or folder; write one with "
            "`gigaslide embed TILING_DIR --encoder hipt_vit256 --regions --out FEATURES`"
        )
    folder = p / "h5_files" if (p / "h5_files").is_dir() else p
    files = sorted(folder.glob("*.h5"))
    if not files:
        raise ValueError(
            f"{p}: no region feature files (*.h5) found; write them with "
            "`gigaslide embed TILING_DIR --encoder hipt_vit256 --regions --out FEATURES`"
        )
    return files


class RegionGrids(Dataset):
    """Every region of a set of region feature files: ``dataset[i]`` -> float32 (D, K, K) token grid.

    Files that cannot be read, or whose grids are not square or differ in shape from the first, are
    skipped and listed in :attr:`skipped` (file name -> reason); the grids are held in memory
    (256 x 384 float32 = 384 KiB per region).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.files = region_files(path)
        self.skipped: dict[str, str] = {}
        grids: list[np.ndarray] = []
        shape: tuple[int, int] | None = None
        for f in self.files:
            try:
                rf = read_region_features(f)
                m, t, d = rf.features.shape
                k = int(round(t**0.5))  # noqa: RUF046
                if k * k != t:
                    raise ValueError(f"{t} tokens per region do not make a square grid")
                if shape is not None and (t, d) != shape:
                    raise ValueError(
                        f"regions of {t} x {d} tokens, the first file has {shape[0]} x {shape[1]}"
                    )
            except (ValueError, OSError, KeyError) as e:  # one bad file never stops the run
                self.skipped[f.name] = str(e)
                log.warning("stage-2 data: %s skipped (%s)", f, e)
                continue
            shape = (t, d)
            if m:
                # (M, T, D) -> (M, D, K, K): token i * K + j at row i, column j
                grids.append(rf.features.astype(np.float32).transpose(0, 2, 1).reshape(m, d, k, k))
        if not grids:
            raise ValueError(
                f"{path}: no usable regions (skipped: {self.skipped or 'none'}); embed regions with "
                "`gigaslide embed TILING_DIR --encoder hipt_vit256 --regions`"
            )
        self.grids = torch.from_numpy(np.concatenate(grids))  # (N, D, K, K)

    def __len__(self) -> int:
        return int(self.grids.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.grids[i]

    @property
    def in_dim(self) -> int:
        return int(self.grids.shape[1])

    @property
    def grid_size(self) -> int:
        return int(self.grids.shape[-1])
