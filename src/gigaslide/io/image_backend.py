"""Plain-image backend: PNG, JPEG, BMP, WebP and non-pyramidal TIFF as one-level slides.

TIFF files are read with tifffile (memory-mapped when stored uncompressed), everything
else with Pillow. The pixels are decoded on the first read, once per process, and kept
in memory; images whose decoded size exceeds :data:`MAX_DECODED_BYTES` are refused.
There is rarely usable mpp metadata in such files: pass ``mpp`` explicitly.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.base import Slide, SlideReadError, composite_on_white
from gigaslide.io.metadata import mpp_from_resolution, mpp_from_tiff_page

MAX_DECODED_BYTES = 4 * 1024**3  # refuse to hold more than 4 GiB of decoded pixels in memory
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_PIL_FORMATS = {"PNG", "JPEG", "BMP", "WEBP", "GIF", "PPM", "TGA"}


@contextlib.contextmanager
def _pil_pixel_limit() -> Iterator[None]:
    """Disable Pillow's decompression-bomb check: the header size is checked against MAX_DECODED_BYTES."""
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as fh:
        return fh.read(4) in _TIFF_MAGIC


class ImageSlide(Slide):
    """A single-level slide backed by an ordinary image file."""

    backend = "image"
    requires = ("PIL", "tifffile")
    install_hint = "pip install pillow tifffile"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        self._pixels: np.ndarray | None = None
        self._pid: int | None = None
        self.properties: dict[str, str] = {}
        if _is_tiff(self.path):
            self._kind = "tiff"
            width, height, channels = self._inspect_tiff()
        else:
            self._kind = "pil"
            width, height, channels = self._inspect_pil()
        if width * height * channels > MAX_DECODED_BYTES:
            raise SlideReadError(
                f"{self.path}: {width}x{height} px is too large to load as a plain image "
                f"(> {MAX_DECODED_BYTES // 1024**3} GiB decoded); convert it to a tiled pyramidal TIFF"
            )
        self.level_dimensions = ((width, height),)
        self.level_downsamples = (1.0,)

    # -- header inspection ----------------------------------------------------------
    def _inspect_tiff(self) -> tuple[int, int, int]:
        import tifffile

        try:
            with tifffile.TiffFile(self.path) as tf:
                series = tf.series[0]
                page = series.levels[0].keyframe
                axes, shape, dtype = series.axes, series.shape, series.dtype
                self.metadata_mpp = mpp_from_tiff_page(page)
                self.properties = {"tiff.Compression": str(page.compression.name), "tiff.axes": axes}
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: tifffile cannot parse it ({type(exc).__name__}: {exc})"
            ) from exc
        if dtype != np.uint8:
            raise SlideReadError(f"{self.path}: {dtype} pixels are not supported; convert to 8-bit RGB")
        if axes not in ("YX", "YXS", "SYX"):
            raise SlideReadError(
                f"{self.path}: image axes {axes!r} {shape} are not a single 2-D RGB/grey plane"
            )
        channels = 1 if axes == "YX" else shape[axes.index("S")]
        if channels not in (1, 3, 4):
            raise SlideReadError(f"{self.path}: {channels} samples per pixel; expected grey, RGB or RGBA")
        self._axes = axes
        return int(shape[axes.index("X")]), int(shape[axes.index("Y")]), channels

    def _inspect_pil(self) -> tuple[int, int, int]:
        from PIL import Image, UnidentifiedImageError

        try:
            with _pil_pixel_limit(), Image.open(self.path) as img:
                fmt, mode, (width, height) = img.format, img.mode, img.size
                dpi = img.info.get("dpi")
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError) as exc:
            raise SlideReadError(f"{self.path}: not a readable image ({type(exc).__name__}: {exc})") from exc
        if fmt not in _PIL_FORMATS:
            raise SlideReadError(f"{self.path}: {fmt} images are not handled by the image backend")
        if mode in ("I", "I;16", "I;16B", "F"):
            raise SlideReadError(
                f"{self.path}: {mode} (high bit-depth) images are not supported; convert to 8-bit"
            )
        if dpi:
            self.metadata_mpp = mpp_from_resolution(dpi[0], dpi[1], "inch")
        self.properties = {"image.format": str(fmt), "image.mode": str(mode)}
        return int(width), int(height), 4

    # -- pixels ---------------------------------------------------------------------
    def _load(self) -> np.ndarray:
        if self._pixels is not None and self._pid == os.getpid():
            return self._pixels
        try:
            pixels = self._load_tiff() if self._kind == "tiff" else self._load_pil()
        except SlideReadError:
            raise
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: decoding the image failed ({type(exc).__name__}: {exc})"
            ) from exc
        self._pixels, self._pid = pixels, os.getpid()
        return pixels

    def _load_tiff(self) -> np.ndarray:
        import tifffile

        with tifffile.TiffFile(self.path) as tf:
            page = tf.series[0].levels[0].keyframe
            memmappable = bool(page.is_memmappable) and len(tf.series[0].pages) == 1
        arr = tifffile.memmap(self.path, mode="r") if memmappable else tifffile.imread(self.path, series=0)
        if self._axes == "SYX":
            arr = np.moveaxis(arr, 0, -1)
        return arr

    def _load_pil(self) -> np.ndarray:
        from PIL import Image

        with _pil_pixel_limit(), Image.open(self.path) as img:
            if img.mode not in ("RGB", "RGBA", "L"):
                img = img.convert("RGBA")
            return np.asarray(img)

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        crop = self._load()[y : y + height, x : x + width]
        if crop.ndim == 3 and crop.shape[2] == 1:
            crop = crop[..., 0]
        if crop.ndim == 2 or crop.shape[2] == 4:
            return composite_on_white(np.asarray(crop))
        return np.array(crop, dtype=np.uint8, copy=True)

    def close(self) -> None:
        self._pixels = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_pixels"] = None
        return state
