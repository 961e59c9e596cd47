"""CLAM's tile-selection rule, on gigaslide's tissue mask (``tile --tile-rule clam``).

CLAM's ``create_patches_fp.py`` (``contour_fn='four_pt'``) keeps a tile when any of four points,
at the tile centre +- a quarter tile, lies inside a tissue contour, and the centre is not inside a
hole of that contour. gigaslide's default keeps a tile when tissue covers at least
``min_tissue`` of it (see :func:`gigaslide.preprocess.tiling.select_tiles`); this module offers
CLAM's rule for users who want tiles chosen the way CLAM chooses them. The tiles are still not
CLAM's own: the tissue mask (CLAM thresholds saturation at 8/255 and keeps no pen removal) and the
grid (CLAM anchors one grid per contour, gigaslide one grid at (0, 0)) differ; CLAM's exact tiles
come from running CLAM and giving its ``patches/`` folder to ``gigaslide embed``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2
import numpy as np

if TYPE_CHECKING:
    from gigaslide.preprocess.tissue import TissueMask

CENTER_SHIFT = 0.5  # CLAM's isInContourV3_Easy default: points at centre +- (size // 2) * 0.5


def filled_and_holes(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(contour interiors with holes filled, the holes) of a boolean mask; both (H, W) bool."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    filled = np.zeros(mask.shape, np.uint8)
    if contours:
        cv2.drawContours(filled, contours, -1, 1, thickness=cv2.FILLED)
    filled_b = filled.astype(bool) | mask
    return filled_b, filled_b & ~mask


def _sample(grid: np.ndarray, points: np.ndarray, downsample: tuple[float, float]) -> np.ndarray:
    """Values of a (H, W) bool grid at level-0 points (N, 2); False outside the grid."""
    h, w = grid.shape
    ix = np.floor(points[:, 0] / downsample[0]).astype(np.int64)
    iy = np.floor(points[:, 1] / downsample[1]).astype(np.int64)
    inside = (ix >= 0) & (iy >= 0) & (ix < w) & (iy < h)
    out = np.zeros(len(points), dtype=bool)
    out[inside] = grid[iy[inside], ix[inside]]
    return out


def four_point_keep(coords: np.ndarray, size_level0: int, tissue: TissueMask) -> np.ndarray:
    """CLAM's four-point rule for tiles at level-0 corners ``coords`` (N, 2); (N,) bool.

    Centre ``c = corner + size // 2``; kept when one of ``c + (+-s, +-s)`` with
    ``s = int(size // 2 * 0.5)`` is inside the tissue outline (holes filled) and ``c`` is not in a hole.
    """
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    filled, holes = filled_and_holes(tissue.mask)
    centre = coords + int(size_level0) // 2  # (N, 2)
    s = int(int(size_level0) // 2 * CENTER_SHIFT)
    keep = np.zeros(len(coords), dtype=bool)
    for dx, dy in ((-s, -s), (s, s), (s, -s), (-s, s)):
        keep |= _sample(filled, centre + np.array([dx, dy]), tissue.downsample)
    return keep & ~_sample(holes, centre, tissue.downsample)
