"""CLAM's four-point tile rule on gigaslide's mask, against cases worked out by hand."""

from __future__ import annotations

import numpy as np

from gigaslide.preprocess.clam_rule import filled_and_holes, four_point_keep
from gigaslide.preprocess.tiling import select_tiles
from gigaslide.preprocess.tissue import TissueMask

DS = 4  # level-0 px per mask px
SIZE = 64  # tile side in level-0 px: centre at +32, points at centre +- 16


def _tissue(mask: np.ndarray) -> TissueMask:
    return TissueMask.from_mask(mask, (DS, DS), np.zeros((*mask.shape, 3), np.uint8))


def test_four_points_decide_not_the_fraction() -> None:
    mask = np.zeros((48, 64), bool)
    mask[4, 4] = True  # tile (0, 0): one mask px under its point (16, 16): 0.4% tissue
    mask[6:11, 16:32] = True  # tile (64, 0): rows 24..44 (31% tissue), missing the points at y 16 and 48
    mask[16:32, 0:16] = True  # tile (0, 64): all tissue ...
    mask[22:26, 6:10] = False  # ... but its centre (32, 96) lies in a hole
    mask[16:32, 16:32] = True  # tile (64, 64): all tissue
    tissue = _tissue(mask)
    coords = np.array([[0, 0], [64, 0], [0, 64], [64, 64], [128, 128]])
    np.testing.assert_array_equal(four_point_keep(coords, SIZE, tissue), [True, False, False, True, False])
    fractions = tissue.tissue_fraction(coords, SIZE)
    np.testing.assert_array_equal(select_tiles(fractions, 0.25), [False, True, True, True, False])


def test_points_outside_the_mask_count_as_background() -> None:
    mask = np.ones((8, 8), bool)
    tissue = _tissue(mask)
    # a tile hanging over the right edge: points at x = 24 + 32 +- 16 -> 40 (outside) and 72 (outside)
    assert four_point_keep(np.array([[24, 0]]), SIZE, tissue).tolist() == [False]
    assert four_point_keep(np.array([[-40, -40]]), SIZE, tissue).tolist() == [True]  # point (8, 8) inside


def test_filled_and_holes() -> None:
    mask = np.zeros((10, 10), bool)
    mask[1:9, 1:9] = True
    mask[4:6, 4:6] = False
    filled, holes = filled_and_holes(mask)
    assert filled[1:9, 1:9].all() and filled.sum() == 64
    assert holes.sum() == 4 and holes[4:6, 4:6].all()
