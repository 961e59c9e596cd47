"""Giga-SSL augmented embedding banks: one HDF5 file per slide, written resumably, read lazily.

Layout of ``BANK/h5_files/<slide_id>.h5``::

    features  (n_aug, n_tiles, D) float32/16   attrs: encoder, weights, weights_sha256, embed_dim,
                                                      precision, gigaslide_version, slide_id, fingerprint,
                                                      n_aug, n_tiles, shared, seed, augmentations (JSON),
                                                      item_shape = [n_tiles, D]
    coords    (n_aug, n_tiles, 2) int64        level-0 (x, y) corners of each view's tiles;
                                                      attrs: the tile spec (as in feature files)

Row ``features[a, t]`` is tile ``coords[a, t]`` seen through augmentation ``a``. The attribute
conventions are those of :mod:`gigaslide.data.features_io` and of its N-D feature files (rows are
augmentations, ``item_shape`` is ``[n_tiles, D]``). :class:`BankWriter` writes one augmentation at a
time into a hidden partial file ``.<slide_id>.partial.h5`` whose ``gigaslide_rows_done`` attribute
advances after each flushed augmentation, so an interrupted slide
resumes at its next augmentation; :meth:`BankWriter.finalize` renames it to the final name.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import h5py
import numpy as np

from gigaslide.data.feature_writer import FINGERPRINT_ATTR, ROWS_DONE_ATTR, partial_path_for
from gigaslide.preprocess.coords_io import _plain
from gigaslide.preprocess.tiling_spec import TileSpec

log = logging.getLogger(__name__)

#: augmentations committed to a partial file (they are the rows of the (n_aug, n_tiles, D) features)
AUGS_DONE_ATTR = ROWS_DONE_ATTR
BANK_SUBDIR = "h5_files"


class BankWriter:
    """Write one slide's bank (n_aug, n_tiles, D) augmentation by augmentation, resumably.

    Args:
        final_path: ``BANK/h5_files/<slide_id>.h5``.
        coords: (n_aug, n_tiles, 2) int64 level-0 coordinates of every view (known in advance).
        dim: feature dimension D.
        fingerprint: identifies everything that determines the rows; a partial file with another
            fingerprint is discarded with a warning.
        dtype: float32 or float16.
        features_attrs, coords_attrs: attributes of the two datasets.
    """

    def __init__(
        self,
        final_path: str | os.PathLike[str],
        coords: np.ndarray,
        dim: int,
        fingerprint: str,
        *,
        dtype: np.dtype | type | str = np.float32,
        features_attrs: dict[str, Any] | None = None,
        coords_attrs: dict[str, Any] | None = None,
    ) -> None:
        self.coords = np.asarray(coords, dtype=np.int64)
        if self.coords.ndim != 3 or self.coords.shape[2] != 2:
            raise ValueError(f"bank coords must be (n_aug, n_tiles, 2), got shape {self.coords.shape}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float16)):
            raise ValueError(f"bank dtype must be float32 or float16, got {self.dtype}")
        self.final_path = Path(final_path)
        self.partial_path = partial_path_for(self.final_path)
        self.n_aug, self.n_tiles = int(self.coords.shape[0]), int(self.coords.shape[1])
        self.dim = int(dim)
        self.fingerprint = fingerprint
        self.features_attrs = dict(features_attrs or {})
        self.coords_attrs = dict(coords_attrs or {})
        self._file: h5py.File | None = None
        self.augs_done = 0

    def __enter__(self) -> BankWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def open(self) -> int:
        """Open (resuming a matching partial file) and return the first augmentation still to compute."""
        self.final_path.parent.mkdir(parents=True, exist_ok=True)
        if self.partial_path.exists():
            done = self._try_resume()
            if done is not None:
                self.augs_done = done
                return done
        f = h5py.File(self.partial_path, "w")
        f.attrs[FINGERPRINT_ATTR] = self.fingerprint
        f.attrs[AUGS_DONE_ATTR] = 0
        shape = (self.n_aug, self.n_tiles, self.dim)
        chunks = (1, max(1, self.n_tiles), max(1, self.dim)) if min(shape) > 0 else None
        fd = f.create_dataset("features", shape=shape, dtype=self.dtype, chunks=chunks)
        item_shape = [self.n_tiles, self.dim]
        for k, v in {
            **self.features_attrs,
            "fingerprint": self.fingerprint,
            "item_shape": item_shape,
        }.items():
            fd.attrs[k] = v
        cd = f.create_dataset("coords", data=self.coords)
        for k, v in self.coords_attrs.items():
            cd.attrs[k] = v
        f.flush()
        self._file = f
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
                reason = "made with other settings (fingerprint mismatch)"
            elif ds is None or ds.shape != (self.n_aug, self.n_tiles, self.dim) or ds.dtype != self.dtype:
                reason = "its features dataset has another shape or dtype"
            elif not np.array_equal(np.asarray(f["coords"][:]), self.coords):
                reason = "its coordinates differ"
            else:
                done = int(f.attrs.get(AUGS_DONE_ATTR, 0))
                if 0 <= done <= self.n_aug:
                    self._file = f
                    if done:
                        log.info(
                            "%s: resuming at augmentation %d of %d", self.final_path.name, done, self.n_aug
                        )
                    return done
                reason = f"invalid augmentation count {done}"
            f.close()
        log.warning("discarding partial bank file %s: %s", self.partial_path, reason)
        self.partial_path.unlink()
        return None

    def write(self, features: np.ndarray) -> None:
        """Commit the (n_tiles, D) features of the next augmentation (flushed before it counts as done)."""
        if self._file is None:
            raise RuntimeError("BankWriter.write() before open()")
        features = np.asarray(features)
        if features.shape != (self.n_tiles, self.dim):
            raise ValueError(f"expected ({self.n_tiles}, {self.dim}) features, got {features.shape}")
        if self.augs_done >= self.n_aug:
            raise ValueError(f"{self.final_path.name}: all {self.n_aug} augmentations are already written")
        self._file["features"][self.augs_done] = features.astype(self.dtype, copy=False)
        self._file.flush()
        self.augs_done += 1
        self._file.attrs[AUGS_DONE_ATTR] = self.augs_done
        self._file.flush()

    def finalize(self) -> Path:
        """Check completeness and rename the partial file to the final path."""
        if self._file is None:
            raise RuntimeError("BankWriter.finalize() before open()")
        if self.augs_done != self.n_aug:
            raise RuntimeError(
                f"{self.final_path.name}: only {self.augs_done} of {self.n_aug} augmentations written"
            )
        self._file.close()
        self._file = None
        os.replace(self.partial_path, self.final_path)
        return self.final_path

    def close(self) -> None:
        """Close without finishing: committed augmentations stay in the partial file."""
        if self._file is not None:
            with contextlib.suppress(Exception):
                self._file.close()
            self._file = None


@dataclass
class BankSlide:
    """Metadata of one slide's bank file (the arrays stay on disk)."""

    slide_id: str
    path: Path
    n_aug: int
    n_tiles: int
    dim: int
    spec: TileSpec | None
    attrs: dict[str, Any] = field(default_factory=dict)


