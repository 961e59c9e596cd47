"""HIPT region feature files: per slide, M regions x T patch tokens (16x16 = 256 for 4096 px regions).

Layout of ``<slide_id>.h5``::

    features         (M, T, D) float32/float16   ViT_256 CLS tokens, row-major over each region's grid
                                                  attrs: as tile feature files (encoder, weights,
                                                  weights_sha256, embed_dim, precision, slide_id,
                                                  fingerprint, ...) + kind="hipt_region_tokens", grid
    patch_mask       (M, T) bool                  True = patch inside the slide (False = white padding)
    coords           (M, 2) int64                 level-0 region corners, attrs: the region tile spec
    region_features  (M, 192) (optional)          ViT_4096 region tokens, attrs: vit4k weights

The writer is atomic (temporary file + rename). The files are also N-D feature files
(``item_shape`` = (T, D)) that :func:`gigaslide.data.features_io.read_features` and the bag loaders
of ``gigaslide train --model hipt`` read; ``patch_mask`` is their item mask.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.preprocess.coords_io import _plain
from gigaslide.preprocess.tiling import subtile_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path

REGION_KIND = "hipt_region_tokens"


@dataclass
class RegionFeatures:
    """The region token grids of one slide."""

    features: np.ndarray  # (M, T, D)
    patch_mask: np.ndarray  # (M, T) bool
    coords: np.ndarray  # (M, 2) int64 level-0 corners
    region_features: np.ndarray | None = None  # (M, 192)
    attrs: dict[str, Any] = field(default_factory=dict)
    spec: TileSpec | None = None

    @property
    def n_regions(self) -> int:
        return int(self.features.shape[0])


def region_patch_mask(region_coords: np.ndarray, region_spec: TileSpec, sub_size: int = 256) -> np.ndarray:
    """(M, K*K) bool: which ``sub_size`` px patches of each region overlap the slide (row-major)."""
    sub = subtile_coords(region_coords, region_spec, sub_size)  # (M, K*K, 2) level-0 corners
    w, h = region_spec.level0_dims
    return (sub[..., 0] < w) & (sub[..., 1] < h)


def write_region_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    patch_mask: np.ndarray,
    coords: np.ndarray,
    region_features: np.ndarray | None = None,
    attrs: dict[str, Any] | None = None,
    coords_attrs: dict[str, Any] | None = None,
    region_attrs: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a complete region feature file (shapes checked against each other)."""
    features = np.asarray(features)
    if features.ndim != 3:
        raise ValueError(f"region features must be (M, T, D), got shape {features.shape}")
    m, t, _ = features.shape
    patch_mask = np.asarray(patch_mask, dtype=bool)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    if patch_mask.shape != (m, t) or coords.shape[0] != m:
        raise ValueError(
            f"patch_mask {patch_mask.shape} / coords {coords.shape} do not fit features {features.shape}"
        )
    if region_features is not None and np.asarray(region_features).shape[0] != m:
        raise ValueError(f"{np.asarray(region_features).shape[0]} region tokens for {m} regions")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fd = f.create_dataset("features", data=features)
        # item_shape marks an N-D feature file (gigaslide.data.features_io): never squeezed, even with M = 1
        for k, v in {"kind": REGION_KIND, "item_shape": list(features.shape[1:]), **(attrs or {})}.items():
            fd.attrs[k] = v
        f.create_dataset("patch_mask", data=patch_mask)
        cd = f.create_dataset("coords", data=coords)
        for k, v in (coords_attrs or {}).items():
            cd.attrs[k] = v
        if region_features is not None:
            rd = f.create_dataset("region_features", data=np.asarray(region_features))
            for k, v in (region_attrs or {}).items():
                rd.attrs[k] = v
    return Path(path)


def read_region_features(path: str | os.PathLike[str], slide_mpp: float | None = None) -> RegionFeatures:
    """Read a region feature file written by :func:`write_region_features`."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "patch_mask" not in f or f["features"].ndim != 3:
                raise ValueError(
                    f"{path}: not a HIPT region feature file (need features (M, T, D) and patch_mask (M, T)); "
                    "write one with `gigaslide embed TILING_DIR --encoder hipt_vit256 --regions`"
                )
            feats = np.asarray(f["features"][:])
            mask = np.asarray(f["patch_mask"][:], dtype=bool)
            attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            region = np.asarray(f["region_features"][:]) if "region_features" in f else None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 region feature file ({e})") from e
    try:
        spec = TileSpec.from_attrs(cattrs, slide_mpp=slide_mpp) if cattrs else None
    except (ValueError, KeyError, TypeError):
        spec = None
    return RegionFeatures(feats, mask, coords, region, attrs, spec)
