"""Coordinate files: HDF5 with a `coords` (N, 2) int64 dataset of level-0 top-left corners.

Two layouts, because CLAM and TRIDENT give ``patch_size`` different meanings and one file
cannot carry both:

* ``gigaslide`` (= CLAM): ``patches/<name>.h5``; ``patch_size`` is the size read at
  ``patch_level`` (CLAM's ``Whole_Slide_Bag_FP`` reads ``read_region(xy, patch_level,
  (patch_size, patch_size))``), plus ``downsample``, ``level_dim``, ``name``.
* ``trident``: ``patches/<name>_patches.h5``; ``patch_size`` is the tile size at the target
  resolution, ``level0_magnification``/``target_magnification`` give the level-0 size,
  ``patch_size_level0``, ``level0_width``/``level0_height``, ``name``.

Both carry gigaslide's own attributes (``target_mpp``, ``stride``, the full spec as JSON in
``gigaslide_spec``). Files written by CLAM and TRIDENT themselves load too: a CLAM file stores
no step, so the stride is inferred from the coordinates; a TRIDENT file's nominal
magnification is used for the mpp only when the caller has no slide mpp.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path

LAYOUTS = ("gigaslide", "clam", "trident")


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


def layout_attrs(spec: TileSpec, layout: str = "gigaslide", name: str | None = None) -> dict[str, Any]:
    """The ``coords`` attributes of ``spec`` in ``layout`` (gigaslide = CLAM, or trident)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    attrs = spec.trident_attrs() if layout == "trident" else spec.to_attrs()
    if name is not None:
        attrs["name"] = name  # CLAM's StitchCoords and TRIDENT read it
    return attrs


def coords_filename(slide_id: str, layout: str = "gigaslide") -> str:
    """``<id>.h5`` (gigaslide, CLAM) or ``<id>_patches.h5`` (TRIDENT's Processor looks for that)."""
    return f"{slide_id}_patches.h5" if layout == "trident" else f"{slide_id}.h5"


def write_coords(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    spec: TileSpec,
    tissue_fraction: np.ndarray | None = None,
    extra_attrs: dict[str, Any] | None = None,
    layout: str = "gigaslide",
) -> Path:
    """Atomically write a coordinate file in ``layout`` (see the module docstring); returns its path."""
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    attrs = layout_attrs(spec, layout)
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        for key, value in {**attrs, **(extra_attrs or {})}.items():
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
    if spec.extra.get("source") == "clam":
        spec = _with_inferred_stride(spec, coords)
    return CoordsFile(coords=coords, spec=spec, attrs=attrs, tissue_fraction=tf)


def inferred_step(coords: np.ndarray) -> int | None:
    """The grid step (level-0 px) of a regular grid of corners: the smallest gap between distinct x or y.

    None when the coordinates have a single row and column (nothing to infer from).
    """
    gaps = []
    for axis in (0, 1):
        values = np.unique(np.asarray(coords)[:, axis]) if len(coords) else np.zeros(0)
        if len(values) > 1:
            gaps.append(int(np.diff(values).min()))
    return min(gaps) if gaps else None


def _with_inferred_stride(spec: TileSpec, coords: np.ndarray) -> TileSpec:
    """CLAM stores no step size (``--step_size 128`` at level 1 is a 256 level-0 px step): infer it."""
    step0 = inferred_step(coords)
    if step0 is None or step0 >= spec.level0_size:
        return spec  # no overlap (or a sparse grid): CLAM's default step = patch size
    stride = max(1, round(step0 / spec.read_downsample))
    if not math.isclose(stride * spec.read_downsample, step0, abs_tol=1.0):
        return spec  # not a step at patch_level: gaps from dropped tiles, not a stride
    return replace(spec, stride=int(stride), level0_stride=float(step0))