def read_bank_slide(path: str | os.PathLike[str]) -> BankSlide:
    """Metadata of a bank file; raises ValueError naming the file when it is not a bank."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f or f["features"].ndim != 3:
                raise ValueError(
                    f"{path}: not a Giga-SSL bank (needs features (n_aug, n_tiles, D) and coords); "
                    "build one with `gigaslide gigassl bank`"
                )
            n_aug, n_tiles, dim = (int(s) for s in f["features"].shape)
            attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 bank file ({e})") from e
    try:
        spec = TileSpec.from_attrs(cattrs) if cattrs else None
    except (ValueError, KeyError, TypeError):
        spec = None
    slide_id = str(attrs.get("slide_id", path.stem))
    return BankSlide(slide_id, path, n_aug, n_tiles, dim, spec, attrs)


class GigaSSLBank:
    """The finished slides of a bank folder, read lazily with one cached handle per file and process.

    Args:
        root: the bank folder (``BANK``, holding ``h5_files/``) or the ``h5_files`` folder itself.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        root = Path(root)
        folder = root / BANK_SUBDIR if (root / BANK_SUBDIR).is_dir() else root
        if not folder.is_dir():
            raise FileNotFoundError(f"{root}: no bank folder; build one with `gigaslide gigassl bank`")
        files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise ValueError(
                f"{folder}: no finished bank file (*.h5); build one with `gigaslide gigassl bank`"
            )
        self.slides = [read_bank_slide(p) for p in files]
        dims = {s.dim for s in self.slides}
        if len(dims) > 1:
            raise ValueError(f"{folder}: bank files have different feature dimensions {sorted(dims)}")
        self.dim = dims.pop()
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def __len__(self) -> int:
        return len(self.slides)

    def _file(self, i: int) -> h5py.File:
        if self._pid != os.getpid():  # forked (DataLoader worker): never share HDF5 handles
            self._handles, self._pid = {}, os.getpid()
        if i not in self._handles:
            self._handles[i] = h5py.File(self.slides[i].path, "r")
        return self._handles[i]

    def view(self, i: int, aug: int, rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Augmentation ``aug`` of slide ``i``: features (T, D) float32 and coords (T, 2) of ``rows``.

        ``rows`` (T,) strictly increasing tile indices (only those are read); None = all n_tiles.
        """
        f = self._file(i)
        sel: Any = slice(None) if rows is None else np.asarray(rows, dtype=np.int64)
        if rows is not None and np.any(np.diff(sel) <= 0):
            raise ValueError("rows must be strictly increasing")
        feats = np.asarray(f["features"][aug, sel], dtype=np.float32)
        return feats, np.asarray(f["coords"][aug, sel], dtype=np.int64)

    def close(self) -> None:
        for h in self._handles.values():
            with contextlib.suppress(Exception):
                h.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
