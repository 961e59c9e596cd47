"""Feature files: HDF5 with `features` (N, D) and `coords` (N, 2), readable by CLAM/TRIDENT code.

Layout of a gigaslide feature file::

    features  (N, D) float32 (or float16)   attrs: encoder, weights, weights_sha256, embed_dim,
                                                    precision, gigaslide_version, ...
    coords    (N, 2) int64, level-0 corners  attrs: the tile spec (see preprocess.coords_io)

CLAM writes ``features`` + ``coords`` (h5_files/) and a ``.pt`` tensor (pt_files/);
TRIDENT writes ``features`` + ``coords`` too. All of them read with :func:`read_features`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.preprocess.coords_io import _plain
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path


@dataclass
class FeatureBag:
    """Tile features of one slide."""

    features: np.ndarray  # (N, D)
    coords: np.ndarray | None  # (N, 2) int64 level-0 corners, None for a bare .pt file
    attrs: dict[str, Any] = field(default_factory=dict)  # attributes of `features`
    spec: TileSpec | None = None
    item_mask: np.ndarray | None = None  # (N, T) bool for bags of token grids (HIPT regions), else None

    @property
    def n_tiles(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[-1])  # (N, D) or region grids (M, T, D)


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any] | None = None,
    coords_attrs: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a complete feature file (for streaming writes see the embed pipeline)."""
    features = np.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"features must be (N, D), got shape {features.shape}")
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if coords.shape[0] != features.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates for {features.shape[0]} feature rows")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fd = f.create_dataset("features", data=features)
        for k, v in (attrs or {}).items():
            fd.attrs[k] = v
        cd = f.create_dataset("coords", data=coords)
        for k, v in (coords_attrs or {}).items():
            cd.attrs[k] = v
    return Path(path)


def read_features(path: str | os.PathLike[str], slide_mpp: float | None = None) -> FeatureBag:
    """Read a feature file: gigaslide/CLAM/TRIDENT ``.h5`` or a CLAM ``.pt`` tensor.

    CLAM's h5 files may store features as (1, N, D); those are squeezed to (N, D).
    """
    path = Path(path)
    if path.suffix == ".pt":
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        feats = obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)
        return FeatureBag(features=_as_2d(feats, path), coords=None, attrs={})
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset (keys: {list(f.keys())})")
            feats = _as_2d(np.asarray(f["features"][:]), path)
            attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            coords = None
            spec = None
            if "coords" in f:
                coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
                cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
                try:
                    spec = TileSpec.from_attrs(cattrs, slide_mpp=slide_mpp) if cattrs else None
                except (ValueError, KeyError, TypeError):
                    spec = None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 feature file ({e})") from e
    if coords is not None and coords.shape[0] != feats.shape[0]:
        raise ValueError(f"{path}: {coords.shape[0]} coords but {feats.shape[0]} feature rows")
    return FeatureBag(features=feats, coords=coords, attrs=attrs, spec=spec)


def _as_2d(feats: np.ndarray, path: Path) -> np.ndarray:
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim != 2:
        raise ValueError(f"{path}: features must be (N, D), got shape {feats.shape}")
    return feats
