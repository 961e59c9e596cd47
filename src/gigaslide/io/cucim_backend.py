"""cuCIM backend (RAPIDS ``cucim.CuImage``), registered always but usable only where ``import cucim`` works.

cuCIM reads tiled TIFF / Aperio SVS / Philips TIFF with its own decoders. It is an
optional extra (``pip install gigaslide[cucim]``); requesting it by name without cuCIM
installed raises a clear :class:`~gigaslide.io.registry.BackendUnavailableError`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.backend_utils import level0_origin
from gigaslide.io.base import Slide, SlideReadError, composite_on_white
from gigaslide.io.metadata import mpp_from_properties, objective_from_properties


def _flatten(meta: Any, prefix: str = "") -> dict[str, str]:
    """cuCIM's nested metadata dict as flat ``section.key`` strings, like OpenSlide properties."""
    out: dict[str, str] = {}
    if isinstance(meta, dict):
        for k, v in meta.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(_flatten(v, key))
            else:
                out[key] = str(v)
    return out


class CuCIMSlide(Slide):
    """A slide read through ``cucim.CuImage`` (reopened per process after ``fork``)."""

    backend = "cucim"
    requires = ("cucim",)
    install_hint = "pip install cucim (or gigaslide[cucim]); it needs a CUDA-capable Linux machine"

    def __init__(self, path: str | Path, mpp: float | None = None) -> None:
        super().__init__(path, mpp)
        image = self._open()
        res = image.resolutions
        dims = tuple((int(w), int(h)) for w, h in res["level_dimensions"])
        if not dims:
            raise SlideReadError(f"{self.path}: cuCIM reports no resolution levels")
        self.level_dimensions = dims
        # cuCIM maps level-0 locations with its own downsamples, so keep them
        self.level_downsamples = tuple(float(d) for d in res["level_downsamples"])
        self.properties: dict[str, str] = _flatten(image.metadata)
        self.metadata_mpp = mpp_from_properties(self.properties, ("aperio.MPP",))
        if self.metadata_mpp is None:
            units = [str(u).lower() for u in image.spacing_units()]
            spacing = list(image.spacing())
            # dims are "YXC": spacing[0] is y, spacing[1] is x
            if len(spacing) >= 2 and units[:2] in (["micrometer", "micrometer"], ["um", "um"]):
                self.metadata_mpp = mpp_from_properties(
                    {"x": str(spacing[1]), "y": str(spacing[0])}, ("x", "y")
                )
        self.objective_power = objective_from_properties(self.properties, ("aperio.AppMag",))

    def _open(self) -> Any:
        from cucim import CuImage

        try:
            image = CuImage(str(self.path))
        except Exception as exc:
            raise SlideReadError(f"{self.path}: cuCIM cannot open it ({type(exc).__name__}: {exc})") from exc
        self._image = image
        self._pid = os.getpid()
        return image

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        if getattr(self, "_image", None) is None or self._pid != os.getpid():
            self._open()
        ds = self.level_downsamples[level]
        loc = (level0_origin(x, ds), level0_origin(y, ds))
        try:
            region = self._image.read_region(location=loc, size=(width, height), level=level)
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: cuCIM failed reading level {level} at {loc} ({type(exc).__name__}: {exc})"
            ) from exc
        arr = np.asarray(region)
        if arr.dtype != np.uint8:
            raise SlideReadError(
                f"{self.path}: cuCIM returned {arr.dtype} pixels; only 8-bit RGB is supported"
            )
        return np.ascontiguousarray(composite_on_white(arr))

    def close(self) -> None:
        image = getattr(self, "_image", None)
        if image is not None and self._pid == os.getpid():
            image.close()
        self._image = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_image"] = None
        return state
