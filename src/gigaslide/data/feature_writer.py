"""Chunked, resumable, atomic writer for one slide's feature file.

Rows stream in batch by batch; every ``chunk_size`` rows they are written to a hidden
partial file ``.<slide_id>.partial.h5`` beside the final one and flushed, and the file's
``rows_done`` attribute is advanced. A job killed half-way through a 100,000-tile slide
therefore restarts from its last complete chunk. The partial file carries a fingerprint
(encoder, weights, coordinates, precision, dtype); a partial file with another fingerprint
is discarded with a warning. :meth:`ChunkedFeatureWriter.finalize` renames the partial file
to the final name, so a file under the final name is always complete.

A row is one item of any shape: a tile's (D,) feature, a region's (256, 384) token grid, an
augmentation's (T, D) bank; an optional boolean ``mask`` (N, ...) streams beside the rows
(layout in :mod:`gigaslide.data.features_io`).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from gigaslide.data.features_io import ITEM_SHAPE_ATTR, check_layout_shapes, normalize_coords

log = logging.getLogger(__name__)

ROWS_DONE_ATTR = "gigaslide_rows_done"
FINGERPRINT_ATTR = "gigaslide_fingerprint"
_H5_CHUNK_BYTES = 1 << 20  # ~1 MiB HDF5 storage chunks


def array_sha256(arr: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes."""
    arr = np.ascontiguousarray(arr)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(arr.tobytes())
    return h.hexdigest()


def make_fingerprint(**fields: Any) -> str:
    """A short stable hash of JSON-serialisable fields (encoder, weights sha, coords hash, ...)."""
    blob = json.dumps(fields, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:32]


def partial_path_for(final_path: str | os.PathLike[str]) -> Path:
    """``dir/<stem>.h5`` -> ``dir/.<stem>.partial.h5``."""
    final_path = Path(final_path)
    return final_path.with_name(f".{final_path.stem}.partial.h5")


def stored_fingerprint(path: str | os.PathLike[str]) -> str | None:
    """Fingerprint recorded in a finished feature file (``None`` if absent or unreadable)."""
    try:
        with h5py.File(path, "r") as f:
            value = f["features"].attrs.get("fingerprint") if "features" in f else None
    except OSError:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return None if value is None else str(value)


