"""Tissue detection on a low-resolution thumbnail, and the resulting :class:`TissueMask`.

Pipeline (on a thumbnail at ``TissueParams.mask_mpp`` microns per pixel):

1. HSV; dark pixels (black ink, scanner borders, dark slide edges) and marker ink are set aside;
2. median-smoothed saturation thresholded by Otsu (computed on the non-ink, non-dark pixels and
   clamped to a plausible range), so white glass (unsaturated) is background;
3. morphological closing, filling of holes up to ``max_hole_area_um2``;
4. ink and dark pixels removed again, fragments below ``min_tissue_area_um2`` dropped.

Every size is given in microns, so the result does not depend on the scan resolution.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from gigaslide.preprocess.pen import PenRules, dark_mask, disk, drop_small_components, pen_mask

if TYPE_CHECKING:  # shapely is imported only when outlines are built
    from shapely.geometry import Polygon

    from gigaslide.io.base import Slide

log = logging.getLogger(__name__)


@dataclass
class TissueParams:
    """Every threshold of the tissue detector.

    Attributes:
        mask_mpp: resolution (um/px) of the working thumbnail.
        fallback_max_size: longest thumbnail side when the slide has no mpp.
        assumed_mpp: level-0 mpp assumed (for um-based sizes only) when the slide has no mpp.
        median_um: median filter width applied to the saturation channel.
        sat_threshold: fixed saturation threshold in 0..1; None = Otsu.
        sat_threshold_range: Otsu's threshold is clamped into this range (0..1).
        dark_value: pixels with HSV value below this (0..1) are never tissue.
        close_um: diameter of the morphological closing.
        max_hole_area_um2: holes inside tissue up to this area are filled.
        min_tissue_area_um2: tissue fragments smaller than this are dropped.
        remove_pen: remove marker ink (rules in ``pen``).
        pen: ink colour rules.
    """

    mask_mpp: float = 8.0
    fallback_max_size: int = 2000
    assumed_mpp: float = 0.5
    median_um: float = 24.0
    sat_threshold: float | None = None
    sat_threshold_range: tuple[float, float] = (0.07, 0.25)
    dark_value: float = 0.2
    close_um: float = 48.0
    max_hole_area_um2: float = 30_000.0
    min_tissue_area_um2: float = 20_000.0
    remove_pen: bool = True
    pen: PenRules = field(default_factory=PenRules)

    def __post_init__(self) -> None:
        if self.mask_mpp <= 0:
            raise ValueError(f"TissueParams.mask_mpp must be positive, got {self.mask_mpp}")
        lo, hi = self.sat_threshold_range
        if not 0 <= lo <= hi <= 1:
            raise ValueError(
                f"TissueParams.sat_threshold_range must satisfy 0 <= lo <= hi <= 1, got {lo, hi}"
            )
        if not (math.isfinite(self.min_tissue_area_um2) and self.min_tissue_area_um2 >= 0):
            raise ValueError(
                "--min-tissue-area (TissueParams.min_tissue_area_um2) must be a non-negative area in "
                f"um^2, got {self.min_tissue_area_um2}"
            )


def _odd(n: float) -> int:
    k = max(1, round(n))
    return k if k % 2 else k + 1


def _fill_small_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """Fill background components that do not touch the image border and are at most ``max_px``."""
    if max_px <= 0:
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats((~mask).astype(np.uint8), connectivity=4)
    x, y, w, h = (
        stats[:, i] for i in (cv2.CC_STAT_LEFT, cv2.CC_STAT_TOP, cv2.CC_STAT_WIDTH, cv2.CC_STAT_HEIGHT)
    )
    inner = (x > 0) & (y > 0) & (x + w < mask.shape[1]) & (y + h < mask.shape[0])
    fill = inner & (stats[:, cv2.CC_STAT_AREA] <= max_px)
    fill[0] = False  # label 0 is the tissue itself
    return mask | fill[labels]


def saturation_threshold(sat: np.ndarray, valid: np.ndarray, params: TissueParams) -> float:
    """Threshold (0..255) on smoothed saturation: fixed, or Otsu over ``valid`` pixels clamped to range."""
    lo, hi = (v * 255.0 for v in params.sat_threshold_range)
    if params.sat_threshold is not None:
        return float(params.sat_threshold) * 255.0
    values = sat[valid]
    if values.size < 2 or int(values.max()) == int(values.min()):
        return hi
    otsu, _ = cv2.threshold(values.reshape(-1, 1), 0, 255, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    return float(np.clip(otsu, lo, hi))


@dataclass(frozen=True)
class TissueReport:
    """Area (um^2) that each rule of the detector removed, to explain an empty mask.

    Attributes:
        stained_um2: pixels above the saturation threshold (before any rule removed them).
        ink_um2: stained area removed as marker ink.
        dark_um2: stained area removed as dark (black ink, borders).
        small_um2: area of the fragments smaller than ``min_tissue_area_um2``.
        kept_um2: area of the final mask.
        min_tissue_area_um2: the minimum fragment area that was applied.
    """

    stained_um2: float
    ink_um2: float
    dark_um2: float
    small_um2: float
    kept_um2: float
    min_tissue_area_um2: float

    def why_empty(self) -> str:
        """Which rule removed the tissue (one sentence with the option that changes it)."""
        if self.kept_um2 > 0:
            return f"the detector kept {self.kept_um2:,.0f} um^2 of tissue"
        if self.stained_um2 <= 0:
            return "the thumbnail has no stained (saturated) pixel: the slide looks empty or unstained"
        parts = []
        if self.small_um2 > 0:
            parts.append(
                f"{self.small_um2:,.0f} um^2 (after closing and hole filling) in fragments smaller than "
                "the minimum tissue area "
                f"{self.min_tissue_area_um2:,.0f} um^2 (--min-tissue-area, e.g. 0)"
            )
        if self.ink_um2 > 0:
            parts.append(f"{self.ink_um2:,.0f} um^2 taken for marker ink (--keep-ink keeps it)")
        if self.dark_um2 > 0:
            parts.append(
                f"{self.dark_um2:,.0f} um^2 darker than TissueParams.dark_value (black ink, borders)"
            )
        removed = "; ".join(parts) if parts else "by the morphological clean-up"
        return (
            f"tissue detection found {self.stained_um2:,.0f} um^2 of stained area and removed all of it: "
            f"{removed}"
        )


def detect_tissue_array(
    rgb: np.ndarray, params: TissueParams | None = None, mpp: float | None = None
) -> np.ndarray:
    """Tissue mask of an RGB image; (H, W) bool.

    Args:
        rgb: (H, W, 3) uint8 RGB image (e.g. a slide thumbnail).
        params: thresholds; defaults if None.
        mpp: microns per pixel of ``rgb`` (sizes in ``params`` are in microns); default ``params.mask_mpp``.
    """
    return detect_tissue_report(rgb, params, mpp)[0]


def detect_tissue_report(
    rgb: np.ndarray, params: TissueParams | None = None, mpp: float | None = None
) -> tuple[np.ndarray, TissueReport]:
    """:func:`detect_tissue_array` and the :class:`TissueReport` of what each rule removed."""
    params = params or TissueParams()
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(
            f"detect_tissue_array needs an (H, W, 3) uint8 RGB image, got {rgb.shape} {rgb.dtype}"
        )
    mpp = float(params.mask_mpp if mpp is None else mpp)
    if mpp <= 0 or not math.isfinite(mpp):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    px_area = mpp * mpp
    hsv = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)
    dark = dark_mask(hsv, params.dark_value, dilate_px=1)
    ink = pen_mask(hsv, params.pen, mpp) if params.remove_pen else np.zeros_like(dark)
    excluded = dark | ink
    sat = cv2.medianBlur(np.ascontiguousarray(hsv[..., 1]), min(_odd(params.median_um / mpp), 255))
    thr = saturation_threshold(sat, ~excluded, params)
    stained = sat > thr
    tissue = stained & ~excluded
    if params.close_um > 0 and tissue.any():
        tissue = cv2.morphologyEx(
            tissue.astype(np.uint8), cv2.MORPH_CLOSE, disk(params.close_um / 2 / mpp)
        ).astype(bool)
    tissue = _fill_small_holes(tissue, params.max_hole_area_um2 / px_area)
    tissue &= ~excluded
    kept = drop_small_components(tissue, params.min_tissue_area_um2 / px_area)
    report = TissueReport(
        stained_um2=float(stained.sum()) * px_area,
        ink_um2=float((stained & ink).sum()) * px_area,
        dark_um2=float((stained & dark & ~ink).sum()) * px_area,
        small_um2=float((tissue & ~kept).sum()) * px_area,
        kept_um2=float(kept.sum()) * px_area,
        min_tissue_area_um2=float(params.min_tissue_area_um2),
    )
    return kept, report


def mask_polygons(mask: np.ndarray, downsample: tuple[float, float]) -> list[Polygon]:
    """Outlines of a mask as shapely polygons in level-0 pixels, holes preserved (RETR_CCOMP)."""
    import shapely
    from shapely.geometry import Polygon
    from shapely.geometry.polygon import orient

    contours, hierarchy = cv2.findContours(mask.astype(np.uint8), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    if hierarchy is None:
        return []
    hier = hierarchy[0]  # (n, 4): next, previous, first child, parent
    sx, sy = downsample

    def to_level0(c: np.ndarray) -> np.ndarray:
        pts = c[:, 0, :].astype(np.float64) + 0.5  # pixel centres
        return np.column_stack([pts[:, 0] * sx, pts[:, 1] * sy])

    polygons: list[Polygon] = []
    for i, c in enumerate(contours):
        if hier[i][3] != -1 or len(c) < 3:
            continue
        holes = []
        child = hier[i][2]
        while child != -1:
            if len(contours[child]) >= 3:
                holes.append(to_level0(contours[child]))
            child = hier[child][0]
        poly = Polygon(to_level0(c), holes)
        if not poly.is_valid:
            poly = shapely.make_valid(poly)
        parts = (
            [poly]
            if isinstance(poly, Polygon)
            else [g for g in getattr(poly, "geoms", []) if isinstance(g, Polygon)]
        )
        polygons.extend(orient(p, 1.0) for p in parts if p.area > 0)
    return polygons


@dataclass
class TissueMask:
    """Tissue found on one slide.

    Attributes:
        mask: (H, W) bool tissue mask on the thumbnail grid.
        downsample: level-0 pixels per mask pixel in (x, y).
        thumbnail: (H, W, 3) uint8 RGB thumbnail the mask was computed on.
        mpp: microns per mask pixel, None when the slide had no mpp.
        level0_dims: (width, height) of level 0.
        report: what each detection rule removed (None for a mask given from outside).

    The outlines (:attr:`polygons`) are built on first use: tiling needs only the mask, and
    making the polygons of a fragmented mask valid costs more than the rest of the tiling.
    """

    mask: np.ndarray
    downsample: tuple[float, float]
    thumbnail: np.ndarray
    mpp: float | None = None
    level0_dims: tuple[int, int] = (0, 0)
    report: TissueReport | None = None
    _polygons: list[Polygon] | None = field(default=None, repr=False)

    @property
    def polygons(self) -> list[Polygon]:
        """Tissue outlines in level-0 pixel coordinates (holes preserved), built on first use."""
        if self._polygons is None:
            self._polygons = mask_polygons(self.mask, self.downsample)
        return self._polygons

    @classmethod
    def from_mask(
        cls,
        mask: np.ndarray,
        downsample: tuple[float, float],
        thumbnail: np.ndarray,
        mpp: float | None = None,
        level0_dims: tuple[int, int] | None = None,
        report: TissueReport | None = None,
    ) -> TissueMask:
        """Build a TissueMask from a boolean mask (outlines are built when first asked for)."""
        mask = np.asarray(mask, dtype=bool)
        if level0_dims is None:
            level0_dims = (round(mask.shape[1] * downsample[0]), round(mask.shape[0] * downsample[1]))
        return cls(
            mask=mask,
            downsample=(float(downsample[0]), float(downsample[1])),
            thumbnail=thumbnail,
            mpp=mpp,
            level0_dims=(int(level0_dims[0]), int(level0_dims[1])),
            report=report,
        )

    @property
    def area_fraction(self) -> float:
        """Fraction of the slide area covered by tissue."""
        return float(self.mask.mean()) if self.mask.size else 0.0

    def to_geojson(self) -> dict[str, Any]:
        """GeoJSON FeatureCollection of the tissue polygons, coordinates in level-0 pixels (QuPath-style)."""
        from shapely.geometry import mapping

        features = [
            {
                "type": "Feature",
                "id": f"tissue-{i}",
                "geometry": mapping(poly),
                "properties": {
                    "objectType": "annotation",
                    "classification": {"name": "Tissue", "color": [0, 200, 0]},
                    "area_px": float(poly.area),
                },
            }
            for i, poly in enumerate(self.polygons)
        ]
        # tuples -> lists so json round-trips compare equal
        return {"type": "FeatureCollection", "features": _listify(features)}

    def integral(self) -> np.ndarray:
        """(H + 1, W + 1) float64 summed-area table of the mask."""
        return cv2.integral(self.mask.view(np.uint8)).astype(np.float64)  # exact: int32 counts

    def tissue_fraction(self, coords: np.ndarray, size_level0: int | float) -> np.ndarray:
        """Fraction of each level-0 square ``[x, x + size) x [y, y + size)`` covered by tissue; (N,) float64.

        Exact area coverage of the piecewise-constant mask, computed by bilinear interpolation of
        the summed-area table at the (fractional) square corners; parts outside the mask count as
        background.
        """
        coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
        if size_level0 <= 0:
            raise ValueError(f"size_level0 must be positive, got {size_level0}")
        if len(coords) == 0:
            return np.zeros(0, dtype=np.float64)
        sat = self.integral()
        h, w = self.mask.shape
        sx, sy = self.downsample
        x0 = np.clip(coords[:, 0] / sx, 0, w)
        x1 = np.clip((coords[:, 0] + size_level0) / sx, 0, w)
        y0 = np.clip(coords[:, 1] / sy, 0, h)
        y1 = np.clip((coords[:, 1] + size_level0) / sy, 0, h)
        covered = _sat_at(sat, x1, y1) - _sat_at(sat, x0, y1) - _sat_at(sat, x1, y0) + _sat_at(sat, x0, y0)
        area = (size_level0 / sx) * (size_level0 / sy)
        return np.clip(covered / area, 0.0, 1.0)


def _sat_at(sat: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Summed-area table at fractional (x, y) in mask pixels, bilinear (exact for a pixelwise-constant mask)."""
    hmax, wmax = sat.shape[0] - 1, sat.shape[1] - 1
    ix = np.clip(np.floor(x).astype(np.int64), 0, max(wmax - 1, 0))
    iy = np.clip(np.floor(y).astype(np.int64), 0, max(hmax - 1, 0))
    fx, fy = x - ix, y - iy
    ix1, iy1 = np.minimum(ix + 1, wmax), np.minimum(iy + 1, hmax)
    return (
        sat[iy, ix] * (1 - fx) * (1 - fy)
        + sat[iy, ix1] * fx * (1 - fy)
        + sat[iy1, ix] * (1 - fx) * fy
        + sat[iy1, ix1] * fx * fy
    )


