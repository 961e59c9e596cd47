"""Coordinate files: HDF5 with a `coords` (N, 2) int64 dataset of level-0 top-left corners.

The tile spec is stored as attributes of ``coords`` under the names CLAM and TRIDENT
already read (``patch_size``, ``patch_level``, ``downsample``, ``level_dim``,
``patch_size_level0``, ``target_magnification`` ...) plus gigaslide's own
(``target_mpp``, ``stride``, the full spec as JSON in ``gigaslide_spec``).
Files written by CLAM (``patches/*.h5``) and TRIDENT (``patches/*_patches.h5``) load too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path


@dataclass
class CoordsFile:
    """Coordinates of one slide's tiles with their spec."""

    coords: np.ndarray  # (N, 2) int64, level-0 (x, y) top-left corners
    spec: TileSpec
    attrs: dict[str, Any]
    tissue_fraction: np.ndarray | None = None  # (N,) float32 when available


def _plain(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def write_coords(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    spec: TileSpec,
    tissue_fraction: np.ndarray | None = None,
    extra_attrs: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a coordinate file; returns its path."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        for key, value in {**spec.to_attrs(), **(extra_attrs or {})}.items():
            ds.attrs[key] = value
        if tissue_fraction is not None:
            f.create_dataset("tissue_fraction", data=np.asarray(tissue_fraction, dtype=np.float32))
    return Path(path)


def read_coords(path: str | os.PathLike[str], slide_mpp: float | None = None) -> CoordsFile:
    """Read a coordinate file written by gigaslide, CLAM or TRIDENT.

    ``slide_mpp`` is needed only for CLAM files, which store no physical resolution.
    """
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{path}: no 'coords' dataset (keys: {list(f.keys())})")
            ds = f["coords"]
            coords = np.asarray(ds[:], dtype=np.int64).reshape(-1, 2)
            attrs = {k: _plain(v) for k, v in ds.attrs.items()}
            # CLAM stores the attributes on the dataset, some tools on the file
            for k, v in f.attrs.items():
                attrs.setdefault(k, _plain(v))
            tf = np.asarray(f["tissue_fraction"][:]) if "tissue_fraction" in f else None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 coordinate file ({e})") from e
    spec = TileSpec.from_attrs(attrs, slide_mpp=slide_mpp)
    return CoordsFile(coords=coords, spec=spec, attrs=attrs, tissue_fraction=tf)
