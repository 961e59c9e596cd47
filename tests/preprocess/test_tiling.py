"""Tile grids: coordinates, tissue selection, errors and HIPT sub-tiles (no real slides needed)."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.io.base import MissingMPPError, Slide
from gigaslide.preprocess.tiling import (
    NoTissueError,
    axis_starts,
    grid_coords,
    in_slide_area,
    select_tiles,
    subtile_coords,
    subtile_spec,
    tile_regions,
    tile_slide,
)
from gigaslide.preprocess.tiling_spec import TileSpec


class ArraySlide(Slide):
    """A one-level slide held in memory."""

    backend = "array"

    def __init__(self, image: np.ndarray, mpp: float | None) -> None:
        super().__init__("memory.tif", mpp=mpp)
        self.image = image
        self.level_dimensions = ((image.shape[1], image.shape[0]),)
        self.level_downsamples = (1.0,)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        return self.image[y : y + height, x : x + width]


class ExactTissue:
    """Tissue mask at level-0 resolution with an exact (slow) tissue fraction, as a reference."""

    def __init__(self, mask: np.ndarray) -> None:
        self.mask = mask

    def tissue_fraction(self, coords: np.ndarray, size_level0: int) -> np.ndarray:
        return np.array(
            [self.mask[y : y + size_level0, x : x + size_level0].sum() / size_level0**2 for x, y in coords]
        )


def _spec(dims=(1000, 700), slide_mpp=0.265, tile=256, stride=None) -> TileSpec:
    return TileSpec.create(
        tile_size=tile,
        stride=stride,
        target_mpp=0.5,
        slide_mpp=slide_mpp,
        level_downsamples=[1.0],
        level0_dims=dims,
    )


def test_grid_coords_match_reference_formula() -> None:
    spec = _spec(dims=(3001, 2003), slide_mpp=0.265, stride=200)
    coords = grid_coords(spec)
    nx, ny = spec.grid_shape()
    expected = [
        (round(i * spec.level0_stride), round(j * spec.level0_stride)) for j in range(ny) for i in range(nx)
    ]
    assert coords.dtype == np.int64 and coords.shape == (nx * ny, 2)
    np.testing.assert_array_equal(coords, np.array(expected))
    # the grid reaches the right/bottom border
    assert coords[:, 0].max() + spec.level0_size >= 3001 and coords[:, 1].max() + spec.level0_size >= 2003
    assert coords[:, 0].max() < 3001 and coords[:, 1].max() < 2003


def test_axis_starts_do_not_drift() -> None:
    # 1000 steps of 483.0189 px: no accumulated rounding error
    starts = axis_starts(1000, 256 * 0.5 / 0.265)
    assert starts[-1] == round(999 * 256 * 0.5 / 0.265)
    assert set(np.diff(starts)) <= {483, 484}


def test_select_tiles_threshold() -> None:
    f = np.array([0.0, 4e-16, 0.1, 0.25, 0.2499999999999, 1.0])
    np.testing.assert_array_equal(select_tiles(f, 0.25), [False, False, False, True, True, True])
    # 0 keeps tiles touching tissue, not background with float round-off
    np.testing.assert_array_equal(select_tiles(f, 0.0), [False, False, True, True, True, True])


def _tissue_slide(mpp: float | None = 0.5):
    h, w = 1200, 1600
    mask = np.zeros((h, w), dtype=bool)
    mask[300:900, 400:1000] = True  # a 600x600 tissue square
    image = np.full((h, w, 3), 255, dtype=np.uint8)
    image[mask] = (180, 60, 140)
    return ArraySlide(image, mpp), ExactTissue(mask)


def test_tile_slide_keeps_tissue_tiles() -> None:
    slide, tissue = _tissue_slide()
    res = tile_slide(slide, target_mpp=0.5, tile_size=256, min_tissue=0.5, tissue=tissue)
    assert res.spec.level0_size == 256 and res.spec.min_tissue == 0.5
    grid = grid_coords(res.spec)
    ref = tissue.tissue_fraction(grid, 256)
    np.testing.assert_array_equal(res.coords, grid[ref >= 0.5])
    np.testing.assert_allclose(res.tissue_fraction, ref[ref >= 0.5], rtol=1e-6)
    assert res.coords.dtype == np.int64 and res.n_tiles == len(res.tissue_fraction) > 0
    assert [0, 0] not in res.coords.tolist()  # background corner
    assert res.tissue is tissue
    # every kept tile overlaps the tissue square
    assert np.all((res.coords[:, 0] + 256 > 400) & (res.coords[:, 0] < 1000))


def test_tile_slide_needs_mpp() -> None:
    slide, tissue = _tissue_slide(mpp=None)
    with pytest.raises(MissingMPPError, match="--slide-mpp"):
        tile_slide(slide, 0.5, 256, tissue=tissue)


def test_no_tissue_error_is_clear() -> None:
    slide, _ = _tissue_slide()
    empty = ExactTissue(np.zeros((1200, 1600), dtype=bool))
    with pytest.raises(NoTissueError, match=r"memory\.tif.*no tissue was detected.*preview") as info:
        tile_slide(slide, 0.5, 256, tissue=empty)
    assert info.value.max_fraction == 0.0
    partial = ExactTissue(np.zeros((1200, 1600), dtype=bool))
    partial.mask[:10, :10] = True
    with pytest.raises(NoTissueError, match=r"best has 0\.002.*--min-tissue, e\.g\. 0\.001"):
        tile_slide(slide, 0.5, 256, min_tissue=0.5, tissue=partial)


def test_hipt_regions_and_subtiles() -> None:
    # a 0.25 um/px slide: a 4096 px region at 0.5 um/px covers 8192 level-0 px
    spec = TileSpec.create(
        tile_size=4096,
        target_mpp=0.5,
        slide_mpp=0.25,
        level_downsamples=[1.0, 4.0, 16.0],
        level0_dims=(20000, 9000),
    )
    assert spec.level0_size == 8192 and spec.read_level == 0 and spec.read_size == 8192
    regions = grid_coords(spec)
    assert regions.shape == (3 * 2, 2)
    sub = subtile_coords(regions, spec)
    assert sub.shape == (6, 256, 2) and sub.dtype == np.int64
    # row-major: index r*16 + c is row r (y), column c (x)
    np.testing.assert_array_equal(sub[1, 0], regions[1])
    np.testing.assert_array_equal(sub[1, 1] - regions[1], [512, 0])
    np.testing.assert_array_equal(sub[1, 16] - regions[1], [0, 512])
    np.testing.assert_array_equal(sub[1, 255] - regions[1], [15 * 512, 15 * 512])
    sspec = subtile_spec(spec)
    assert (sspec.tile_size, sspec.level0_size, sspec.read_size, sspec.target_mpp) == (256, 512, 512, 0.5)
    # sub-tiles exactly tile the region
    assert sub[1, 255, 0] + sspec.level0_size == regions[1, 0] + spec.level0_size
    assert subtile_coords(np.array([10, 20]), spec).shape == (1, 256, 2)
    with pytest.raises(ValueError, match="divide"):
        subtile_spec(spec, 300)


def test_subtiles_on_inexact_scale() -> None:
    spec = TileSpec.create(
        tile_size=4096, target_mpp=0.5, slide_mpp=0.265, level_downsamples=[1.0], level0_dims=(9000, 9000)
    )
    sub = subtile_coords(np.zeros((1, 2), dtype=np.int64), spec)[0]
    step = 256 * 0.5 / 0.265
    np.testing.assert_array_equal(sub[:16, 0], [round(i * step) for i in range(16)])
    assert sub[-1, 0] + subtile_spec(spec).level0_size == pytest.approx(spec.level0_size, abs=1)


def test_in_slide_area_reference() -> None:
    coords = np.array([[0, 0], [900, 0], [900, 600], [-50, 10]])
    np.testing.assert_array_equal(
        in_slide_area(coords, 256, (1000, 700)), [256 * 256, 100 * 256, 100 * 100, 206 * 256]
    )


def test_regions_measure_tissue_over_their_in_slide_area() -> None:
    # one 4096 px region over a 1600 x 1200 slide: 0.022 of the region is tissue, but 0.1875 of
    # the part of it inside the slide
    slide, tissue = _tissue_slide()
    assert tissue.tissue_fraction(np.zeros((1, 2), dtype=np.int64), 4096)[0] == pytest.approx(
        0.0215, abs=1e-4
    )
    with pytest.raises(NoTissueError):  # the old rule (tile fraction of the whole square) kept nothing
        tile_slide(slide, 0.5, 4096, min_tissue=0.05, tissue=tissue)
    res = tile_regions(slide, 0.5, 4096, tissue)
    assert res.coords.tolist() == [[0, 0]] and res.spec.min_tissue == 0.05
    np.testing.assert_allclose(res.tissue_fraction, [600 * 600 / (1600 * 1200)], rtol=1e-6)
    # too strict: no region, but no error either
    none = tile_regions(slide, 0.5, 4096, tissue, min_tissue=0.5)
    assert none.n_tiles == 0 and none.coords.shape == (0, 2) and none.spec.min_tissue == 0.5
    # tissue away from the border: same selection and fractions as tile_slide
    small = tile_regions(slide, 0.5, 256, tissue, min_tissue=0.5)
    ref = tile_slide(slide, 0.5, 256, min_tissue=0.5, tissue=tissue)
    np.testing.assert_array_equal(small.coords, ref.coords)
    np.testing.assert_allclose(small.tissue_fraction, ref.tissue_fraction, rtol=1e-6)
    with pytest.raises(ValueError, match="--region-min-tissue"):
        tile_regions(slide, 0.5, 4096, tissue, min_tissue=1.5)
