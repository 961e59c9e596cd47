"""OpenSlide backend (openslide-python + the openslide-bin library): every vendor format OpenSlide reads.

Reading semantics (the same in every backend, see :mod:`gigaslide.io.base`): a read at a level
returns that level's STORED pixels, starting at ``floor(x / downsample)``. OpenSlide itself
returns stored pixels only when ``x / downsample`` is a whole number; at a level whose
downsample is not an integer (Aperio's 2.0005, 4.0003 ...) it resamples the sub-pixel remainder
(bilinear), so the same tile would differ from the other backends' by up to ~200 grey levels.
For such levels this backend decodes the stored tiles with gigaslide's TIFF tile reader (the
``tiff-direct`` code) when the file is a TIFF pyramid OpenSlide and that reader agree on; for a
format the TIFF reader cannot parse it falls back to OpenSlide's resampled read and says so in
a WARNING when the slide is opened.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.backend_utils import ProcessLocalHandle, level0_origin
from gigaslide.io.base import Slide, SlideReadError, composite_on_white
from gigaslide.io.metadata import mpp_from_properties, objective_from_properties

logger = logging.getLogger(__name__)
INTEGER_DOWNSAMPLE_TOL = 1e-9  # a level downsample this close to an integer maps level-0 ints exactly


def fractional_levels(downsamples: tuple[float, ...]) -> tuple[int, ...]:
    """Levels whose downsample is not a whole number (OpenSlide resamples reads there)."""
    return tuple(i for i, d in enumerate(downsamples) if abs(d - round(d)) > INTEGER_DOWNSAMPLE_TOL)


class OpenSlideSlide(ProcessLocalHandle, Slide):
    """A slide read through OpenSlide.

    The OpenSlide handle is reopened after ``fork`` (checked with ``os.getpid()``): libtiff
    seeks on a shared descriptor, so a handle inherited by DataLoader workers is not safe.
    Pickling drops the handle; the unpickled copy reopens on first read.
    """

    backend = "openslide"
    requires = ("openslide",)
    install_hint = "pip install openslide-python openslide-bin"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        handle = self._get_handle()
        self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.properties: dict[str, str] = dict(handle.properties)
        self.metadata_mpp = mpp_from_properties(self.properties, ("openslide.mpp-x", "openslide.mpp-y"))
        if self.metadata_mpp is None:
            self.metadata_mpp = mpp_from_properties(self.properties, ("aperio.MPP",))
        self.objective_power = objective_from_properties(
            self.properties, ("openslide.objective-power", "aperio.AppMag")
        )
        self.vendor = self.properties.get("openslide.vendor")
        self._stored: Slide | None = None  # stored-pixel reader for non-integer-downsample levels
        self._fractional = fractional_levels(self.level_downsamples)
        if self._fractional:
            self._stored = self._stored_pixel_reader()

    def _stored_pixel_reader(self) -> Slide | None:
        """gigaslide's TIFF tile reader on the same file, when it sees the same pyramid; else None."""
        from gigaslide.io.tiff_direct import TiffDirectSlide

        reason = ""
        try:
            reader = TiffDirectSlide(self.path)
        except (SlideReadError, ImportError) as exc:
            reader, reason = None, f"its TIFF tiles cannot be read directly ({exc})"
        if reader is not None and reader.level_dimensions != self.level_dimensions:
            reader.close()
            reader, reason = None, "the TIFF pyramid differs from the levels OpenSlide reports"
        if reader is None:
            levels = ", ".join(f"{i} ({self.level_downsamples[i]:.5g})" for i in self._fractional)
            logger.warning(
                "%s: levels %s have a non-integer downsample and %s: OpenSlide's reads there resample "
                "the sub-pixel offset, so tiles read at those levels may differ from other backends'",
                self.path,
                levels,
                reason,
            )
        return reader

    def close(self) -> None:
        if self._stored is not None:
            self._stored.close()
        super().close()

    def _open_handle(self) -> Any:
        import openslide

        try:
            handle = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError as exc:
            raise SlideReadError(f"{self.path}: OpenSlide does not recognise the format ({exc})") from exc
        except openslide.OpenSlideError as exc:
            raise SlideReadError(f"{self.path}: OpenSlide failed to open it ({exc})") from exc
        return handle

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        import openslide

        if self._stored is not None and level in self._fractional:
            return self._stored._read(x, y, level, width, height)
        ds = self.level_downsamples[level]
        loc = (level0_origin(x, ds), level0_origin(y, ds))
        try:
            img = self._get_handle().read_region(loc, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: OpenSlide failed reading level {level} at {loc} size {(width, height)} ({exc})"
            ) from exc
        return composite_on_white(np.asarray(img))