class ChunkedFeatureWriter:
    """Stream (N, D) features, or (N, ...) items of any shape, for known coordinates into HDF5, resumably.

    Args:
        final_path: where the finished file goes (``OUT/h5_files/<slide_id>.h5``).
        coords: (N, 2) or (N, ..., 2) int64 level-0 coordinates, in the order the rows will arrive.
        dim: feature dimension D, or the shape of one item, e.g. ``(256, 384)`` for HIPT region grids.
        fingerprint: identifies everything that determines the rows (see :func:`make_fingerprint`).
        chunk_size: rows (items) per committed chunk (the resume granularity).
        dtype: stored feature dtype (float32 or float16).
        features_attrs: attributes of the ``features`` dataset (encoder, weights, ...).
        coords_attrs: attributes of the ``coords`` dataset (the tile spec).
        mask_shape: per-item shape of a boolean ``mask`` dataset (a prefix of the item shape, ``()``
            for one flag per item), e.g. ``(256,)`` for HIPT; None = no mask. With a mask every
            :meth:`write` passes one.

    Use as a context manager: ``start = w.open()``, then :meth:`write` batches for rows
    ``start..N`` and :meth:`finalize`. Leaving the block on an exception keeps the committed
    chunks in the partial file for the next run.
    """

    #: what a row is called in log messages (a subclass's items may be views, regions, ...)
    row_name = "row"

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        coords: np.ndarray,
        dim: int | Sequence[int],
        fingerprint: str,
        *,
        chunk_size: int = 4096,
        dtype: np.dtype | type | str = np.float32,
        features_attrs: dict[str, Any] | None = None,
        coords_attrs: dict[str, Any] | None = None,
        mask_shape: Sequence[int] | None = None,
    ) -> None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"feature dtype must be float32 or float16, got {self.dtype}")
        self.final_path = Path(final_path)
        self.partial_path = partial_path_for(self.final_path)
        self.item_shape: tuple[int, ...] = (
            (int(dim),) if isinstance(dim, (int, np.integer)) else tuple(int(s) for s in dim)
        )
        if not self.item_shape or min(self.item_shape) < 0:
            raise ValueError(f"{self.final_path.name}: invalid item shape {self.item_shape}")
        self.coords = normalize_coords(coords, 1 + len(self.item_shape))  # (N, 2) or (N, ..., 2)
        self.n_total = int(self.coords.shape[0])
        self.mask_shape = None if mask_shape is None else tuple(int(s) for s in mask_shape)
        check_layout_shapes(
            (self.n_total, *self.item_shape),
            self.coords.shape,
            None if self.mask_shape is None else (self.n_total, *self.mask_shape),
            where=str(self.final_path),
        )
        self.fingerprint = fingerprint
        self.chunk_size = int(chunk_size)
        self.features_attrs = dict(features_attrs or {})
        if len(self.item_shape) > 1:
            self.features_attrs[ITEM_SHAPE_ATTR] = list(self.item_shape)
        self.coords_attrs = dict(coords_attrs or {})
        self._file: h5py.File | None = None
        self._buffer: list[np.ndarray] = []
        self._mask_buffer: list[np.ndarray] = []
        self._buffered = 0
        self.rows_done = 0  # rows committed to disk
        self.resumed_from = 0

    # -- lifecycle -------------------------------------------------------------------
    def open(self) -> int:
        """Open (resuming a matching partial file) and return the first row still to compute."""
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial_path.exists():
            start = self._try_resume()
            if start is not None:
                self.rows_done = self.resumed_from = start
                return start
        self._create()
        return 0

    def _try_resume(self) -> int | None:
        reason = ""
        try:
            f = h5py.File(self.partial_path, "r+")
        except OSError as e:
            reason = f"unreadable ({e})"
        else:
            fp = f.attrs.get(FINGERPRINT_ATTR)
            fp = fp.decode() if isinstance(fp, bytes) else fp
            ds = f.get("features")
            if fp != self.fingerprint:
                reason = "made with another encoder, weights, precision or coordinates (fingerprint mismatch)"
            elif ds is None or ds.shape != (self.n_total, *self.item_shape) or ds.dtype != self.dtype:
                reason = "its features dataset has another shape or dtype"
            elif self._stored_mask_shape(f) != self.mask_shape:
                reason = "its mask dataset has another shape (or is missing)"
            elif not np.array_equal(np.asarray(f["coords"][:]), self.coords):
                reason = "its coordinates differ"
            if not reason:
                done = int(f.attrs.get(ROWS_DONE_ATTR, 0))
                if 0 <= done <= self.n_total:
                    self._file = f
                    if done:
                        log.info(
                            "%s: resuming at %s %d of %d",
                            self.final_path.name,
                            self.row_name,
                            done,
                            self.n_total,
                        )
                    return done
                reason = f"invalid row count {done}"
            f.close()
        log.warning("discarding partial feature file %s: %s", self.partial_path, reason)
        self.partial_path.unlink()
        return None

    def _create(self) -> None:
        f = h5py.File(self.partial_path, "w")
        f.attrs[FINGERPRINT_ATTR] = self.fingerprint
        f.attrs[ROWS_DONE_ATTR] = 0
        item = int(np.prod(self.item_shape))
        rows = max(1, min(self.n_total, _H5_CHUNK_BYTES // max(1, item * self.dtype.itemsize)))
        fd = f.create_dataset(
            "features",
            shape=(self.n_total, *self.item_shape),
            dtype=self.dtype,
            chunks=(rows, *(max(1, s) for s in self.item_shape)) if self.n_total > 0 and item > 0 else None,
        )
        if self.mask_shape is not None:
            f.create_dataset("mask", shape=(self.n_total, *self.mask_shape), dtype=bool)
        for k, v in {**self.features_attrs, "fingerprint": self.fingerprint}.items():
            fd.attrs[k] = v
        cd = f.create_dataset("coords", data=self.coords)
        for k, v in self.coords_attrs.items():
            cd.attrs[k] = v
        f.flush()
        self._file = f

    def _stored_mask_shape(self, f: h5py.File) -> tuple[int, ...] | None:
        """Per-item shape of the partial file's mask (None without one)."""
        return None if "mask" not in f else tuple(int(s) for s in f["mask"].shape[1:])

    @property
    def dim(self) -> int:
        """Feature dimension D of an (N, D) writer; an error for N-D items (use ``item_shape``)."""
        if len(self.item_shape) != 1:
            raise ValueError(
                f"{self.final_path.name}: items have shape {self.item_shape}; `dim` is for (N, D)"
            )
        return self.item_shape[0]

    def __enter__(self) -> ChunkedFeatureWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close without finishing: committed chunks stay in the partial file, the buffer is dropped."""
        self._buffer, self._mask_buffer, self._buffered = [], [], 0
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None

    # -- writing ---------------------------------------------------------------------
    @property
    def rows_written(self) -> int:
        """Rows received so far (committed + buffered)."""
        return self.rows_done + self._buffered

    def write(self, features: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Append a (B, ...) batch (and its (B, ...) bool mask when the file has one).

        Commits every time ``chunk_size`` rows have accumulated.
        """
        if self._file is None:
            raise RuntimeError("ChunkedFeatureWriter.write() before open()")
        features = np.asarray(features)
        if features.ndim < 1 or tuple(features.shape[1:]) != self.item_shape:
            want = ", ".join(["B", *map(str, self.item_shape)])
            raise ValueError(f"{self.final_path.name}: expected a ({want}) batch, got shape {features.shape}")
        if self.mask_shape is None and mask is not None:
            raise ValueError(
                f"{self.final_path.name}: a mask was given but the writer was made without mask_shape"
            )
        if self.mask_shape is not None:
            if mask is None:
                raise ValueError(f"{self.final_path.name}: this file has a mask; pass mask= with every batch")
            mask = np.asarray(mask)
            if mask.dtype != np.bool_ or tuple(mask.shape) != (features.shape[0], *self.mask_shape):
                raise ValueError(
                    f"{self.final_path.name}: mask must be bool of shape {(features.shape[0], *self.mask_shape)}, "
                    f"got {mask.dtype} {mask.shape}"
                )
            self._mask_buffer.append(mask)
        if self.rows_written + features.shape[0] > self.n_total:
            raise ValueError(
                f"{self.final_path.name}: {self.rows_written + features.shape[0]} rows for "
                f"{self.n_total} coordinates"
            )
        self._buffer.append(features.astype(self.dtype, copy=False))
        self._buffered += features.shape[0]
        while self._buffered >= self.chunk_size:
            self._commit(self.chunk_size)

    def _commit(self, n_rows: int) -> None:
        """Write the first ``n_rows`` buffered rows to disk, flush, then advance ``rows_done``."""
        assert self._file is not None
        data = np.concatenate(self._buffer, axis=0) if len(self._buffer) > 1 else self._buffer[0]
        head, tail = data[:n_rows], data[n_rows:]
        start = self.rows_done
        self._file["features"][start : start + n_rows] = head
        if self.mask_shape is not None:
            masks = (
                np.concatenate(self._mask_buffer, axis=0)
                if len(self._mask_buffer) > 1
                else self._mask_buffer[0]
            )
            self._file["mask"][start : start + n_rows] = masks[:n_rows]
            self._mask_buffer = [masks[n_rows:]] if masks.shape[0] > n_rows else []
        self._file.flush()
        self._file.attrs[ROWS_DONE_ATTR] = start + n_rows
        self._file.flush()
        self.rows_done = start + n_rows
        self._buffer = [tail] if tail.shape[0] else []
        self._buffered = int(tail.shape[0])

    def finalize(self) -> Path:
        """Commit the remaining rows, check completeness and rename to the final path."""
        if self._file is None:
            raise RuntimeError("ChunkedFeatureWriter.finalize() before open()")
        if self._buffered:
            self._commit(self._buffered)
        if self.rows_done != self.n_total:
            raise RuntimeError(
                f"{self.final_path.name}: only {self.rows_done} of {self.n_total} feature rows were written"
            )
        self._file.close()
        self._file = None
        os.replace(self.partial_path, self.final_path)
        return self.final_path
