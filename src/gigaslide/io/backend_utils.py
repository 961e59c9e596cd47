"""Small helpers shared by the reader backends: geometry conversions and open-time checks."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gigaslide.io.base import SlideReadError


def openslide_downsamples(dimensions: Sequence[tuple[int, int]]) -> tuple[float, ...]:
    """Level downsamples computed as OpenSlide does: mean of the width and height ratios to level 0."""
    w0, h0 = dimensions[0]
    return tuple(((w0 / w) + (h0 / h)) / 2.0 for w, h in dimensions)


def level0_origin(level_px: int, downsample: float) -> int:
    """The smallest level-0 coordinate ``c`` with ``c / downsample >= level_px``.

    Backends whose ``read_region`` takes a level-0 location map it to a level with
    ``floor(c / downsample)`` (OpenSlide, :class:`~gigaslide.io.base.Slide`) or
    ``int(c / downsample)`` (tiffslide); for this ``c`` both give exactly ``level_px``
    (``downsample >= 1``), and OpenSlide's sub-pixel remainder is as small as it can be.
    """
    if level_px <= 0:
        return 0
    c = max(0, math.floor(level_px * downsample) - 1)
    while c / downsample < level_px:
        c += 1
    return c


def check_file(path: Path) -> None:
    """Raise :class:`SlideReadError` naming ``path`` when it is missing, a folder or unreadable."""
    if not path.exists():
        raise SlideReadError(
            f"{path}: file not found. Check the path (relative paths are resolved from the CWD)."
        )
    if path.is_dir():
        raise SlideReadError(f"{path}: is a folder, not a slide file")
    try:
        with open(path, "rb") as fh:
            fh.read(1)
    except OSError as exc:
        raise SlideReadError(
            f"{path}: cannot be read ({exc.strerror or exc}); check file permissions"
        ) from exc


def describe_error(exc: BaseException) -> str:
    """A one-line reason for a backend failure: the exception type and message, without the path noise."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    name = type(exc).__name__
    return f"{name}: {text}" if text else name


class ProcessLocalHandle:
    """Mixin for backends wrapping a library handle that must not cross processes.

    The handle (from :meth:`_open_handle`) is opened lazily per process: one inherited through
    ``fork`` (another pid) is never used nor closed, and pickling drops it, so DataLoader worker
    processes each open their own.
    """

    _handle: Any = None
    _pid: int | None = None

    def _open_handle(self) -> Any:  # pragma: no cover - every subclass defines it
        raise TypeError(f"{type(self).__name__} must define _open_handle()")

    def _get_handle(self) -> Any:
        if self._handle is None or self._pid != os.getpid():
            self._handle, self._pid = self._open_handle(), os.getpid()
        return self._handle

    def close(self) -> None:
        if self._handle is not None and self._pid == os.getpid():
            self._handle.close()
        self._handle = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state
