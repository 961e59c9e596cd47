"""Feature files: HDF5 with ``features`` (N, ...) and ``coords``, readable by CLAM/TRIDENT code for (N, D).

Layout of a gigaslide feature file::

    features  (N, ...) float32 (or float16)  attrs: encoder, weights, weights_sha256, embed_dim,
                                                    precision, gigaslide_version, ...
                                                    (+ item_shape for N-D files)
    coords    (N, ..., 2) int64, level-0 corners  attrs: the tile spec (see preprocess.coords_io)
    mask      (N, ...) bool, optional          True = real entry, False = padding

``features`` row ``i`` belongs to item ``i`` (a tile, a region, an augmentation). Tile features
are (N, D) with coords (N, 2): that is the file CLAM and TRIDENT write and read. Any trailing shape
is allowed: HIPT region token grids are (M, 256, 384) with coords (M, 2) (region corners) and a
mask (M, 256) of the 256 px patches holding tissue; Giga-SSL augmentation banks are (A, T, D) with
coords (A, T, 2) of the T tiles drawn for each augmentation and no mask. The shape of ``coords``
without its last axis and the shape of ``mask`` are each a prefix of the shape of ``features``.

CLAM writes ``features`` + ``coords`` (h5_files/) and a ``.pt`` tensor (pt_files/); TRIDENT writes
``features`` + ``coords`` too. All of them read with :func:`read_features`.
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

#: attribute of ``features`` recording the per-item shape of an N-D file (absent for (N, D) files)
ITEM_SHAPE_ATTR = "item_shape"


@dataclass
class FeatureBag:
    """Features of one slide: (N, D) tile features, or N items of any shape (N, ...)."""

    features: np.ndarray  # (N, D) or (N, ...)
    coords: np.ndarray | None  # (N, 2) or (N, ..., 2) int64 level-0 corners, None for a bare .pt file
    attrs: dict[str, Any] = field(default_factory=dict)  # attributes of `features`
    spec: TileSpec | None = None
    mask: np.ndarray | None = None  # (N, ...) bool, True = real entry; None = everything is real

    @property
    def n_tiles(self) -> int:
        """Number of items N (tiles, regions, augmentations): the length of the first axis."""
        return int(self.features.shape[0])

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of ``features``: (N, D) or (N, ...)."""
        return tuple(int(s) for s in self.features.shape)

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one item: (D,) for tile features, e.g. (256, 384) for HIPT region grids."""
        return self.shape[1:]

    @property
    def dim(self) -> int:
        """Feature dimension D of (N, D) tile features; an error for N-D files (use :attr:`item_shape`)."""
        if self.features.ndim != 2:
            raise ValueError(
                f"features have shape {self.shape}, not (N, D): `dim` is defined for tile features only; "
                "use `item_shape`"
            )
        return int(self.features.shape[1])


def check_feature_layout(
    features: np.ndarray, coords: np.ndarray | None, mask: np.ndarray | None, where: str = "features"
) -> None:
    """Validate the arrays of one file (see the module docstring); raises ValueError naming ``where``."""
    if mask is not None and mask.dtype != np.bool_:
        raise ValueError(f"{where}: mask must be boolean, got dtype {mask.dtype}")
    check_layout_shapes(
        features.shape,
        None if coords is None else coords.shape,
        None if mask is None else mask.shape,
        where,
    )


def check_layout_shapes(
    features: tuple[int, ...],
    coords: tuple[int, ...] | None,
    mask: tuple[int, ...] | None,
    where: str = "features",
) -> None:
    """Shape rules of a feature file: features (N, ...), coords (N, ..., 2), mask (N, ...), prefixes of features."""
    features = tuple(features)
    if len(features) < 2:
        raise ValueError(f"{where}: features must be (N, D) or (N, ...), got shape {features}")
    if coords is not None:
        coords = tuple(coords)
        if len(coords) < 2 or coords[-1] != 2 or not _is_prefix(coords[:-1], features):
            raise ValueError(
                f"{where}: coords of shape {coords} do not fit features of shape {features}; "
                f"expected ({features[0]}, 2) or (N, ..., 2) following the features' leading axes"
            )
    if mask is not None and not _is_prefix(tuple(mask), features):
        raise ValueError(
            f"{where}: mask of shape {tuple(mask)} does not fit features of shape {features}; "
            "its shape must be the features' leading axes, e.g. (M, 256) for (M, 256, 384)"
        )


def _is_prefix(head: tuple[int, ...], shape: tuple[int, ...]) -> bool:
    return len(head) >= 1 and len(head) <= len(shape) and tuple(shape[: len(head)]) == tuple(head)


def normalize_coords(coords: np.ndarray, features_ndim: int) -> np.ndarray:
    """int64 coordinates; (N, 2) for tile features (CLAM's (1, N, 2) and flat layouts reshaped)."""
    coords = np.asarray(coords, dtype=np.int64)
    if features_ndim == 2:
        return coords.reshape(-1, 2)
    return coords


def write_features(
    path: str | os.PathLike[str],
    features: np.ndarray,
    coords: np.ndarray,
    attrs: dict[str, Any] | None = None,
    coords_attrs: dict[str, Any] | None = None,
    *,
    mask: np.ndarray | None = None,
) -> Path:
    """Atomically write a complete feature file (for streaming writes see :mod:`gigaslide.data.feature_writer`).

    Args:
        features: (N, D) tile features or (N, ...) items of any shape.
        coords: (N, 2) or (N, ..., 2) level-0 corners (see the module docstring).
        attrs, coords_attrs: attributes of the ``features`` and ``coords`` datasets.
        mask: optional (N, ...) bool, True = real entry.
    """
    features = np.asarray(features)
    coords = normalize_coords(coords, features.ndim)
    mask = None if mask is None else np.asarray(mask)
    if features.ndim == 2 and coords.shape[0] != features.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates for {features.shape[0]} feature rows")
    check_feature_layout(features, coords, mask, where=str(path))
    fattrs = dict(attrs or {})
    if features.ndim > 2:
        fattrs[ITEM_SHAPE_ATTR] = list(features.shape[1:])
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        fd = f.create_dataset("features", data=features)
        for k, v in fattrs.items():
            fd.attrs[k] = v
        cd = f.create_dataset("coords", data=coords)
        for k, v in (coords_attrs or {}).items():
            cd.attrs[k] = v
        if mask is not None:
            f.create_dataset("mask", data=mask)
    return Path(path)


def read_features(path: str | os.PathLike[str], slide_mpp: float | None = None) -> FeatureBag:
    """Read a feature file: gigaslide/CLAM/TRIDENT ``.h5`` or a CLAM ``.pt`` tensor.

    CLAM's h5 files may store features as (1, N, D); those are squeezed to (N, D) (gigaslide N-D
    files carry an ``item_shape`` attribute and are never squeezed).
    """
    path = Path(path)
    if path.suffix == ".pt":
        import torch

        obj = torch.load(path, map_location="cpu", weights_only=True)
        feats = obj.numpy() if hasattr(obj, "numpy") else np.asarray(obj)
        return FeatureBag(features=_squeeze_clam(feats, path), coords=None, attrs={})
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset (keys: {list(f.keys())})")
            attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            feats = np.asarray(f["features"][:])
            if ITEM_SHAPE_ATTR not in attrs and attrs.get("kind") != "hipt_region_tokens":
                feats = _squeeze_clam(feats, path)  # a HIPT region file with one region stays (1, T, D)
            coords = None
            spec = None
            if "coords" in f:
                coords = normalize_coords(np.asarray(f["coords"][:]), feats.ndim)
                cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
                try:
                    spec = TileSpec.from_attrs(cattrs, slide_mpp=slide_mpp) if cattrs else None
                except (ValueError, KeyError, TypeError):
                    spec = None
            # `gigaslide embed --regions` files name their (M, 256) mask `patch_mask` (data.region_features)
            mask_key = "mask" if "mask" in f else ("patch_mask" if "patch_mask" in f else None)
            mask = np.asarray(f[mask_key][:]) if mask_key else None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 feature file ({e})") from e
    if coords is not None and coords.shape[0] != feats.shape[0]:
        raise ValueError(f"{path}: {coords.shape[0]} coords but {feats.shape[0]} feature rows")
    check_feature_layout(feats, coords, mask, where=str(path))
    return FeatureBag(features=feats, coords=coords, attrs=attrs, spec=spec, mask=mask)


def require_2d(bag: FeatureBag, path: str | os.PathLike[str], purpose: str) -> FeatureBag:
    """``bag`` unchanged when its features are (N, D); otherwise a ValueError naming the file and ``purpose``."""
    if bag.features.ndim != 2:
        raise ValueError(
            f"{path}: features have shape {bag.shape} (items of shape {bag.item_shape}), but {purpose} "
            "needs (N, D) tile features"
        )
    return bag


def _squeeze_clam(feats: np.ndarray, path: Path) -> np.ndarray:
    if feats.ndim == 3 and feats.shape[0] == 1:
        feats = feats[0]
    if feats.ndim < 2:
        raise ValueError(f"{path}: features must be (N, D) or (N, ...), got shape {feats.shape}")
    return feats
