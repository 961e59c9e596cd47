"""Write a synthetic slide as a pyramidal, tiled, JPEG-compressed BigTIFF that OpenSlide opens.

Layout of the file (OpenSlide's generic-tiff format):
  * page 0: level 0, tiled ``tile_size`` x ``tile_size``, JPEG, RGB;
  * pages 1..n-1: reduced-resolution levels (NewSubfileType = 1), each a 2x downsample of the previous;
  * every page carries X/YResolution in pixels per centimetre (ResolutionUnit = CENTIMETER), from
    which OpenSlide reports ``openslide.mpp-x``/``mpp-y``; page 0's ImageDescription also states the mpp.

Level 0 is rendered in horizontal bands (bounded memory); the lower levels are built from the
bands by exact 2x2 averaging as they go.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import tifffile

from gigaslide.synth.tissue_content import BACKGROUND_LEVEL, SlideLayout, make_layout
from gigaslide.utils.atomic import atomic_path

RENDER_BLOCK = 2048  # max width of one rendered block (bounds float32 working memory)
MIN_LEVEL_SIDE = 512  # default pyramid stops before the longest side drops below this


def default_n_levels(width: int, height: int, min_side: int = MIN_LEVEL_SIDE) -> int:
    """Number of power-of-2 levels such that the coarsest level's longest side stays >= ``min_side``."""
    n = 1
    while max(width, height) >> n >= min_side and min(width, height) >> n >= 1:
        n += 1
    return n


def mpp_description(mpp: float, width: int, height: int, extra: str = "") -> str:
    """ImageDescription of level 0 (plain text; deliberately not an Aperio header)."""
    text = f"gigaslide synthetic H&E slide; width={width}; height={height}; mpp={mpp:.6f}; units=um/px"
    return f"{text}; {extra}" if extra else text


def _render_band(layout: SlideLayout, y0: int, h: int) -> np.ndarray:
    band = np.empty((h, layout.width, 3), dtype=np.uint8)
    for x0 in range(0, layout.width, RENDER_BLOCK):
        w = min(RENDER_BLOCK, layout.width - x0)
        band[:, x0 : x0 + w] = layout.render(x0, y0, w, h)
    return band


def _halve(img: np.ndarray) -> np.ndarray:
    """Exact 2x2 box average (odd trailing row/column dropped)."""
    h2, w2 = img.shape[0] // 2, img.shape[1] // 2
    return cv2.resize(img[: 2 * h2, : 2 * w2], (w2, h2), interpolation=cv2.INTER_AREA)


def write_layout_tiff(
    layout: SlideLayout,
    path: str | Path,
    *,
    tile_size: int = 256,
    n_levels: int | None = None,
    jpeg_quality: int = 90,
    description_extra: str = "",
) -> Path:
    """Render ``layout`` into a pyramidal tiled JPEG BigTIFF at ``path`` (written atomically)."""
    width, height, mpp = layout.width, layout.height, layout.mpp
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f"tile_size must be a positive multiple of 16 (TIFF rule), got {tile_size}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    n_levels = default_n_levels(width, height) if n_levels is None else int(n_levels)
    if n_levels < 1 or min(width, height) >> (n_levels - 1) < 1:
        raise ValueError(
            f"n_levels={n_levels} is impossible for a {width}x{height} slide: "
            f"at most {int(math.log2(min(width, height))) + 1} levels"
        )
    dims = [(width >> k, height >> k) for k in range(n_levels)]
    lower = [np.empty((h, w, 3), dtype=np.uint8) for w, h in dims[1:]]
    # band height: several tile rows, divisible by 2**(n_levels-1) so the bands halve exactly
    step = tile_size * (2 ** (n_levels - 1)) // math.gcd(tile_size, 2 ** (n_levels - 1))
    band_h = step * max(1, 1024 // step)
    ts = tile_size

    def level0_tiles() -> Iterator[np.ndarray]:
        for y0 in range(0, height, band_h):
            bh = min(band_h, height - y0)
            band = _render_band(layout, y0, bh)
            cur = band
            for k in range(1, n_levels):
                cur = _halve(cur)
                r = y0 >> k
                lower[k - 1][r : r + cur.shape[0]] = cur[:, : dims[k][0]]
            ph, pw = -(-bh // ts) * ts, -(-width // ts) * ts
            if (ph, pw) != band.shape[:2]:
                padded = np.full((ph, pw, 3), int(BACKGROUND_LEVEL), dtype=np.uint8)
                padded[:bh, :width] = band
                band = padded
            for ty in range(0, ph, ts):
                for tx in range(0, pw, ts):
                    yield band[ty : ty + ts, tx : tx + ts]

    common = {
        "photometric": "rgb",
        "compression": "jpeg",
        "compressionargs": {"level": int(jpeg_quality)},
        "tile": (ts, ts),
        "resolutionunit": "CENTIMETER",
        "metadata": None,
        "software": "gigaslide",
    }
    path = Path(path)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tif:
        tif.write(
            level0_tiles(),
            shape=(height, width, 3),
            dtype=np.uint8,
            resolution=(1e4 / mpp, 1e4 / mpp),
            description=mpp_description(mpp, width, height, description_extra),
            subfiletype=0,
            **common,
        )
        for k, img in enumerate(lower, start=1):
            level_mpp = mpp * (2**k)
            tif.write(img, resolution=(1e4 / level_mpp, 1e4 / level_mpp), subfiletype=1, **common)
    return path


def write_synthetic_slide(
    path: str | Path,
    width: int = 4096,
    height: int = 3072,
    mpp: float = 0.5,
    seed: int = 0,
    tumor_fraction: float = 0.3,
    tile_size: int = 256,
    n_levels: int | None = None,
    *,
    tumor_pattern: str = "scattered",
    n_pieces: int | None = None,
    holes: bool = True,
    jpeg_quality: int = 90,
) -> Path:
    """Write one synthetic H&E slide and return its path.

    Args:
        path: output ``.tiff`` path (parent folders are created; the write is atomic).
        width, height: level-0 size in pixels.
        mpp: microns per level-0 pixel, stored in the TIFF resolution tags and description.
        seed: fixes everything: same seed and arguments give the same pixels.
        tumor_fraction: fraction of the tissue area that is tumour (0 = normal tissue only).
        tile_size: TIFF tile side (multiple of 16).
        n_levels: pyramid levels (each a 2x downsample); default: down to a ~512 px longest side.
        tumor_pattern: spatial arrangement of the tumour: "scattered", "clustered", "border", "center".
        n_pieces: number of tissue fragments (default: 1 or 2, from the seed).
        holes: punch a few small holes into the tissue.
        jpeg_quality: JPEG quality 1..100.
    """
    layout = make_layout(
        width,
        height,
        mpp=mpp,
        seed=seed,
        tumor_fraction=tumor_fraction,
        tumor_pattern=tumor_pattern,
        n_pieces=n_pieces,
        holes=holes,
    )
    extra = f"seed={seed}; tumor_fraction={layout.tumor_fraction:.4f}; tumor_pattern={tumor_pattern}"
    return write_layout_tiff(
        layout,
        path,
        tile_size=tile_size,
        n_levels=n_levels,
        jpeg_quality=jpeg_quality,
        description_extra=extra,
    )