def _listify(obj: Any) -> Any:
    if isinstance(obj, (list, tuple)):
        return [_listify(o) for o in obj]
    if isinstance(obj, dict):
        return {k: _listify(v) for k, v in obj.items()}
    return obj


def detect_tissue(slide: Slide, params: TissueParams | None = None) -> TissueMask:
    """Detect tissue on ``slide`` from a thumbnail at ``params.mask_mpp`` um/px.

    Slides without mpp get a ``params.fallback_max_size`` thumbnail (logged); micron-based sizes then
    assume ``params.assumed_mpp`` at level 0.
    """
    params = params or TissueParams()
    w0, h0 = slide.dimensions
    slide_mpp = slide.mpp
    if slide_mpp is not None and math.isfinite(slide_mpp) and slide_mpp > 0:
        ds = max(1.0, params.mask_mpp / slide_mpp)
        max_size = max(1, round(max(w0, h0) / ds))
    else:
        slide_mpp = None
        max_size = min(params.fallback_max_size, max(w0, h0))
        log.warning(
            "%s: no mpp metadata; tissue detection uses a %d px thumbnail and assumes %.3g um/px for "
            "its size thresholds (tiling will still need the real mpp)",
            slide.path,
            max_size,
            params.assumed_mpp,
        )
    thumb = slide.thumbnail(max_size)
    th, tw = thumb.shape[:2]
    downsample = (w0 / tw, h0 / th)
    mask_mpp = (slide_mpp if slide_mpp is not None else params.assumed_mpp) * downsample[0]
    mask, report = detect_tissue_report(thumb, params, mpp=mask_mpp)
    if not mask.any():
        log.warning("%s: no tissue found (thumbnail %dx%d): %s", slide.path, tw, th, report.why_empty())
    return TissueMask.from_mask(
        mask,
        downsample,
        thumb,
        mpp=mask_mpp if slide_mpp is not None else None,
        level0_dims=(w0, h0),
        report=report,
    )
