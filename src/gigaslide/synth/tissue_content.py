"""Synthetic H&E-like tissue: a layout (where tissue, tumour, glands and nuclei are) and its rendering.

A :class:`SlideLayout` is computed once per slide on a coarse grid (one cell = ``CELL_UM`` microns)
plus explicit lists of glands and nuclei in level-0 pixels. :meth:`SlideLayout.render` then draws
any level-0 window with NumPy/OpenCV array operations, so a slide can be rendered in chunks and the
chunks join without seams. Colours follow Beer-Lambert mixing of haematoxylin and eosin optical
densities, so the images have realistic hue/saturation (pink stroma, purple nuclei, white glass).

Tissue types:
  * normal: pink fibrous stroma with sparse spindle nuclei and lymphocytes, glands (pale lumen,
    epithelial ring with small regular basal nuclei);
  * tumour: purple cytoplasm packed with large, pleomorphic, hyperchromatic nuclei.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage

CELL_UM = 8.0  # side of one coarse layout cell in microns
BACKGROUND_LEVEL = 242.0  # brightness of empty glass
# optical density per unit stain, RGB (haematoxylin: blue-purple, eosin: pink)
STAIN_H = np.array([0.60, 0.75, 0.29], dtype=np.float32)
STAIN_E = np.array([0.10, 0.80, 0.40], dtype=np.float32)
TUMOR_PATTERNS = ("scattered", "clustered", "border", "center")


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    """Gaussian-smoothed white noise normalised to zero mean, unit std; (H, W) float32."""
    n = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma, mode="reflect")
    n -= n.mean()
    sd = float(n.std())
    return n / sd if sd > 0 else n


def _upsample(field: np.ndarray, cell: float, x0: int, y0: int, w: int, h: int) -> np.ndarray:
    """Bilinearly sample a coarse (gh, gw) field at level-0 pixel centres of a window; (h, w) float32."""
    m = np.array(
        [[1.0 / cell, 0.0, (x0 + 0.5) / cell - 0.5], [0.0, 1.0 / cell, (y0 + 0.5) / cell - 0.5]],
        dtype=np.float64,
    )
    return cv2.warpAffine(
        field.astype(np.float32, copy=False),
        m,
        (w, h),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REPLICATE,
    )


def _ramp(x: np.ndarray, lo: float = 0.35, hi: float = 0.65) -> np.ndarray:
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


@dataclass
class SlideLayout:
    """Everything needed to render one synthetic slide deterministically.

    Attributes:
        width, height: level-0 size in pixels.
        mpp: microns per level-0 pixel.
        cell: level-0 pixels per coarse cell.
        tissue: (gh, gw) float32 in [0, 1], soft tissue indicator on the coarse grid.
        tumor: (gh, gw) float32 in [0, 1], soft tumour indicator (inside tissue only).
        stain: (gh, gw) float32 multiplicative stain intensity (slow staining variation).
        glands: (G, 6) float32 rows cx, cy, outer_a, outer_b, angle_deg, lumen_scale (level-0 px).
        nuclei: (M, 6) float32 rows cx, cy, semi_axis_a, semi_axis_b, angle_deg, darkness.
        waves: (K, 4) float64 rows kx, ky, phase, amplitude of the collagen-fibre phase field.
        stain_scale: (2,) per-slide haematoxylin and eosin strength.
        tumor_fraction: realised fraction of the tissue area that is tumour.
        seed: seed of the per-window pixel noise.
    """

    width: int
    height: int
    mpp: float
    cell: float
    tissue: np.ndarray
    tumor: np.ndarray
    stain: np.ndarray
    glands: np.ndarray
    nuclei: np.ndarray
    waves: np.ndarray
    stain_scale: np.ndarray
    tumor_fraction: float
    seed: int

    def tissue_mask(self) -> np.ndarray:
        """(gh, gw) bool ground-truth tissue on the coarse grid."""
        return self.tissue >= 0.5

    def tumor_mask(self) -> np.ndarray:
        """(gh, gw) bool ground-truth tumour on the coarse grid."""
        return (self.tumor >= 0.5) & self.tissue_mask()

    # -- rendering -------------------------------------------------------------------------
    def _draw_ellipses(
        self,
        table: np.ndarray,
        x0: int,
        y0: int,
        w: int,
        h: int,
        canvas: np.ndarray,
        values: np.ndarray,
        antialias: bool = True,
    ) -> None:
        """Draw filled ellipses of ``table`` (rows cx, cy, a, b, angle, ...) that touch the window."""
        if len(table) == 0:
            return
        r = np.maximum(table[:, 2], table[:, 3]) + 2
        sel = np.flatnonzero(
            (table[:, 0] + r > x0)
            & (table[:, 0] - r < x0 + w)
            & (table[:, 1] + r > y0)
            & (table[:, 1] - r < y0 + h)
        )
        if len(sel) == 0:
            return
        sub = table[sel]
        # 2 fractional bits: sub-pixel centres and axes
        cx = np.rint((sub[:, 0] - x0) * 4).astype(np.int64)
        cy = np.rint((sub[:, 1] - y0) * 4).astype(np.int64)
        ax = np.maximum(np.rint(sub[:, 2] * 4), 1).astype(np.int64)
        ay = np.maximum(np.rint(sub[:, 3] * 4), 1).astype(np.int64)
        ang = sub[:, 4].astype(np.float64)
        vals = values[sel]
        for i in range(len(sub)):
            cv2.ellipse(
                canvas,
                (int(cx[i]), int(cy[i])),
                (int(ax[i]), int(ay[i])),
                float(ang[i]),
                0.0,
                360.0,
                float(vals[i]),
                thickness=-1,
                lineType=cv2.LINE_AA if antialias else cv2.LINE_8,
                shift=2,
            )

    def _fibres(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Wavy collagen fibres: level sets of a smooth random phase field; (h, w) float32 in [0, 1]."""
        xs = np.arange(x0, x0 + w, dtype=np.float64)
        ys = np.arange(y0, y0 + h, dtype=np.float64)
        phi = np.zeros((h, w), dtype=np.float32)
        for kx, ky, c, amp in self.waves:
            a = kx * xs
            b = ky * ys + c
            # sin(a + b) = sin a cos b + cos a sin b, as two outer products
            phi += np.outer(amp * np.cos(b), np.sin(a)).astype(np.float32)
            phi += np.outer(amp * np.sin(b), np.cos(a)).astype(np.float32)
        f = 0.5 + 0.5 * np.sin(phi)
        return f * f

    def render(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Render the level-0 window with top-left ``(x0, y0)`` and size ``(w, h)``; (h, w, 3) uint8 RGB."""
        rng = np.random.default_rng([self.seed, 7919, x0, y0, w, h])
        alpha = _ramp(_upsample(self.tissue, self.cell, x0, y0, w, h))
        tum = _ramp(_upsample(self.tumor, self.cell, x0, y0, w, h))
        stain = _upsample(self.stain, self.cell, x0, y0, w, h)

        glands = np.zeros((h, w), dtype=np.uint8)  # 0 stroma, 1 epithelium, 2 lumen
        if len(self.glands):
            outer = self.glands
            inner = self.glands.copy()
            inner[:, 2] *= inner[:, 5]
            inner[:, 3] *= inner[:, 5]
            # categorical labels: no anti-aliasing
            self._draw_ellipses(outer, x0, y0, w, h, glands, np.ones(len(outer)), antialias=False)
            self._draw_ellipses(inner, x0, y0, w, h, glands, np.full(len(inner), 2.0), antialias=False)
        nuc = np.zeros((h, w), dtype=np.uint8)
        self._draw_ellipses(self.nuclei, x0, y0, w, h, nuc, np.clip(self.nuclei[:, 5] * 120.0, 0, 255))

        fib = self._fibres(x0, y0, w, h)
        normal = 1.0 - tum
        eos = 0.28 + 0.2 * fib  # soft fibre contrast: collagen bands, not contour lines
        hem = np.full((h, w), 0.05, dtype=np.float32)
        epi = glands == 1
        lumen = glands == 2
        eos[epi] = 0.42
        hem[epi] = 0.17
        eos[lumen] = 0.05
        hem[lumen] = 0.01
        eos = eos * normal + 0.36 * tum
        hem = hem * normal + 0.30 * tum
        # chromatin texture: grainy nuclei
        grain = rng.random((h, w), dtype=np.float32)
        hem += (nuc.astype(np.float32) / 120.0) * (0.75 + 0.5 * grain)
        eos *= 0.9 + 0.2 * rng.random((h, w), dtype=np.float32)
        weight = alpha * stain
        hem *= weight * self.stain_scale[0]
        eos *= weight * self.stain_scale[1]
        od = hem[..., None] * STAIN_H + eos[..., None] * STAIN_E  # (h, w, 3)
        rgb = BACKGROUND_LEVEL * np.exp(-od)
        rgb += rng.normal(0.0, 1.5, size=(h, w, 1)).astype(np.float32)
        return np.clip(rgb, 0, 255).astype(np.uint8)


# -- layout generation ------------------------------------------------------------------------
def _tissue_field(
    rng: np.random.Generator, gh: int, gw: int, n_pieces: int, holes: bool
) -> tuple[np.ndarray, np.ndarray]:
    """Hard (gh, gw) bool tissue with blobby outlines, and its distance-to-edge (cells)."""
    yy, xx = np.mgrid[0:gh, 0:gw].astype(np.float32)
    small = min(gh, gw)
    env = np.full((gh, gw), -np.inf, dtype=np.float32)
    for _ in range(n_pieces):
        cx = rng.uniform(0.38, 0.62) * gw if n_pieces == 1 else rng.uniform(0.25, 0.75) * gw
        cy = rng.uniform(0.38, 0.62) * gh if n_pieces == 1 else rng.uniform(0.25, 0.75) * gh
        shrink = 1.0 / math.sqrt(n_pieces)
        rx = rng.uniform(0.34, 0.46) * gw * shrink
        ry = rng.uniform(0.34, 0.46) * gh * shrink
        env = np.maximum(env, 1.0 - ((xx - cx) / rx) ** 2 - ((yy - cy) / ry) ** 2)
    noise = _smooth_noise(rng, (gh, gw), max(1.5, 0.06 * small))
    tissue = env + 0.35 * noise > 0
    margin = max(2, round(0.04 * small))
    tissue[:margin] = tissue[-margin:] = False
    tissue[:, :margin] = tissue[:, -margin:] = False
    if not tissue.any():  # degenerate tiny canvas: a central ellipse
        tissue = (((xx - gw / 2) / (gw / 3)) ** 2 + ((yy - gh / 2) / (gh / 3)) ** 2) < 1
    dist = ndimage.distance_transform_edt(tissue).astype(np.float32)
    if holes:
        hn = _smooth_noise(rng, (gh, gw), 1.5)
        tissue &= ~((hn > 2.7) & (dist > 5))
        dist = ndimage.distance_transform_edt(tissue).astype(np.float32)
    return tissue, dist


def _tumor_field(
    rng: np.random.Generator, tissue: np.ndarray, dist: np.ndarray, fraction: float, pattern: str
) -> np.ndarray:
    """Hard tumour mask inside ``tissue`` covering ``fraction`` of it, arranged by ``pattern``."""
    gh, gw = tissue.shape
    small = min(gh, gw)
    if fraction <= 0 or not tissue.any():
        return np.zeros_like(tissue)
    if pattern == "scattered":
        score = _smooth_noise(rng, (gh, gw), max(1.5, 0.045 * small))
    elif pattern == "clustered":
        score = _smooth_noise(rng, (gh, gw), max(3.0, 0.2 * small))
    elif pattern == "border":
        score = -dist + 1.5 * _smooth_noise(rng, (gh, gw), 2.0)
    elif pattern == "center":
        score = dist + 1.5 * _smooth_noise(rng, (gh, gw), 2.0)
    else:
        raise ValueError(f"unknown tumour pattern {pattern!r}; choose one of {', '.join(TUMOR_PATTERNS)}")
    if fraction >= 1:
        return tissue.copy()
    thr = np.quantile(score[tissue], 1.0 - fraction)
    return tissue & (score > thr)


def _sample_in_cells(rng: np.random.Generator, rate: np.ndarray, cell: float) -> np.ndarray:
    """Poisson points with per-cell expected count ``rate`` (gh, gw); returns (M, 2) level-0 x, y."""
    counts = rng.poisson(np.clip(rate, 0, None))
    iy, ix = np.nonzero(counts)
    reps = counts[iy, ix]
    iy = np.repeat(iy, reps)
    ix = np.repeat(ix, reps)
    u = rng.random((len(ix), 2))
    return np.stack([(ix + u[:, 0]) * cell, (iy + u[:, 1]) * cell], axis=1)


def _nuclei_table(
    xy: np.ndarray, a: np.ndarray, b: np.ndarray, angle: np.ndarray, dark: np.ndarray
) -> np.ndarray:
    return np.column_stack([xy[:, 0], xy[:, 1], a, b, angle, dark]).astype(np.float32)


def make_layout(
    width: int,
    height: int,
    *,
    mpp: float = 0.5,
    seed: int = 0,
    tumor_fraction: float = 0.3,
    tumor_pattern: str = "scattered",
    n_pieces: int | None = None,
    holes: bool = True,
) -> SlideLayout:
    """Draw a random slide layout; everything is determined by the arguments (``seed`` included)."""
    if width < 16 or height < 16:
        raise ValueError(f"synthetic slide must be at least 16x16 px, got {width}x{height}")
    if mpp <= 0 or not math.isfinite(mpp):
        raise ValueError(f"mpp must be a positive number, got {mpp}")
    if not 0.0 <= tumor_fraction <= 1.0:
        raise ValueError(f"tumor_fraction must be in [0, 1], got {tumor_fraction}")
    if tumor_pattern not in TUMOR_PATTERNS:
        raise ValueError(
            f"unknown tumour pattern {tumor_pattern!r}; choose one of {', '.join(TUMOR_PATTERNS)}"
        )
    rng = np.random.default_rng(seed)
    um = 1.0 / mpp  # level-0 px per micron
    cell = CELL_UM * um
    gw, gh = max(4, math.ceil(width / cell)), max(4, math.ceil(height / cell))
    n_pieces = int(rng.integers(1, 3)) if n_pieces is None else int(n_pieces)
    tissue, dist = _tissue_field(rng, gh, gw, max(1, n_pieces), holes)
    tumor = _tumor_field(rng, tissue, dist, tumor_fraction, tumor_pattern)
    realised = float(tumor.sum() / max(1, tissue.sum()))

    # glands on a jittered ~100 um grid, only deep inside normal tissue
    spacing = 100.0 * um
    gx, gy = np.meshgrid(np.arange(spacing / 2, width, spacing), np.arange(spacing / 2, height, spacing))
    centres = np.stack([gx.ravel(), gy.ravel()], axis=1) + rng.uniform(-0.25, 0.25, (gx.size, 2)) * spacing
    outer_a = rng.uniform(22.0, 38.0, len(centres)) * um
    outer_b = outer_a * rng.uniform(0.55, 1.0, len(centres))
    ci = np.clip((centres[:, 0] / cell).astype(int), 0, gw - 1)
    cj = np.clip((centres[:, 1] / cell).astype(int), 0, gh - 1)
    keep = (
        tissue[cj, ci]
        & ~tumor[cj, ci]
        & (dist[cj, ci] * cell > outer_a + 12 * um)
        & (rng.random(len(centres)) < 0.7)
    )
    # glands must also keep clear of tumour
    tumor_dist = ndimage.distance_transform_edt(~tumor) if tumor.any() else np.full(tumor.shape, np.inf)
    keep &= tumor_dist[cj, ci] * cell > outer_a + 8 * um
    centres, outer_a, outer_b = centres[keep], outer_a[keep], outer_b[keep]
    g_angle = rng.uniform(0, 180, len(centres))
    thickness = 9.0 * um
    lumen_scale = np.clip((outer_b - thickness) / outer_b, 0.2, 0.9)
    glands = np.column_stack([centres, outer_a, outer_b, g_angle, lumen_scale]).astype(np.float32)

    # gland nuclei: a ring of small regular nuclei at the basal side
    ring_a = outer_a - 3.5 * um
    ring_b = outer_b - 3.5 * um
    per = np.maximum(6, np.rint(np.pi * (ring_a + ring_b) / (6.5 * um))).astype(int)
    gid = np.repeat(np.arange(len(glands)), per)
    k = np.concatenate([np.arange(n) for n in per]) if len(per) else np.zeros(0)
    t = 2 * np.pi * (k + rng.uniform(-0.2, 0.2, len(k))) / np.repeat(per, per)
    th = np.deg2rad(g_angle[gid])
    px, py = ring_a[gid] * np.cos(t), ring_b[gid] * np.sin(t)
    gxy = np.stack(
        [
            centres[gid, 0] + px * np.cos(th) - py * np.sin(th),
            centres[gid, 1] + px * np.sin(th) + py * np.cos(th),
        ],
        axis=1,
    )
    g_nuc = _nuclei_table(
        gxy,
        np.full(len(gid), 3.4 * um),
        np.full(len(gid), 2.3 * um),
        np.rad2deg(np.arctan2(gxy[:, 1] - centres[gid, 1], gxy[:, 0] - centres[gid, 0])),
        rng.uniform(0.9, 1.1, len(gid)),
    )

    # coarse soft fields
    tissue_f = ndimage.gaussian_filter(tissue.astype(np.float32), 0.8)
    tumor_f = ndimage.gaussian_filter(tumor.astype(np.float32), 0.8)
    gland_cells = np.zeros((gh, gw), dtype=np.uint8)
    for cx, cy, a, b, ang, _ in glands:
        cv2.ellipse(
            gland_cells,
            (int(cx / cell), int(cy / cell)),
            (int(a / cell) + 1, int(b / cell) + 1),
            float(ang),
            0,
            360,
            1,
            -1,
        )
    normal_rate = tissue_f * (1.0 - tumor_f) * (1 - gland_cells)

    # stroma: spindle fibroblast nuclei and small round lymphocytes
    sxy = _sample_in_cells(rng, 0.07 * normal_rate, cell)
    n = len(sxy)
    s_a = rng.uniform(5.0, 7.0, n) * um
    s_nuc = _nuclei_table(
        sxy, s_a, s_a * rng.uniform(0.25, 0.35, n), rng.uniform(0, 180, n), rng.uniform(1.0, 1.2, n)
    )
    lxy = _sample_in_cells(rng, 0.02 * normal_rate, cell)
    n = len(lxy)
    l_r = rng.uniform(2.6, 3.2, n) * um
    l_nuc = _nuclei_table(
        lxy, l_r, l_r * rng.uniform(0.85, 1.0, n), rng.uniform(0, 180, n), rng.uniform(1.6, 1.9, n)
    )
    # tumour: dense, large, pleomorphic, hyperchromatic nuclei
    txy = _sample_in_cells(rng, 0.55 * tumor_f * tissue_f, cell)
    n = len(txy)
    t_a = rng.uniform(4.0, 8.0, n) * um
    t_nuc = _nuclei_table(
        txy, t_a, t_a * rng.uniform(0.55, 1.0, n), rng.uniform(0, 180, n), rng.uniform(1.3, 1.9, n)
    )
    nuclei = np.concatenate([s_nuc, l_nuc, g_nuc, t_nuc], axis=0)

    # collagen fibre phase field: a few long waves whose level sets are ~7 um apart
    n_waves = 5
    theta = rng.uniform(0, np.pi, n_waves)
    lam = rng.uniform(120.0, 400.0, n_waves) * um
    kmag = 2 * np.pi / lam
    amp = (2 * np.pi / (7.0 * um)) / np.sqrt(n_waves / 2.0) / kmag
    waves = np.column_stack(
        [kmag * np.cos(theta), kmag * np.sin(theta), rng.uniform(0, 2 * np.pi, n_waves), amp]
    )

    stain = (1.0 + 0.08 * _smooth_noise(rng, (gh, gw), max(2.0, 0.1 * min(gh, gw)))).astype(np.float32)
    stain_scale = rng.uniform(0.92, 1.08, 2).astype(np.float32)
    return SlideLayout(
        width=int(width),
        height=int(height),
        mpp=float(mpp),
        cell=float(cell),
        tissue=tissue_f.astype(np.float32),
        tumor=tumor_f.astype(np.float32),
        stain=stain,
        glands=glands,
        nuclei=nuclei,
        waves=waves,
        stain_scale=stain_scale,
        tumor_fraction=realised,
        seed=int(seed),
    )
