"""The `Slide` contract every reader backend implements, and the reading errors.

All coordinates given to :meth:`Slide.read_region` are level-0 pixels for the
location and pixels of the requested level for the size, as in OpenSlide. Reads
that fall partly or wholly outside the slide are padded with white background.

Pixel semantics, identical in every backend: a read at ``level`` returns that level's
STORED pixels, starting at ``(floor(x / ds), floor(y / ds))`` with ``ds`` the level's
downsample. Nothing is interpolated, so a tile does not depend on the backend that read it.
(OpenSlide itself resamples the sub-pixel remainder of ``x / ds`` at levels whose downsample
is not an integer, e.g. Aperio's 2.0005; the ``openslide`` backend reads the stored pixels
there instead, see :mod:`gigaslide.io.openslide_backend`.) The top-left of a level-L read is
thus off by less than one level-L pixel from ``x``: at most ``ds`` level-0 pixels.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

BACKGROUND = 255  # value used to pad reads outside the slide and to composite alpha
THUMBNAIL_READ_PIXELS = 64_000_000  # thumbnail() reads larger levels in bands of at most this many pixels


class SlideReadError(RuntimeError):
    """A slide file could not be opened or read. The message names the file and the reason."""


class MissingMPPError(ValueError):
    """A slide has no microns-per-pixel metadata and none was given."""

    def __init__(self, path: str | Path) -> None:
        super().__init__(
            f"{path}: the slide has no microns-per-pixel (mpp) metadata, so tiles cannot be read at a "
            "physical resolution. Pass the slide's mpp explicitly: `--slide-mpp 0.25` on the command line, "
            "an `mpp` column in the input CSV, or `open_slide(path, mpp=0.25)` in Python."
        )
        self.path = Path(path)


class Slide(ABC):
    """A multi-resolution whole-slide image opened by one backend.

    Subclasses fill the geometry attributes in ``__init__`` and implement
    :meth:`_read` for reads that lie inside one level.
    """

    backend: str = "base"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        self.path = Path(path)
        self._mpp_override = float(mpp) if mpp is not None else None
        self.level_dimensions: tuple[tuple[int, int], ...] = ()
        self.level_downsamples: tuple[float, ...] = ()
        self.metadata_mpp: float | None = None
        self.objective_power: float | None = None

    # -- geometry -----------------------------------------------------------------
    @property
    def level_count(self) -> int:
        return len(self.level_dimensions)

    @property
    def dimensions(self) -> tuple[int, int]:
        """(width, height) of level 0."""
        return self.level_dimensions[0]

    @property
    def mpp(self) -> float | None:
        """Microns per pixel at level 0: the value given by the user, else the metadata's, else None."""
        return self._mpp_override if self._mpp_override is not None else self.metadata_mpp

    def require_mpp(self) -> float:
        """Return the level-0 mpp or raise :class:`MissingMPPError` naming the file and the fix."""
        if self.mpp is None or not math.isfinite(self.mpp) or self.mpp <= 0:
            raise MissingMPPError(self.path)
        return float(self.mpp)

    def level_mpp(self, level: int) -> float:
        return self.require_mpp() * self.level_downsamples[level]

    def best_level_for(self, target_mpp: float, rtol: float = 0.01) -> int:
        """Coarsest level that is still at least as fine as ``target_mpp`` (within ``rtol``).

        Reading from that level and resizing down never upsamples; if even level 0 is
        coarser than the target, level 0 is returned.
        """
        base = self.require_mpp()
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if base * ds <= target_mpp * (1.0 + rtol) and ds >= self.level_downsamples[best]:
                best = level
        return best

    def best_level_for_downsample(self, downsample: float, rtol: float = 0.01) -> int:
        """Coarsest level whose downsample does not exceed ``downsample`` (within ``rtol``)."""
        best = 0
        for level, ds in enumerate(self.level_downsamples):
            if ds <= downsample * (1.0 + rtol) and ds >= self.level_downsamples[best]:
                best = level
        return best

    # -- reading ------------------------------------------------------------------
    @abstractmethod
    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """Read an in-bounds region. ``x, y`` are pixels *of ``level``*; returns (H, W, 3) uint8 RGB."""

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """Read ``size=(w, h)`` pixels of ``level`` whose top-left is ``location`` in level-0 pixels.

        Returns an (h, w, 3) uint8 RGB array; parts outside the slide are white.
        """
        if not 0 <= level < self.level_count:
            raise ValueError(f"{self.path}: level {level} does not exist (slide has {self.level_count})")
        w, h = int(size[0]), int(size[1])
        if w <= 0 or h <= 0:
            raise ValueError(f"read size must be positive, got {size}")
        ds = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        # top-left in this level's pixels
        lx = math.floor(location[0] / ds + 1e-9)
        ly = math.floor(location[1] / ds + 1e-9)
        x0, y0 = max(lx, 0), max(ly, 0)
        x1, y1 = min(lx + w, lw), min(ly + h, lh)
        if x0 == lx and y0 == ly and x1 - x0 == w and y1 - y0 == h:
            return self._read(lx, ly, level, w, h)
        out = np.full((h, w, 3), BACKGROUND, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - ly : y1 - ly, x0 - lx : x1 - lx] = self._read(x0, y0, level, x1 - x0, y1 - y0)
        return out

    def thumbnail(self, max_size: int) -> np.ndarray:
        """An RGB (H, W, 3) uint8 image of the whole slide whose longer side is ``max_size``."""
        from PIL import Image

        w0, h0 = self.dimensions
        scale = max(w0, h0) / float(max_size)
        level = self.best_level_for_downsample(scale)
        lw, lh = self.level_dimensions[level]
        tw, th = max(1, round(w0 / scale)), max(1, round(h0 / scale))
        if lw * lh <= THUMBNAIL_READ_PIXELS or (lw, lh) == (tw, th):
            region = self.read_region((0, 0), level, (lw, lh))
            if (lw, lh) == (tw, th):
                return region
            return np.asarray(Image.fromarray(region).resize((tw, th), Image.Resampling.BOX))
        # A large level (e.g. a single-level slide): never hold it whole; read bands of level rows
        # and box-filter each into its band of thumbnail rows.
        sy = lh / th  # level rows per thumbnail row
        band = max(1, int(THUMBNAIL_READ_PIXELS / (lw * sy)))
        out = np.empty((th, tw, 3), dtype=np.uint8)
        for r0 in range(0, th, band):
            r1 = min(th, r0 + band)
            y0, y1 = math.floor(r0 * sy), min(lh, math.ceil(r1 * sy))
            strip = self.read_region((0, round(y0 * self.level_downsamples[level])), level, (lw, y1 - y0))
            box = (0.0, r0 * sy - y0, float(lw), r1 * sy - y0)
            out[r0:r1] = np.asarray(
                Image.fromarray(strip).resize((tw, r1 - r0), Image.Resampling.BOX, box=box)
            )
        return out

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release file handles. Safe to call twice."""

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(path={str(self.path)!r}, backend={self.backend!r}, "
            f"dimensions={self.dimensions}, levels={self.level_count}, mpp={self.mpp})"
        )


def composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """Alpha-composite an (H, W, 4) uint8 image onto white; returns (H, W, 3) uint8."""
    if rgba.ndim == 2:
        return np.repeat(rgba[..., None], 3, axis=2)
    if rgba.shape[2] == 3:
        return rgba
    rgb = rgba[..., :3].astype(np.float32)
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    out = rgb * alpha + BACKGROUND * (1.0 - alpha)
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)
