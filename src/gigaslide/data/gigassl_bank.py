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
augmentations, ``item_shape`` is ``[n_tiles, D]``), and so is the writer: :class:`BankWriter` is the
N-D :class:`~gigaslide.data.feature_writer.ChunkedFeatureWriter` committing one augmentation at a time
to a hidden partial file ``.<slide_id>.partial.h5`` whose ``gigaslide_rows_done`` attribute advances
after each flushed augmentation, so an interrupted slide resumes at its next augmentation;
:meth:`BankWriter.finalize` renames it to the final name.

The identity (non-augmented) view of a slide, when the bank was built with ``--identity-view``, is
``BANK/identity/h5_files/<slide_id>.h5``: a ``gigaslide embed`` feature file (features (N, D), coords
(N, 2)) of *all* the slide's tissue tiles, so that ``BANK/identity`` is an embedding folder in its own
right. It is not a row of ``features``: the paper (and the official code) encode a slide from views
drawn among all its non-augmented tiles, not among one view's ``n_tiles``.
:meth:`GigaSSLBank.identity_file` finds it and checks that it comes from the bank's encoder.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.data.feature_writer import ROWS_DONE_ATTR, ChunkedFeatureWriter
from gigaslide.preprocess.coords_io import _plain
from gigaslide.preprocess.tiling_spec import TileSpec

#: augmentations committed to a partial file (they are the rows of the (n_aug, n_tiles, D) features)
AUGS_DONE_ATTR = ROWS_DONE_ATTR
BANK_SUBDIR = "h5_files"
#: ``BANK/identity``: the identity views, a ``gigaslide embed`` output folder
IDENTITY_SUBDIR = "identity"


class BankWriter(ChunkedFeatureWriter):
    """Write one slide's bank (n_aug, n_tiles, D) augmentation by augmentation, resumably.

    A :class:`~gigaslide.data.feature_writer.ChunkedFeatureWriter` whose items are views: item shape
    ``(n_tiles, D)``, one commit per augmentation (the resume granularity).

    Args:
        final_path: ``BANK/h5_files/<slide_id>.h5``.
        coords: (n_aug, n_tiles, 2) int64 level-0 coordinates of every view (known in advance).
        dim: feature dimension D.
        fingerprint: identifies everything that determines the rows; a partial file with another
            fingerprint is discarded with a warning.
        dtype: float32 or float16.
        features_attrs, coords_attrs: attributes of the two datasets.
    """

    row_name = "augmentation"

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
        coords = np.asarray(coords, dtype=np.int64)
        if coords.ndim != 3 or coords.shape[2] != 2:
            raise ValueError(
                f"{final_path}: bank coords must be (n_aug, n_tiles, 2), got shape {coords.shape}"
            )
        super().__init__(
            final_path,
            coords,
            (int(coords.shape[1]), int(dim)),
            fingerprint,
            chunk_size=1,
            dtype=dtype,
            features_attrs=features_attrs,
            coords_attrs=coords_attrs,
        )

    @property
    def n_aug(self) -> int:
        return self.n_total

    @property
    def n_tiles(self) -> int:
        return self.item_shape[0]

    @property
    def augs_done(self) -> int:
        """Augmentations committed to disk."""
        return self.rows_done

    def write(self, features: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Commit the next augmentation's (n_tiles, D) features, or a (B, n_tiles, D) run of them."""
        features = np.asarray(features)
        super().write(features[None] if features.ndim == 2 else features, mask)


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
        self.identity_dir = folder.parent / IDENTITY_SUBDIR / BANK_SUBDIR
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

    def identity_file(self, i: int) -> Path | None:
        """Slide ``i``'s identity view (a feature file of all its tiles, module docstring), None without one.

        Raises ValueError naming both files when it was made with another encoder or weights.
        """
        meta = self.slides[i]
        path = self.identity_dir / f"{meta.slide_id}.h5"
        if not path.is_file():
            return None
        try:
            with h5py.File(path, "r") as f:
                attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
                shape = tuple(f["features"].shape)
        except (OSError, KeyError) as e:
            raise ValueError(
                f"{path}: unreadable identity view ({e}); delete it and rerun `gigaslide gigassl bank "
                "--identity-view` with the same --out"
            ) from e
        for key in ("encoder", "weights_sha256"):
            if key in meta.attrs and attrs.get(key) != meta.attrs[key]:
                raise ValueError(
                    f"{path}: identity view made with {key} {attrs.get(key)!r}, but the bank file {meta.path} "
                    f"with {meta.attrs[key]!r}; delete {path.parent} and rerun `gigaslide gigassl bank "
                    "--identity-view` with the bank's encoder and weights"
                )
        if len(shape) != 2 or shape[1] != meta.dim:
            raise ValueError(
                f"{path}: identity view of shape {shape}, expected (N, {meta.dim}) as the bank {meta.path}"
            )
        return path

    def close(self) -> None:
        for h in self._handles.values():
            with contextlib.suppress(Exception):
                h.close()
        self._handles = {}

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state
