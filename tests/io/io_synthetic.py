"""Builders of synthetic tiled TIFF pyramids for the io tests (tifffile-written, readable by OpenSlide)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile


def tissue_like(height: int, width: int, seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8 smooth pink/purple blobs on white: JPEG-friendly, non-trivial content."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    field = np.zeros((height, width), np.float32)
    for _ in range(12):
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        r = rng.uniform(0.05, 0.25) * max(height, width)
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    field = np.clip(field, 0, 1)
    stripes = 0.5 + 0.5 * np.sin(xx / 7.0 + yy / 11.0)
    rgb = np.stack(
        [255 - 40 * field, 255 - 120 * field * (0.7 + 0.3 * stripes), 255 - 60 * field],
        axis=-1,
    )
    return np.clip(rgb, 0, 255).astype(np.uint8)


def write_pyramid(
    path: Path,
    image: np.ndarray,
    n_levels: int = 3,
    mpp: float | None = 0.5,
    compression: str | None = "jpeg",
    photometric: str = "rgb",
    subifds: bool = False,
    tile: int = 256,
) -> Path:
    """Write ``image`` as a tiled pyramid: level k is a 2**k decimation, stored as reduced pages."""
    kw: dict = {"tile": (tile, tile), "compression": compression, "photometric": photometric}
    if mpp is not None:
        kw["resolution"] = (1e4 / mpp, 1e4 / mpp)
        kw["resolutionunit"] = "CENTIMETER"
    levels = [image[:: 2**k, :: 2**k] for k in range(n_levels)]
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        if subifds:
            tw.write(levels[0], subifds=n_levels - 1, **kw)
        else:
            tw.write(levels[0], **kw)
        for lv in levels[1:]:
            tw.write(lv, subfiletype=1, **kw)
    return path
