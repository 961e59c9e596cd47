"""tiffslide backend: a pure-Python (tifffile + zarr) OpenSlide replacement for tiled pyramidal TIFF/SVS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.backend_utils import ProcessLocalHandle, level0_origin
from gigaslide.io.base import Slide, SlideReadError, composite_on_white
from gigaslide.io.metadata import mpp_from_properties, objective_from_properties


class TiffSlideSlide(ProcessLocalHandle, Slide):
    """A slide read through tiffslide.

    Only tiled images are accepted: a plain strip TIFF (a photo or a small crop) is left to
    the ``image`` backend. The handle is reopened after ``fork`` and dropped when pickled.
    """

    backend = "tiffslide"
    requires = ("tiffslide",)
    install_hint = "pip install tiffslide"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        handle = self._get_handle()
        try:
            series = handle.ts_tifffile.series[int(handle.properties.get("tiffslide.series-index") or 0)]
            tiled = bool(series.levels[0].keyframe.is_tiled)
        except (AttributeError, IndexError, TypeError):
            tiled = True  # non-TIFF formats that tiffslide reads through other means
        if not tiled:
            self.close()
            raise SlideReadError(
                f"{self.path}: not a tiled whole-slide image (level 0 is stored in strips); "
                "the `image` backend reads plain images"
            )
        self.level_dimensions = tuple((int(w), int(h)) for w, h in handle.level_dimensions)
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.properties: dict[str, str] = {
            k: str(v) for k, v in handle.properties.items() if v is not None and not isinstance(v, dict)
        }
        self.metadata_mpp = mpp_from_properties(self.properties, ("tiffslide.mpp-x", "tiffslide.mpp-y"))
        if self.metadata_mpp is None:
            self.metadata_mpp = mpp_from_properties(self.properties, ("aperio.MPP",))
        self.objective_power = objective_from_properties(
            self.properties, ("tiffslide.objective-power", "aperio.AppMag")
        )
        self.vendor = self.properties.get("tiffslide.vendor")

    def _open_handle(self) -> Any:
        import tiffslide

        try:
            handle = tiffslide.TiffSlide(str(self.path))
        except Exception as exc:  # tiffslide raises tifffile / zarr / ValueError errors for bad input
            raise SlideReadError(
                f"{self.path}: tiffslide cannot open it ({type(exc).__name__}: {exc})"
            ) from exc
        return handle

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        ds = self.level_downsamples[level]
        loc = (level0_origin(x, ds), level0_origin(y, ds))
        try:
            arr = self._get_handle().read_region(loc, level, (width, height), as_array=True)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: tiffslide failed reading level {level} at {loc} size {(width, height)} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        arr = np.asarray(arr)
        if arr.dtype != np.uint8:
            raise SlideReadError(
                f"{self.path}: tiffslide returned {arr.dtype} pixels; only 8-bit RGB is supported"
            )
        if arr.ndim == 3 and arr.shape[2] == 1:
            arr = arr[..., 0]
        return np.ascontiguousarray(composite_on_white(arr))
