"""OpenSlide backend (openslide-python + the openslide-bin library): every vendor format OpenSlide reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.backend_utils import ProcessLocalHandle, level0_origin
from gigaslide.io.base import Slide, SlideReadError, composite_on_white
from gigaslide.io.metadata import mpp_from_properties, objective_from_properties


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

        ds = self.level_downsamples[level]
        loc = (level0_origin(x, ds), level0_origin(y, ds))
        try:
            img = self._get_handle().read_region(loc, level, (width, height))
        except openslide.OpenSlideError as exc:
            raise SlideReadError(
                f"{self.path}: OpenSlide failed reading level {level} at {loc} size {(width, height)} ({exc})"
            ) from exc
        return composite_on_white(np.asarray(img))
