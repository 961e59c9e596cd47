"""``tiff-direct``: the fast reader. Decodes a tiled TIFF/SVS's tiles straight from the file.

Per read, the tiles intersecting the region are fetched with ``os.pread`` on one file
descriptor per process and decoded with imagecodecs (libjpeg-turbo for JPEG tiles; other
codecs through tifffile's segment decoder), then cropped/assembled. A small LRU cache of
decoded tiles means that a grid of reads that straddle tile borders decodes every tile
once; a read that is exactly one stored tile skips the cache and returns the decoded
array itself.

Colour handling follows OpenSlide: YCbCr JPEG is converted to RGB by libjpeg, Aperio's
RGB-photometric JPEG (no JFIF marker) is decoded as untransformed RGB, grey is replicated,
alpha is composited on white and missing (sparse) tiles are white.

Fork/worker safety: the descriptor, the cache and any tifffile decoders live in a
per-process state rebuilt whenever ``os.getpid()`` changes; pickling drops that state.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.base import BACKGROUND, Slide, SlideReadError, composite_on_white
from gigaslide.io.tiff_structure import TiffLayoutUnsupported, TiledLevel, parse_tiff_pyramid

DEFAULT_CACHE_BYTES = 64 * 1024**2  # decoded-tile cache per process (about 340 tiles of 256x256 RGB)


class _ProcessState:
    """Everything that must not cross a ``fork``: the descriptor, decoded tiles, tifffile decoders."""

    def __init__(self, path: Path, capacity: int) -> None:
        self.pid = os.getpid()
        try:
            self.fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        except OSError as exc:
            raise SlideReadError(f"{path}: cannot open for reading ({exc.strerror or exc})") from exc
        self.cache: OrderedDict[tuple[int, int], np.ndarray | None] = OrderedDict()
        self.capacity = capacity
        self.lock = threading.Lock()
        self.tiff: Any = None  # tifffile.TiffFile, opened only for levels decoded through tifffile
        self.decoders: dict[int, Any] = {}

    def close(self) -> None:
        if self.pid == os.getpid():
            os.close(self.fd)
            if self.tiff is not None:
                self.tiff.close()
        self.cache.clear()


class TiffDirectSlide(Slide):
    """Direct tile decoding for tiled pyramidal TIFF and Aperio SVS (see module docstring)."""

    backend = "tiff-direct"
    requires = ("tifffile", "imagecodecs")
    install_hint = "pip install tifffile imagecodecs"

    def __init__(
        self, path: str | Path, mpp: float | None = None, cache_bytes: int = DEFAULT_CACHE_BYTES
    ) -> None:
        super().__init__(path, mpp)
        pyramid = parse_tiff_pyramid(self.path)
        self._levels: tuple[TiledLevel, ...] = pyramid.levels
        self.level_dimensions = tuple((lv.width, lv.height) for lv in pyramid.levels)
        self.level_downsamples = pyramid.downsamples
        self.metadata_mpp = pyramid.metadata_mpp
        self.objective_power = pyramid.objective_power
        self.properties: dict[str, str] = dict(pyramid.properties)
        self.vendor = pyramid.vendor
        self._cache_bytes = int(cache_bytes)
        self._proc: _ProcessState | None = None
        try:
            self._check_decodes()
        except BaseException:
            self.close()
            raise

    # -- per-process state ------------------------------------------------------------
    def _state(self) -> _ProcessState:
        st = self._proc
        if st is None or st.pid != os.getpid():
            lv0 = self._levels[0]
            capacity = max(4, self._cache_bytes // (lv0.tile_width * lv0.tile_height * 3))
            st = self._proc = _ProcessState(self.path, capacity)
        return st

    def set_cache_bytes(self, nbytes: int) -> None:
        """Resize the decoded-tile cache (per process); 0 keeps only the minimum of 4 tiles."""
        self._cache_bytes = int(nbytes)
        if self._proc is not None:
            self._proc.close()
            self._proc = None

    def _check_decodes(self) -> None:
        """Decode the first stored tile of every level so unsupported streams are refused at open time."""
        for index, lv in enumerate(self._levels):
            stored = np.flatnonzero(lv.counts > 0)
            if stored.size == 0:
                continue
            try:
                tile = self._decode(index, int(stored[0]))
            except SlideReadError as exc:
                raise TiffLayoutUnsupported(str(exc)) from exc
            if tile is None or tile.shape != (lv.tile_height, lv.tile_width, 3):
                raise TiffLayoutUnsupported(
                    f"{self.path}: level {index} tile decodes to {None if tile is None else tile.shape}, "
                    f"expected {(lv.tile_height, lv.tile_width, 3)}"
                )

    # -- tiles ------------------------------------------------------------------------
    def _tifffile_decoder(self, st: _ProcessState, level: int) -> Any:
        decoder = st.decoders.get(level)
        if decoder is None:
            import tifffile

            if st.tiff is None:
                st.tiff = tifffile.TiffFile(self.path)
            path = self._levels[level].page_path
            page = st.tiff.pages[path[0]]
            if len(path) == 2:
                page = page.pages[path[1]]
            decoder = st.decoders[level] = page.decode
        return decoder

    def _decode(self, level: int, index: int) -> np.ndarray | None:
        """Decode stored tile ``index`` of ``level`` to (tile_h, tile_w, 3) uint8; None when not stored."""
        lv = self._levels[level]
        nbytes = int(lv.counts[index])
        if nbytes == 0:
            return None
        st = self._state()
        data = os.pread(st.fd, nbytes, int(lv.offsets[index]))
        if len(data) != nbytes:
            raise SlideReadError(
                f"{self.path}: file is truncated (tile {index} of level {level} needs {nbytes} bytes "
                f"at offset {int(lv.offsets[index])}, got {len(data)})"
            )
        try:
            if lv.compression == 7:
                import imagecodecs

                tile = imagecodecs.jpeg_decode(
                    data,
                    tables=lv.jpeg_tables,
                    colorspace=lv.jpeg_colorspace,
                    outcolorspace=lv.jpeg_outcolorspace,
                )
            else:
                tile = self._tifffile_decoder(st, level)(data, index, jpegtables=lv.jpeg_tables)[0]
                tile = tile.reshape(tile.shape[-3:])
        except Exception as exc:
            raise SlideReadError(
                f"{self.path}: tile {index} of level {level} cannot be decoded ({type(exc).__name__}: {exc})"
            ) from exc
        if tile.ndim == 3 and tile.shape[2] == 1:
            tile = tile[..., 0]
        if tile.ndim == 2 or tile.shape[2] != 3:
            if tile.ndim == 3 and tile.shape[2] == 2:  # grey + alpha
                tile = np.concatenate([np.repeat(tile[..., :1], 3, axis=2), tile[..., 1:]], axis=2)
            tile = composite_on_white(tile)
        if tile.shape[:2] != (lv.tile_height, lv.tile_width):
            padded = np.full((lv.tile_height, lv.tile_width, 3), BACKGROUND, dtype=np.uint8)
            h, w = min(tile.shape[0], lv.tile_height), min(tile.shape[1], lv.tile_width)
            padded[:h, :w] = tile[:h, :w]
            tile = padded
        return tile

    def _cached(self, st: _ProcessState, level: int, index: int) -> np.ndarray | None:
        key = (level, index)
        with st.lock:
            if key in st.cache:
                st.cache.move_to_end(key)
                return st.cache[key]
        tile = self._decode(level, index)
        if tile is not None:
            tile.setflags(write=False)
        with st.lock:
            st.cache[key] = tile
            while len(st.cache) > st.capacity:
                st.cache.popitem(last=False)
        return tile

    # -- reading ------------------------------------------------------------------------
    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        lv = self._levels[level]
        tw, th, across = lv.tile_width, lv.tile_height, lv.tiles_across
        tx0, ty0 = x // tw, y // th
        tx1, ty1 = (x + width - 1) // tw, (y + height - 1) // th
        st = self._state()
        if tx0 == tx1 and ty0 == ty1:  # one tile: the common case for tile-grid reads
            index = ty0 * across + tx0
            ox, oy = x - tx0 * tw, y - ty0 * th
            if ox == 0 and oy == 0 and width == tw and height == th and (level, index) not in st.cache:
                tile = self._decode(level, index)
                return tile if tile is not None else np.full((th, tw, 3), BACKGROUND, dtype=np.uint8)
            tile = self._cached(st, level, index)
            if tile is None:
                return np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
            return tile[oy : oy + height, ox : ox + width].copy()
        out = np.empty((height, width, 3), dtype=np.uint8)
        for ty in range(ty0, ty1 + 1):
            # rows of this tile row inside the output, and inside the tile
            r0, r1 = max(y, ty * th), min(y + height, (ty + 1) * th)
            for tx in range(tx0, tx1 + 1):
                c0, c1 = max(x, tx * tw), min(x + width, (tx + 1) * tw)
                tile = self._cached(st, level, ty * across + tx)
                dst = out[r0 - y : r1 - y, c0 - x : c1 - x]
                if tile is None:
                    dst[...] = BACKGROUND
                else:
                    dst[...] = tile[r0 - ty * th : r1 - ty * th, c0 - tx * tw : c1 - tx * tw]
        return out

    def level_tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the stored tiles of ``level``."""
        lv = self._levels[level]
        return lv.tile_width, lv.tile_height

    def close(self) -> None:
        if self._proc is not None:
            self._proc.close()
        self._proc = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_proc"] = None
        return state

    def __del__(self) -> None:
        proc = getattr(self, "_proc", None)
        if proc is not None:
            with contextlib.suppress(OSError):
                proc.close()
