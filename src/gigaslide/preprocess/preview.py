"""Quality-control preview: slide thumbnail, tissue outline (green) and tile grid (blue) in one PNG."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
from PIL import Image

from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.preprocess.tissue import TissueMask
from gigaslide.utils.atomic import atomic_path

OUTLINE_RGB = (0, 200, 0)
GRID_RGB = (40, 80, 255)
TITLE_HEIGHT = 28


def _ascii(text: str) -> str:
    """OpenCV's Hershey fonts draw ASCII only."""
    return text.encode("ascii", "replace").decode("ascii")


def preview_title(slide_name: str, n_tiles: int, spec: TileSpec) -> str:
    name = f"{slide_name}: " if slide_name else ""
    return _ascii(f"{name}{n_tiles} tiles, {spec.tile_size} px at {spec.target_mpp:g} um/px")


def preview_scale(size: tuple[int, int], max_size: int | None, min_size: int | None) -> float:
    """Factor applied to a thumbnail of ``size=(w, h)`` so its longest side fits ``[min_size, max_size]``."""
    longest = max(size)
    if max_size is not None and longest > max_size:
        return max_size / longest
    if min_size is not None and 0 < longest < min_size:
        return min_size / longest
    return 1.0


def render_preview(
    tissue: TissueMask,
    coords: np.ndarray,
    spec: TileSpec,
    out_path: str | Path,
    slide_name: str = "",
    max_size: int | None = 2048,
    min_size: int | None = 768,
) -> Path:
    """Draw the thumbnail with the tissue outline and one rectangle per tile; write a PNG atomically.

    The image is the tissue thumbnail, resized so its longest side lies in ``[min_size, max_size]``
    (see :func:`preview_scale`), with a ``TITLE_HEIGHT`` px title bar on top:
    (round(thumb_h * scale) + TITLE_HEIGHT, round(thumb_w * scale), 3).

    Args:
        tissue: result of tissue detection (its thumbnail, outline and downsample are used).
        coords: (N, 2) level-0 top-left corners of the tiles.
        spec: tile geometry (``level0_size`` gives each rectangle's side).
        out_path: PNG to write.
        slide_name: shown in the title.
        max_size: cap on the longest side of the drawn thumbnail; None = no cap.
        min_size: small thumbnails are enlarged to this longest side; None = keep.
    """
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    img = np.ascontiguousarray(tissue.thumbnail[..., :3], dtype=np.uint8).copy()
    h, w = img.shape[:2]
    scale = preview_scale((w, h), max_size, min_size)
    if scale != 1.0:
        w, h = max(1, round(w * scale)), max(1, round(h * scale))
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
    # level-0 px -> preview px
    fx = scale / tissue.downsample[0]
    fy = scale / tissue.downsample[1]

    # tile grid first, outline on top
    if len(coords):
        x0 = np.floor(coords[:, 0] * fx).astype(np.int64)
        y0 = np.floor(coords[:, 1] * fy).astype(np.int64)
        x1 = np.ceil((coords[:, 0] + spec.level0_size) * fx).astype(np.int64) - 1
        y1 = np.ceil((coords[:, 1] + spec.level0_size) * fy).astype(np.int64) - 1
        for a, b, c, d in zip(x0.tolist(), y0.tolist(), x1.tolist(), y1.tolist()):
            cv2.rectangle(img, (a, b), (max(a, c), max(b, d)), GRID_RGB, 1, lineType=cv2.LINE_8)
    mask = tissue.mask.astype(np.uint8)
    if mask.shape[:2] != (h, w):
        mask = cv2.resize(mask, (w, h), interpolation=cv2.INTER_NEAREST)
    contours, _ = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    cv2.drawContours(
        img, contours, -1, OUTLINE_RGB, thickness=max(1, round(max(h, w) / 700)), lineType=cv2.LINE_8
    )

    title = np.full((TITLE_HEIGHT, w, 3), 255, dtype=np.uint8)
    text = preview_title(slide_name, len(coords), spec)
    font_scale = 0.5
    (tw, _), _ = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
    if tw > w - 8:
        font_scale *= max(0.2, (w - 8) / tw)
    cv2.putText(
        title, text, (4, TITLE_HEIGHT - 9), cv2.FONT_HERSHEY_SIMPLEX, font_scale, (0, 0, 0), 1, cv2.LINE_AA
    )
    out = np.concatenate([title, img], axis=0)

    out_path = Path(out_path)
    with atomic_path(out_path) as tmp:
        Image.fromarray(out).save(tmp, format="PNG")
    return out_path
