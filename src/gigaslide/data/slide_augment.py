"""Slide-level augmentation of a sparse map of tiles (Giga-SSL, step 4): flips, 90-degree rotations, scaling.

The map is given by the integer cells (N, 2) = (x, y) of its tiles (see
:func:`gigaslide.data.gigassl_views.tile_cells`). One call draws a random 90-degree rotation, a
random flip of each axis and an independent scale factor per axis, uniform in ``scale`` ([0.5, 2]
as in the paper), and returns the new cells, shifted so that the smallest x and y are 0.

Scaling never merges two sites: each axis goes through a strictly increasing map close to
``round(s * c)``: for ``s >= 1`` it is exactly ``round(s * c)`` (gaps widen), for ``s < 1`` gaps
shrink but two distinct coordinates stay distinct, so the number of active sites is kept (the
official code instead scales pixel coordinates and lets the sparse-map input layer merge what
lands on one cell).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def monotone_scale(values: np.ndarray, factor: float) -> np.ndarray:
    """Scale integer coordinates by ``factor`` with a strictly increasing map (distinct stay distinct).

    ``values`` (N,) int; returns (N,) int64 with ``out[i] < out[j]`` whenever ``values[i] < values[j]``.
    """
    values = np.asarray(values, dtype=np.int64)
    if values.size == 0:
        return values.copy()
    uniq, inverse = np.unique(values, return_inverse=True)
    target = np.rint(factor * (uniq - uniq[0])).astype(np.int64)  # (U,)
    steps = np.arange(uniq.size, dtype=np.int64)
    # smallest strictly increasing sequence >= target: running max of (target - i), plus i
    mapped = np.maximum.accumulate(target - steps) + steps
    return mapped[inverse.reshape(-1)]


@dataclass(frozen=True)
class SlideAugment:
    """Random geometric transform of a slide's tile cells.

    Args:
        flip: flip each axis with probability 1/2.
        rotate90: rotate by k * 90 degrees, k uniform in {0, 1, 2, 3}.
        scale: (low, high) range of the per-axis scale factor, or None for no scaling.
    """

    flip: bool = True
    rotate90: bool = True
    scale: tuple[float, float] | None = (0.5, 2.0)

    def __post_init__(self) -> None:
        if self.scale is not None:
            lo, hi = self.scale
            if not 0 < lo <= hi:
                raise ValueError(f"scale must be a range (low, high) with 0 < low <= high, got {self.scale}")

    def __call__(self, cells: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """cells (N, 2) int (x, y) -> transformed cells (N, 2) int64, minimum x and y equal to 0."""
        cells = np.asarray(cells, dtype=np.int64).reshape(-1, 2)
        x, y = cells[:, 0].copy(), cells[:, 1].copy()
        if self.rotate90:
            for _ in range(int(rng.integers(4))):
                x, y = y, -x  # one quarter turn
        if self.flip:
            if rng.random() < 0.5:
                x = -x
            if rng.random() < 0.5:
                y = -y
        if self.scale is not None:
            lo, hi = self.scale
            x = monotone_scale(x, float(rng.uniform(lo, hi)))
            y = monotone_scale(y, float(rng.uniform(lo, hi)))
        out = np.stack([x, y], axis=1)
        return out - out.min(axis=0) if out.size else out
