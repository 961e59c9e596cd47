"""Tile grids over a slide: level-0 coordinates of the tiles that contain enough tissue.

The grid is laid out in level-0 pixels from a :class:`TileSpec`: tile ``i`` along an axis
starts at ``round(i * spec.level0_stride)`` and covers ``spec.level0_size`` level-0 pixels,
so the physical resolution is exact (0.5 um/px on a 0.265 um/px slide covers 483 level-0
pixels). The last row/column may hang over the slide's border; reads there are padded white.

The same machinery produces HIPT's 4096 px regions (``tile_slide(..., tile_size=4096)``);
:func:`subtile_coords` maps each region to its 16 x 16 grid of 256 px sub-tiles.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from gigaslide.preprocess.tiling_spec import TileSpec

if TYPE_CHECKING:
    from gigaslide.io.base import Slide
    from gigaslide.preprocess.tissue import TissueMask, TissueParams

logger = logging.getLogger(__name__)

FRACTION_EPS = 1e-6  # tolerance on tissue fractions
UPSAMPLE_TOLERANCE = 1.01  # a target finer than level 0 by more than 1% upsamples every tile


class NoTissueError(ValueError):
    """No tile of a slide reached the minimum tissue fraction."""

    def __init__(
        self,
        slide_path: Any,
        min_tissue: float,
        n_grid: int,
        max_fraction: float,
        detection: str | None = None,
    ) -> None:
        if max_fraction > FRACTION_EPS:  # tissue was found, the tile threshold removed it
            advice = (
                f"none of the {n_grid} grid tiles has a tissue fraction >= {min_tissue:g} (the best has "
                f"{max_fraction:.3f}). Lower the threshold (--min-tissue, "
                f"e.g. {max(round(max_fraction * 0.9, 3), 0.0):g})"
            )
        else:  # no tissue at all: say which detection rule removed it
            advice = f"no tissue was detected ({detection or 'the tissue mask is empty'})"
        super().__init__(
            f"{slide_path}: no tile kept: {advice}. Check the tissue detection on the slide's "
            "thumbnail (`gigaslide preview SLIDE`)."
        )
        self.slide_path = slide_path
        self.min_tissue = min_tissue
        self.max_fraction = max_fraction


@dataclass
class TilingResult:
    """Tiles kept on one slide."""

    coords: np.ndarray  # (N, 2) int64 level-0 (x, y) top-left corners, row-major order
    spec: TileSpec
    tissue_fraction: np.ndarray  # (N,) float32 tissue fraction of each kept tile
    tissue: TissueMask
    warning: str = ""  # e.g. tiles upsampled from level 0 (see :func:`upsampling_warning`)

    @property
    def n_tiles(self) -> int:
        return int(self.coords.shape[0])


def axis_starts(n: int, level0_stride: float) -> np.ndarray:
    """Level-0 starts ``round(i * level0_stride)`` for ``i < n``; (n,) int64."""
    return np.round(np.arange(n, dtype=np.float64) * float(level0_stride)).astype(np.int64)


def grid_coords(spec: TileSpec) -> np.ndarray:
    """Every tile of the spec's grid over level 0, row-major (y outer, x inner); (N, 2) int64.

    The grid covers the whole slide: the last column/row may extend past the border.
    """
    nx, ny = spec.grid_shape()
    xs = axis_starts(nx, spec.level0_stride)
    ys = axis_starts(ny, spec.level0_stride)
    gy, gx = np.meshgrid(ys, xs, indexing="ij")  # (ny, nx) each
    return np.stack([gx.ravel(), gy.ravel()], axis=1)  # (ny * nx, 2)


def select_tiles(fractions: np.ndarray, min_tissue: float) -> np.ndarray:
    """Boolean mask (N,) of tiles kept: tissue fraction >= ``min_tissue``.

    With ``min_tissue == 0`` a tile is kept when it touches any tissue (fraction > 0),
    never pure background.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    # fractions come from float integral images: ignore round-off (1e-16 on pure background)
    if min_tissue <= 0:
        return fractions > FRACTION_EPS
    return fractions >= min_tissue - FRACTION_EPS


def upsampling_warning(spec: TileSpec) -> str:
    """Why the tiles of ``spec`` are interpolated, or ``""`` when level 0 is fine enough.

    A target resolution finer than level 0 (``slide_mpp > target_mpp * 1.01``) makes every
    tile an upscale of fewer level-0 pixels: no real detail is added.
    """
    if not spec.slide_mpp > spec.target_mpp * UPSAMPLE_TOLERANCE:
        return ""
    factor = spec.slide_mpp / spec.target_mpp
    return (
        f"tiles are upsampled x{factor:.3g} from level 0 (target {spec.target_mpp:g} um/px is finer than "
        f"the slide's {spec.slide_mpp:g} um/px, each {spec.tile_size} px tile is read from "
        f"{spec.read_size} level-0 px): they hold no detail beyond level 0, use --target-mpp "
        f"{spec.slide_mpp:g} or coarser to tile at the scanned resolution"
    )  # no ';': the tiling manifest joins warnings with '; '


