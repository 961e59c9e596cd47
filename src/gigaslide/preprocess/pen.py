"""Pen ink and dark-artefact masks for tissue detection.

Marker ink has hues that haematoxylin and eosin never produce: green and cyan ink (70-190 deg),
blue ink (190-238 deg; haematoxylin is violet-purple, >= 245 deg), and a saturated pure red
(eosin is pink-magenta, ~330 deg). Dark red and purple ink (often out of focus: a smooth
blur) share eosin's and haematoxylin's hues, so it is told apart by being dark AND deeply
saturated over a large area: eosin-rich tissue as saturated is bright (red cells, dense
eosin: value >= 0.75), tissue as dark (epidermis, dense nuclei) is less saturated (<= 0.55),
and the few tissue pixels that are both do not form a marker-sized component. Black ink, scanner borders and dark slide edges are caught by
brightness instead: nothing darker than ``dark_value`` is tissue.

All rules work on OpenCV HSV (H in 0..180 = degrees / 2, S and V in 0..255).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np


@dataclass
class PenRules:
    """Thresholds of the ink rules (hues in degrees, saturation/value in 0..1).

    Attributes:
        green_hue: hue range of green/cyan ink.
        green_min_sat: minimum saturation of green/cyan ink.
        blue_hue: hue range of blue ink (kept below haematoxylin's violet).
        blue_min_sat: minimum saturation of blue ink.
        red_hue: hue range of red ink, wrapping through 0 (start > end means wrap).
        red_min_sat: minimum saturation of red ink (high: eosin and red cells are paler).
        min_value: ink darker than this is left to the dark rule.
        dark_ink_hue: hue range of dark red/purple ink (wrapping through 0).
        dark_ink_min_sat: minimum saturation of dark red/purple ink.
        dark_ink_max_value: maximum value (brightness) of dark red/purple ink.
        dark_ink_min_area_um2: dark red/purple components smaller than this are tissue, not ink.
        min_area_um2: ink components smaller than this are ignored (stain noise, not strokes).
        dilate_um: ink masks are grown by this much to swallow anti-aliased stroke edges.
    """

    green_hue: tuple[float, float] = (70.0, 190.0)
    green_min_sat: float = 0.2
    blue_hue: tuple[float, float] = (190.0, 238.0)
    blue_min_sat: float = 0.3
    red_hue: tuple[float, float] = (345.0, 12.0)
    red_min_sat: float = 0.8
    min_value: float = 0.15
    dark_ink_hue: tuple[float, float] = (270.0, 20.0)
    dark_ink_min_sat: float = 0.6
    dark_ink_max_value: float = 0.65
    dark_ink_min_area_um2: float = 20_000.0
    min_area_um2: float = 2000.0
    dilate_um: float = 20.0


def _hue_in(h: np.ndarray, lo_deg: float, hi_deg: float) -> np.ndarray:
    lo, hi = lo_deg / 2.0, hi_deg / 2.0  # OpenCV hue units
    if lo <= hi:
        return (h >= lo) & (h <= hi)
    return (h >= lo) | (h <= hi)


def drop_small_components(mask: np.ndarray, min_px: float) -> np.ndarray:
    """(H, W) bool ``mask`` without its 8-connected components smaller than ``min_px`` pixels."""
    if min_px <= 1 or not mask.any():
        return mask
    _, labels, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    keep = stats[:, cv2.CC_STAT_AREA] >= min_px
    keep[0] = False
    return keep[labels]


def disk(radius_px: float) -> np.ndarray:
    """Elliptical structuring element of the given radius (at least 3x3)."""
    r = max(1, round(radius_px))
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * r + 1, 2 * r + 1))


def pen_mask(hsv: np.ndarray, rules: PenRules, mpp: float) -> np.ndarray:
    """(H, W) bool: pixels covered by green, cyan, blue, red or dark red/purple marker ink.

    Ink is grown by ``dilate_um`` to swallow the stroke edges.

    ``hsv`` is an OpenCV HSV image (uint8) whose pixels are ``mpp`` microns wide.
    """
    h = hsv[..., 0].astype(np.float32)
    s = hsv[..., 1].astype(np.float32) / 255.0
    v = hsv[..., 2].astype(np.float32) / 255.0
    bright = v >= rules.min_value
    ink = (
        (_hue_in(h, *rules.green_hue) & (s >= rules.green_min_sat))
        | (_hue_in(h, *rules.blue_hue) & (s >= rules.blue_min_sat))
        | (_hue_in(h, *rules.red_hue) & (s >= rules.red_min_sat))
    ) & bright
    ink = drop_small_components(ink, rules.min_area_um2 / (mpp * mpp))
    dark_ink = (
        _hue_in(h, *rules.dark_ink_hue)
        & (s >= rules.dark_ink_min_sat)
        & (v <= rules.dark_ink_max_value)
        & bright
    )
    ink |= drop_small_components(dark_ink, rules.dark_ink_min_area_um2 / (mpp * mpp))
    if ink.any() and rules.dilate_um > 0:
        ink = cv2.dilate(ink.astype(np.uint8), disk(rules.dilate_um / mpp)).astype(bool)
    return ink


def dark_mask(hsv: np.ndarray, max_value: float, dilate_px: float = 1.0) -> np.ndarray:
    """(H, W) bool: black ink, scanner borders and dark edges (value below ``max_value`` in 0..1)."""
    dark = hsv[..., 2] < max_value * 255.0
    if dark.any() and dilate_px > 0:
        dark = cv2.dilate(dark.astype(np.uint8), disk(dilate_px)).astype(bool)
    return dark
