"""Convert tile-feature folders between gigaslide, CLAM and TRIDENT layouts.

Layouts::

    gigaslide  OUT/h5_files/<slide>.h5 (features, coords + attrs) [+ pt_files/] + manifest.csv
    clam       OUT/h5_files/<slide>.h5 (features, coords) + OUT/pt_files/<slide>.pt (N, D) tensor
    trident    OUT/features_<encoder>/<slide>.h5 (features, coords; coords attrs patch_size,
               patch_size_level0, target_magnification, level0_magnification, overlap ...)

N-D feature files (``features`` (N, ...), optional ``mask``) convert only into the gigaslide
layout; CLAM and TRIDENT hold (N, D) tile features, and such a file is refused with the reason.
Features (values and dtype) and coordinates are copied exactly; attributes are kept, and the
tile-spec attributes are rewritten in the target's conventions (TRIDENT's ``patch_size`` is
the tile size at the target magnification, CLAM's the size read at ``patch_level``).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from gigaslide.data.features_io import (
    ITEM_SHAPE_ATTR,
    check_feature_layout,
    normalize_coords,
    write_features,
)
from gigaslide.preprocess.coords_io import (
    _plain,
    _with_inferred_stride,
    coords_filename,
    layout_attrs,
)
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FORMATS = ("gigaslide", "clam", "trident")


class ConvertError(ValueError):
    """The source folder is not a recognised feature layout; the message says what was expected."""


@dataclass
class FeatureSource:
    """Feature files found in a source folder."""

    layout: str  # "h5_files" (gigaslide/CLAM) or "trident"
    files: dict[str, Path]  # slide_id -> .h5
    encoder: str | None = None  # from a TRIDENT folder name


@dataclass
class ConvertSummary:
    """Files written and per-slide failures of :func:`convert_features`."""

    out_dir: Path
    written: dict[str, Path] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)


def find_feature_files(src: str | os.PathLike[str], encoder: str | None = None) -> FeatureSource:
    """Locate the feature files of a gigaslide/CLAM (``h5_files/``) or TRIDENT (``features_<enc>/``) folder."""
    root = Path(src)
    if not root.is_dir():
        raise ConvertError(f"{root}: not a folder of features")

    def listing(d: Path) -> dict[str, Path]:
        return {p.stem: p for p in sorted(d.glob("*.h5")) if not p.name.startswith(".")}

    if (root / "h5_files").is_dir():
        return FeatureSource("h5_files", listing(root / "h5_files"))
    if (root / "pt_files").is_dir():
        raise ConvertError(
            f"{root}: only pt_files/ found; CLAM .pt files hold no tile coordinates, so the h5_files/ "
            "folder written next to them is needed"
        )
    if root.name.startswith("features_"):
        return FeatureSource("trident", listing(root), encoder or root.name[len("features_") :])
    dirs = sorted(d for d in root.glob("features_*") if d.is_dir())
    if encoder is not None:
        dirs = [d for d in dirs if d.name == f"features_{encoder}"]
    if len(dirs) == 1:
        return FeatureSource("trident", listing(dirs[0]), dirs[0].name[len("features_") :])
    if len(dirs) > 1:
        names = ", ".join(d.name for d in dirs)
        raise ConvertError(f"{root}: several TRIDENT feature folders ({names}); choose one with --encoder")
    if listing(root):
        return FeatureSource("trident", listing(root), encoder)
    raise ConvertError(
        f"{root}: no features found; expected h5_files/ (gigaslide, CLAM) or features_<encoder>/ (TRIDENT)"
    )


def _read(path: Path) -> tuple[np.ndarray, np.ndarray, dict[str, Any], dict[str, Any], np.ndarray | None]:
    """(features (N, D) or (N, ...), coords int64, features attrs, coords attrs, mask or None) of one file."""
    try:
        with h5py.File(path, "r") as f:
            if "features" not in f or "coords" not in f:
                raise ValueError(f"{path}: needs `features` and `coords` datasets (has {list(f.keys())})")
            feats = np.asarray(f["features"][:])
            coords = np.asarray(f["coords"][:])
            fattrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
            cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            mask = np.asarray(f["mask"][:]) if "mask" in f else None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 feature file ({e})") from e
    if ITEM_SHAPE_ATTR not in fattrs and feats.ndim == 3 and feats.shape[0] == 1:  # CLAM (1, N, D)
        feats = feats[0]
        if coords.ndim == 3 and coords.shape[0] == 1:
            coords = coords[0]
    coords = normalize_coords(coords, feats.ndim)
    if coords.shape[0] != feats.shape[0]:
        raise ValueError(f"{path}: {coords.shape[0]} coords but {feats.shape[0]} feature rows")
    check_feature_layout(feats, coords, mask, where=str(path))
    return feats, coords, fattrs, cattrs, mask


def _spec_of(cattrs: dict[str, Any], coords: np.ndarray | None = None, slide_mpp: float | None = None):
    """The tile spec behind coordinate attributes: gigaslide's exact one, else rebuilt from CLAM/TRIDENT's."""
    if "gigaslide_spec" in cattrs:
        return TileSpec.from_dict(json.loads(cattrs["gigaslide_spec"]))
    try:
        spec = TileSpec.from_attrs(cattrs, slide_mpp=slide_mpp)
    except (ValueError, KeyError, TypeError):
        return None  # unknown attributes: copied as they are
    if spec.extra.get("source") == "clam" and coords is not None:
        spec = _with_inferred_stride(spec, coords)
    return spec


# attributes that belong to one layout's meaning of ``patch_size`` and must not survive a conversion
_LAYOUT_KEYS = {
    "patch_size", "patch_level", "downsample", "downsampled_level_dim", "level_dim", "level0_dim",
    "patch_size_level0", "target_magnification", "level0_magnification", "overlap", "level0_width",
    "level0_height", "tile_size", "stride", "target_mpp", "slide_mpp", "level0_stride", "gigaslide_spec",
    "custom_downsample",
}  # fmt: skip


def coords_attrs_for(
    cattrs: dict[str, Any],
    to: str,
    name: str | None = None,
    coords: np.ndarray | None = None,
    slide_mpp: float | None = None,
) -> dict[str, Any]:
    """Coordinate attributes rewritten in the conventions of ``to`` (see :mod:`gigaslide.preprocess.coords_io`).

    The spec comes from gigaslide's JSON, or is rebuilt from CLAM's or TRIDENT's attributes (the
    CLAM stride from ``coords``); the other layout's attributes are dropped, the rest kept.
    """
    spec = _spec_of(cattrs, coords, slide_mpp)
    if spec is None:
        out = dict(cattrs)
    else:
        layout = "trident" if to == "trident" else "gigaslide"
        out = {k: v for k, v in cattrs.items() if k not in _LAYOUT_KEYS}
        out.update(layout_attrs(spec, layout))
    if name is not None:
        out["name"] = name  # CLAM's StitchCoords and TRIDENT read it
    return out


def _clean(attrs: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if v is not None}


def convert_features(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    encoder: str | None = None,
    slide_ids: set[str] | None = None,
) -> ConvertSummary:
    """Convert every feature file of ``src`` into layout ``to`` under ``dst``.

    Args:
        src: a gigaslide/CLAM folder (``h5_files/``) or a TRIDENT folder (``features_<enc>/`` or its parent).
        dst: output folder.
        to: ``gigaslide``, ``clam`` or ``trident``.
        encoder: encoder name (TRIDENT folder name); default from the files' ``encoder`` attribute.
        slide_ids: convert only these slides (None = all).
    """
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    source = find_feature_files(src, encoder=encoder)
    files = {k: v for k, v in source.files.items() if slide_ids is None or k in slide_ids}
    if not files:
        raise ConvertError(f"{src}: no feature files to convert" + (" for --slides" if slide_ids else ""))
    out = Path(dst)
    summary = ConvertSummary(out_dir=out)
    rows: list[dict[str, Any]] = []
    for sid, path in files.items():
        try:
            feats, coords, fattrs, cattrs, mask = _read(path)
            if to != "gigaslide" and (feats.ndim != 2 or mask is not None):
                what = f"features of shape {feats.shape}" if feats.ndim != 2 else "a mask dataset"
                raise ValueError(
                    f"{path}: {what}; the {to.upper()} layout holds (N, D) tile features only, so this file "
                    "cannot be converted to it (keep it in the gigaslide layout: --to gigaslide)"
                )
            enc = encoder or fattrs.get("encoder") or source.encoder
            if enc and "encoder" not in fattrs:
                fattrs["encoder"] = enc
            cattrs = coords_attrs_for(cattrs, to, name=sid, coords=coords.reshape(-1, 2))
            if to == "trident":
                if not enc:
                    raise ValueError(f"{path}: the encoder name is unknown; pass --encoder")
                target = out / f"features_{enc}" / f"{sid}.h5"
                fattrs = {**fattrs, "name": sid, "savetodir": str(target.parent), "encoder": enc}
            else:
                target = out / "h5_files" / f"{sid}.h5"
            fattrs.pop(ITEM_SHAPE_ATTR, None)  # rewritten by write_features for N-D files
            write_features(target, feats, coords, _clean(fattrs), _clean(cattrs), mask=mask)
            if to == "clam":
                pt = out / "pt_files" / f"{sid}.pt"
                with atomic_path(pt) as tmp:
                    torch.save(torch.from_numpy(np.ascontiguousarray(feats)), tmp)
            summary.written[sid] = target
            dim = "x".join(map(str, feats.shape[1:]))  # D, or e.g. 256x384 for N-D items
            rows.append({"slide_id": sid, "status": "done", "n_tiles": len(feats), "dim": dim,
                         "error": "", "features_file": str(target)})  # fmt: skip
        except Exception as e:
            log.error("%s: %s", sid, e)
            summary.failed[sid] = f"{type(e).__name__}: {e}"
            rows.append({"slide_id": sid, "status": "failed", "n_tiles": "", "dim": "",
                         "error": summary.failed[sid], "features_file": ""})  # fmt: skip
    if to == "gigaslide":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(out / "manifest.csv", buf.getvalue())
    return summary


# -- coordinate folders ----------------------------------------------------------------------
def find_coords_files(src: str | os.PathLike[str]) -> dict[str, Path]:
    """slide_id -> coordinate file of a tiling output, CLAM or TRIDENT folder (``patches/`` or the folder itself).

    TRIDENT's ``<id>_patches.h5`` names give the slide id ``<id>``.
    """
    root = Path(src)
    pdir = root / "patches" if (root / "patches").is_dir() else root
    files: dict[str, Path] = {}
    for p in sorted(pdir.glob("*.h5")):
        if p.name.startswith("."):
            continue
        sid = p.stem[: -len("_patches")] if p.stem.endswith("_patches") else p.stem
        files[sid] = p
    return files


def _read_coords_raw(path: Path) -> tuple[np.ndarray, dict[str, Any], np.ndarray | None]:
    """(coords (N, 2) int64, coords attrs (file attrs merged), tissue fractions or None) of one file."""
    try:
        with h5py.File(path, "r") as f:
            if "coords" not in f:
                raise ValueError(f"{path}: no `coords` dataset (has {list(f.keys())})")
            if "features" in f:
                raise ValueError(f"{path}: a feature file, not a coordinate file")
            coords = np.asarray(f["coords"][:])
            attrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            for k, v in f.attrs.items():
                attrs.setdefault(k, _plain(v))
            tf = np.asarray(f["tissue_fraction"][:]) if "tissue_fraction" in f else None
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 coordinate file ({e})") from e
    return coords.astype(np.int64, copy=False).reshape(-1, 2), attrs, tf


def convert_coords(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    slide_mpp: float | None = None,
    slide_ids: set[str] | None = None,
) -> ConvertSummary:
    """Convert a folder of coordinate files (tiling output, CLAM or TRIDENT) into layout ``to``.

    Writes ``DST/patches/<id>.h5`` (gigaslide, CLAM) or ``DST/patches/<id>_patches.h5`` (TRIDENT),
    coordinates copied exactly, attributes in the target's meaning (see
    :mod:`gigaslide.preprocess.coords_io`). CLAM files store no resolution: converting them to
    TRIDENT needs ``slide_mpp`` (TRIDENT's magnifications come from it).
    """
    if to not in FORMATS:
        raise ValueError(f"--to must be one of {', '.join(FORMATS)}, got {to!r}")
    files = {k: v for k, v in find_coords_files(src).items() if slide_ids is None or k in slide_ids}
    if not files:
        raise ConvertError(
            f"{src}: no coordinate files found; expected patches/*.h5 (gigaslide, CLAM) or "
            "patches/*_patches.h5 (TRIDENT)" + (" for --slides" if slide_ids else "")
        )
    out = Path(dst)
    summary = ConvertSummary(out_dir=out)
    layout = "trident" if to == "trident" else "gigaslide"
    for sid, path in files.items():
        try:
            coords, cattrs, tf = _read_coords_raw(path)
            attrs = coords_attrs_for(cattrs, to, name=sid, coords=coords, slide_mpp=slide_mpp)
            if to == "trident" and "level0_magnification" not in attrs:
                raise ValueError(
                    f"{path}: the coordinates store no physical resolution (CLAM), and TRIDENT files need "
                    "the slide's magnification; pass --slide-mpp UM_PER_PX"
                )
            if to != "trident" and "patch_level" not in attrs:
                raise ValueError(f"{path}: unrecognised coordinate attributes {sorted(cattrs)}")
            target = out / "patches" / coords_filename(sid, layout)
            with atomic_path(target) as tmp, h5py.File(tmp, "w") as f:
                ds = f.create_dataset("coords", data=coords)
                for k, v in _clean(attrs).items():
                    ds.attrs[k] = v
                if tf is not None:
                    f.create_dataset("tissue_fraction", data=tf)
            summary.written[sid] = target
        except Exception as e:
            log.error("%s: %s", sid, e)
            summary.failed[sid] = f"{type(e).__name__}: {e}"
    return summary


def convert_folder(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    to: str,
    *,
    encoder: str | None = None,
    slide_mpp: float | None = None,
    slide_ids: set[str] | None = None,
) -> ConvertSummary:
    """Convert a feature folder (:func:`convert_features`) or a coordinate folder (:func:`convert_coords`)."""
    root = Path(src)
    is_features = (root / "h5_files").is_dir() or (root / "pt_files").is_dir()
    is_features |= root.name.startswith("features_") or any(root.glob("features_*"))
    if not is_features and find_coords_files(root):
        return convert_coords(root, dst, to, slide_mpp=slide_mpp, slide_ids=slide_ids)
    return convert_features(root, dst, to, encoder=encoder, slide_ids=slide_ids)