def make_spec(
    slide: Slide,
    target_mpp: float,
    tile_size: int,
    stride: int | None = None,
    min_tissue: float = 0.25,
) -> TileSpec:
    """The :class:`TileSpec` of ``slide`` for tiles of ``tile_size`` px at ``target_mpp``.

    Raises:
        MissingMPPError: the slide has no mpp (metadata or user-given).
    """
    return TileSpec.create(
        tile_size=tile_size,
        target_mpp=target_mpp,
        slide_mpp=slide.require_mpp(),
        level_downsamples=slide.level_downsamples,
        level0_dims=slide.dimensions,
        stride=stride,
        min_tissue=min_tissue,
    )


def tile_slide(
    slide: Slide,
    target_mpp: float,
    tile_size: int,
    stride: int | None = None,
    min_tissue: float = 0.25,
    tissue: TissueMask | None = None,
    tissue_params: TissueParams | None = None,
    rule: str = "fraction",
) -> TilingResult:
    """Tile ``slide`` at ``target_mpp`` and keep the tiles with enough tissue.

    Args:
        slide: an opened slide (see :func:`gigaslide.io.open_slide`).
        target_mpp: output resolution in microns per pixel.
        tile_size: tile side in output pixels (4096 for HIPT regions).
        stride: grid step in output pixels (default ``tile_size``: no overlap).
        min_tissue: minimum fraction of a tile covered by tissue.
        tissue: a precomputed tissue mask (reused e.g. for tiles and regions of one slide).
        tissue_params: parameters of tissue detection when ``tissue`` is None.
        rule: ``fraction`` (tissue covers >= ``min_tissue`` of the tile) or ``clam`` (CLAM's
            four-point rule, :mod:`gigaslide.preprocess.clam_rule`; ``min_tissue`` is not used).

    Raises:
        MissingMPPError: the slide has no mpp; the message says how to pass one.
        NoTissueError: no tile reached ``min_tissue``.

    Tiling finer than level 0 is allowed but logged as a WARNING and recorded in
    ``TilingResult.warning`` (see :func:`upsampling_warning`).
    """
    spec = make_spec(slide, target_mpp, tile_size, stride=stride, min_tissue=min_tissue)
    if tissue is None:
        from gigaslide.preprocess.tissue import detect_tissue

        tissue = detect_tissue(slide, tissue_params)
    grid = grid_coords(spec)  # (G, 2)
    fractions = np.asarray(tissue.tissue_fraction(grid, spec.level0_size), dtype=np.float32)  # (G,)
    if rule == "clam":
        from gigaslide.preprocess.clam_rule import four_point_keep

        keep = four_point_keep(grid, spec.level0_size, tissue)
    elif rule == "fraction":
        keep = select_tiles(fractions, spec.min_tissue)
    else:
        raise ValueError(f"--tile-rule must be 'fraction' or 'clam', got {rule!r}")
    if not keep.any():
        best = float(fractions.max()) if fractions.size else 0.0
        report = getattr(tissue, "report", None)  # None for a mask given from outside
        why = report.why_empty() if report is not None else None
        raise NoTissueError(slide.path, spec.min_tissue, int(grid.shape[0]), best, detection=why)
    warning = upsampling_warning(spec)
    if warning:
        logger.warning("%s: %s", slide.path, warning)
    return TilingResult(
        coords=grid[keep], spec=spec, tissue_fraction=fractions[keep], tissue=tissue, warning=warning
    )


# -- HIPT regions ------------------------------------------------------------------------
DEFAULT_REGION_MIN_TISSUE = 0.05  # regions: tissue fraction of the region's in-slide area


def in_slide_area(coords: np.ndarray, size_level0: int, level0_dims: tuple[int, int]) -> np.ndarray:
    """Level-0 area of each ``size_level0`` square that lies inside the slide; (N,) float64.

    Args:
        coords: (N, 2) level-0 (x, y) top-left corners.
        size_level0: side of the squares in level-0 pixels.
        level0_dims: (width, height) of level 0.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)  # (N, 2)
    w, h = level0_dims
    dx = np.clip(np.minimum(coords[:, 0] + size_level0, w) - np.maximum(coords[:, 0], 0), 0, None)
    dy = np.clip(np.minimum(coords[:, 1] + size_level0, h) - np.maximum(coords[:, 1], 0), 0, None)
    return dx * dy


def tile_regions(
    slide: Slide,
    target_mpp: float,
    region_size: int,
    tissue: TissueMask,
    min_tissue: float = DEFAULT_REGION_MIN_TISSUE,
) -> TilingResult:
    """Large regions (4096 px for HIPT) of ``slide`` that contain tissue; may keep none.

    Unlike :func:`tile_slide`, a region's tissue fraction is measured over the part of the
    region INSIDE the slide, not over the whole square: a 4096 px region hanging far over the
    border of a small slide is not penalised for its white padding. A region is kept when
    that fraction is ``>= min_tissue`` (``0`` keeps any region touching tissue).

    Args:
        slide: an opened slide.
        target_mpp: resolution of the regions in microns per pixel.
        region_size: region side in output pixels.
        tissue: the slide's tissue mask (reused from the tiles).
        min_tissue: minimum tissue fraction of a region's in-slide area.

    Returns:
        A :class:`TilingResult` (possibly with zero regions, never raises :class:`NoTissueError`);
        ``tissue_fraction`` holds the in-slide fractions and ``spec.min_tissue`` is ``min_tissue``.
    """
    if not 0.0 <= min_tissue <= 1.0:
        raise ValueError(f"--region-min-tissue must be a fraction in [0, 1], got {min_tissue}")
    spec = make_spec(slide, target_mpp, region_size, min_tissue=min_tissue)
    grid = grid_coords(spec)  # (G, 2)
    full = np.asarray(tissue.tissue_fraction(grid, spec.level0_size), dtype=np.float64)  # (G,)
    inside = in_slide_area(grid, spec.level0_size, spec.level0_dims)  # (G,)
    fractions = np.clip(full * float(spec.level0_size) ** 2 / np.maximum(inside, 1.0), 0.0, 1.0)
    fractions = fractions.astype(np.float32)  # (G,)
    keep = select_tiles(fractions, min_tissue)
    return TilingResult(coords=grid[keep], spec=spec, tissue_fraction=fractions[keep], tissue=tissue)


def subtile_spec(region_spec: TileSpec, sub_size: int = 256) -> TileSpec:
    """The spec of the ``sub_size`` px sub-tiles of ``region_spec``'s regions (same resolution).

    Raises:
        ValueError: ``sub_size`` does not divide the region size.
    """
    if sub_size <= 0 or region_spec.tile_size % sub_size:
        raise ValueError(
            f"sub-tile size {sub_size} must divide the region size {region_spec.tile_size} "
            "(HIPT uses 4096 px regions of 256 px tiles)"
        )
    scale = region_spec.scale
    read_size = max(1, round(sub_size * scale / region_spec.read_downsample))
    return TileSpec(
        tile_size=int(sub_size),
        stride=int(sub_size),
        target_mpp=region_spec.target_mpp,
        slide_mpp=region_spec.slide_mpp,
        read_level=region_spec.read_level,
        read_downsample=region_spec.read_downsample,
        read_size=int(read_size),
        level0_size=max(1, round(sub_size * scale)),
        level0_stride=float(sub_size * scale),
        level0_dims=region_spec.level0_dims,
        min_tissue=0.0,
    )


def subtile_coords(region_coords: np.ndarray, region_spec: TileSpec, sub_size: int = 256) -> np.ndarray:
    """Level-0 corners of each region's sub-tiles, row-major within a region.

    Args:
        region_coords: (R, 2) or (2,) level-0 corners of regions.
        region_spec: the regions' spec (e.g. 4096 px at 0.5 um/px).
        sub_size: sub-tile side in output pixels.

    Returns:
        (R, K * K, 2) int64 with ``K = region_size // sub_size`` (16 for HIPT); sub-tile
        ``r * K + c`` (row r, column c) starts at ``region + round((c, r) * sub_size * scale)``,
        the order HIPT's patch unfolding uses.
    """
    sub = subtile_spec(region_spec, sub_size)
    k = region_spec.tile_size // sub_size
    offsets = axis_starts(k, sub.level0_stride)  # (K,)
    oy, ox = np.meshgrid(offsets, offsets, indexing="ij")  # (K, K)
    grid = np.stack([ox.ravel(), oy.ravel()], axis=1)  # (K*K, 2)
    regions = np.asarray(region_coords, dtype=np.int64).reshape(-1, 2)  # (R, 2)
    return regions[:, None, :] + grid[None, :, :]  # (R, K*K, 2)
