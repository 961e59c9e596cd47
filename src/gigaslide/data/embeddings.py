"""Slide-embedding files: one vector per slide with where it came from, written once, read everywhere.

Layout (HDF5, written atomically)::

    embeddings  (S, E) float32     attrs: model, checkpoint, checkpoint_sha256, feature_encoder,
                                          feature_weights_sha256, random_init, gigaslide_version,
                                          created, + any extra provenance (fold, split, ...)
    slide_ids   (S,) UTF-8 strings  the slide (or case) id of each row

Writers: :func:`gigaslide.train.mil.predict` (through ``gigaslide train --save-embeddings``) and the
methods' encode commands. Readers: ``gigaslide probe --embeddings``, which also accepts ``.npz`` /
``.pt`` / foreign ``.h5`` files holding ``embeddings`` + ``slide_ids``, and a folder of tile-feature
files mean-pooled into one vector per slide (HIPT's mean-embedding baseline); see
:func:`load_slide_embeddings`.
"""

from __future__ import annotations

import hashlib
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from gigaslide.data.features_io import read_features, require_2d
from gigaslide.data.provenance import FeatureProvenance, check_provenance
from gigaslide.data.region_features import REGION_KIND, read_region_features
from gigaslide.preprocess.coords_io import _plain
from gigaslide.utils.atomic import atomic_path

EMBEDDINGS_KEY = "embeddings"
IDS_KEY = "slide_ids"


@dataclass
class SlideEmbeddings:
    """(S, E) slide embeddings, their ids, provenance, and inputs that could not be read."""

    ids: list[str]
    vectors: np.ndarray  # (S, E)
    attrs: dict[str, Any] = field(default_factory=dict)  # provenance (model, checkpoint, ...)
    failed: dict[str, str] = field(default_factory=dict)  # id -> reason (feature folders only)
    provenance: FeatureProvenance | None = None  # encoder and weights of a feature folder (folders only)

    @property
    def dim(self) -> int:
        """Embedding size E."""
        return int(self.vectors.shape[1])

    def __len__(self) -> int:
        return len(self.ids)

    def select(self, ids: Sequence[str]) -> np.ndarray:
        """Rows of ``ids`` in that order, (len(ids), E); a KeyError lists ids that have no embedding."""
        index = {s: i for i, s in enumerate(self.ids)}
        missing = [s for s in ids if s not in index]
        if missing:
            raise KeyError(f"{len(missing)} id(s) have no embedding: {missing[:20]}")
        return self.vectors[[index[s] for s in ids]]


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_embeddings(
    path: str | os.PathLike[str],
    ids: Sequence[str],
    vectors: np.ndarray,
    *,
    model: str,
    checkpoint: str | os.PathLike[str] | None = None,
    checkpoint_sha256: str | None = None,
    feature_encoder: str | None = None,
    feature_weights_sha256: str | None = None,
    random_init: bool = False,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write slide embeddings with their provenance (see the module docstring).

    Args:
        ids: S unique slide (or case) ids.
        vectors: (S, E) finite embeddings.
        model: what produced them (a slide-model registry name, an SSL recipe, ...).
        checkpoint: the weights used; its sha256 is computed when the file exists and
            ``checkpoint_sha256`` is not given.
        feature_encoder, feature_weights_sha256: the tile encoder of the input features.
        random_init: the model (or the feature encoder) had random weights.
        extra: further attributes (fold, split, task, ...): strings, numbers, bools or lists of them.
    """
    from gigaslide import __version__

    path = Path(path)
    ids = [str(s) for s in ids]
    vectors = np.asarray(vectors)
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"{path}: embeddings must be (S, E) for {len(ids)} ids, got shape {vectors.shape}")
    dup = sorted({s for s in ids if ids.count(s) > 1}) if len(set(ids)) != len(ids) else []
    if dup:
        raise ValueError(f"{path}: duplicated id(s) {dup[:20]}; one embedding per slide")
    if vectors.size and not np.isfinite(vectors).all():
        bad = [ids[i] for i in np.flatnonzero(~np.isfinite(vectors).all(axis=1))]
        raise ValueError(f"{path}: non-finite embedding(s) for {bad[:20]}; check the model and its inputs")
    if checkpoint is not None and checkpoint_sha256 is None and Path(checkpoint).is_file():
        checkpoint_sha256 = file_sha256(checkpoint)
    attrs: dict[str, Any] = {
        "model": str(model),
        "checkpoint": "" if checkpoint is None else str(checkpoint),
        "checkpoint_sha256": checkpoint_sha256 or "",
        "feature_encoder": feature_encoder or "",
        "feature_weights_sha256": feature_weights_sha256 or "",
        "random_init": bool(random_init),
        "gigaslide_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    for k, v in (extra or {}).items():
        if k in attrs:
            raise ValueError(f"extra attribute {k!r} would overwrite a provenance field; pass it by name")
        attrs[k] = "" if v is None else v
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        ds = f.create_dataset(EMBEDDINGS_KEY, data=vectors.astype(np.float32, copy=False))
        for k, v in attrs.items():
            ds.attrs[k] = v
        f.create_dataset(IDS_KEY, data=np.array(ids, dtype=object), dtype=h5py.string_dtype("utf-8"))
    return path


def read_embeddings(path: str | os.PathLike[str]) -> SlideEmbeddings:
    """Read an embeddings file: ``.h5`` (gigaslide or ``embeddings`` + ``slide_ids``), ``.npz`` or ``.pt``."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"embeddings file {p} not found")
    attrs: dict[str, Any] = {}
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            obj = {k: z[k] for k in z.files}
    elif p.suffix in (".h5", ".hdf5"):
        try:
            with h5py.File(p, "r") as f:
                obj = {k: f[k][()] for k in f if isinstance(f[k], h5py.Dataset)}
                if EMBEDDINGS_KEY in f:
                    attrs = {k: _plain(v) for k, v in f[EMBEDDINGS_KEY].attrs.items()}
        except OSError as e:
            raise ValueError(f"{p}: not a readable HDF5 file ({e})") from e
    elif p.suffix == ".pt":
        import torch

        loaded = torch.load(p, map_location="cpu", weights_only=True)
        if not isinstance(loaded, dict):
            raise ValueError(
                f"{p}: expected a dict with 'embeddings' and 'slide_ids', got {type(loaded).__name__}"
            )
        obj = {k: (v.numpy() if hasattr(v, "numpy") else v) for k, v in loaded.items()}
    else:
        raise ValueError(f"{p}: unsupported embeddings file (use .h5, .npz, .pt or a feature directory)")
    if EMBEDDINGS_KEY not in obj or IDS_KEY not in obj:
        raise ValueError(f"{p}: needs 'embeddings' (S, E) and 'slide_ids' (S,); found keys {sorted(obj)}")
    vectors = np.asarray(obj[EMBEDDINGS_KEY])
    ids = [s.decode() if isinstance(s, bytes) else str(s) for s in np.asarray(obj[IDS_KEY]).tolist()]
    if vectors.ndim != 2 or vectors.shape[0] != len(ids):
        raise ValueError(f"{p}: embeddings shape {vectors.shape} does not match {len(ids)} slide ids")
    return SlideEmbeddings(ids=ids, vectors=vectors, attrs=attrs)


REGION_LEVELS = ("auto", "vit4k", "vit256")


def _is_region_file(path: Path) -> bool:
    """True for a HIPT region feature file (``features`` attribute kind = hipt_region_tokens)."""
    try:
        with h5py.File(path, "r") as f:
            return "features" in f and _plain(f["features"].attrs.get("kind", "")) == REGION_KIND
    except OSError:
        return False


def _region_mean(path: Path, level: str) -> tuple[np.ndarray, str]:
    """(D,) mean of a HIPT region file's ViT_4096 region tokens or of its real ViT_256 patch tokens."""
    rf = read_region_features(path)
    if rf.n_regions == 0:
        raise ValueError("no regions")
    if level in ("auto", "vit4k") and rf.region_features is not None:
        return rf.region_features.astype(np.float64).mean(axis=0), "vit4k"  # (192,)
    if level == "vit4k":
        raise ValueError(
            f"{path}: no ViT_4096 region tokens (region_features) in this region file; embed the regions "
            "with `gigaslide embed ... --regions --vit4k-weights vit4k_xs_dino.pth`, or pool the ViT_256 "
            "patch tokens with region level 'vit256'"
        )
    tokens = rf.features[rf.patch_mask]  # (P, 384) patches inside the slide
    if tokens.shape[0] == 0:
        raise ValueError("no patch inside the slide")
    return tokens.astype(np.float64).mean(axis=0), "vit256"


def mean_pooled_features(
    folder: str | os.PathLike[str], allow_mixed: bool = False, region_level: str = "auto"
) -> SlideEmbeddings:
    """One embedding per slide: the mean of its (N, D) tile features (``*.h5``/``*.pt``, also under ``h5_files/``).

    HIPT region folders (``gigaslide embed --regions``) pool per ``region_level``, as HIPT's KNN
    evaluation averages a slide's pre-extracted embeddings: ``vit4k`` = the mean ViT_4096 region token
    (M, 192) -> (192,); ``vit256`` = the mean ViT_256 token over the patches inside the slide (padding
    excluded) -> (384,); ``auto`` = ``vit4k`` when the files hold region tokens, else ``vit256``.
    Unreadable or empty feature files are skipped, warned about and listed in ``failed``. A folder
    mixing encoders or weights is refused unless ``allow_mixed`` (:func:`check_provenance`).
    """
    if region_level not in REGION_LEVELS:
        raise ValueError(f"region_level must be one of {REGION_LEVELS}, got {region_level!r}")
    p = Path(folder)
    d = p / "h5_files" if (p / "h5_files").is_dir() else p
    files = sorted(d.glob("*.h5")) or sorted(
        (p / "pt_files").glob("*.pt") if (p / "pt_files").is_dir() else d.glob("*.pt")
    )
    files = [f for f in files if not f.name.startswith(".")]  # partial files of a running embed job
    if not files:
        raise FileNotFoundError(f"{p}: no .h5/.pt feature files found (expected <slide_id>.h5 per slide)")
    rows, ids, failed = [], [], {}
    levels: set[str] = set()
    for f in files:
        try:
            if f.suffix == ".h5" and _is_region_file(f):
                row, level = _region_mean(f, region_level)
                levels.add(level)
                if region_level == "auto" and level != next(iter(levels)):
                    raise ValueError(
                        f"{f}: region tokens of other files of the folder are ViT_4096 but not this one's "
                        "(or the reverse); pass region level 'vit256' to pool ViT_256 tokens everywhere"
                    )
                rows.append(row)
                ids.append(f.stem)
                continue
            feats = require_2d(read_features(f), f, "mean-pooled slide embeddings").features
            if feats.shape[0] == 0:
                raise ValueError("no tiles")
            rows.append(feats.astype(np.float64).mean(axis=0))  # (D,)
            ids.append(f.stem)
        except (ValueError, OSError, RuntimeError) as e:
            failed[f.stem] = str(e) if str(f) in str(e) else f"{f}: {e}"
    if failed:
        warnings.warn(
            f"{len(failed)} feature file(s) unreadable, skipped: {sorted(failed)[:20]}", stacklevel=2
        )
    if not rows:
        raise ValueError(f"{p}: none of the {len(files)} feature files could be read")
    dims = {r.shape[0] for r in rows}
    if len(dims) > 1:
        raise ValueError(f"{p}: feature files disagree on the embedding dimension: {sorted(dims)}")
    read_ok = {f.stem: f for f in files if f.stem not in failed}
    provenance = check_provenance(read_ok, allow_mixed=allow_mixed, source=str(p))
    attrs = {"model": "mean_pool", "features_dir": str(p)}
    if levels:
        attrs["region_level"] = ",".join(sorted(levels))
    return SlideEmbeddings(ids=ids, vectors=np.stack(rows), attrs=attrs, failed=failed, provenance=provenance)


def load_slide_embeddings(
    path: str | os.PathLike[str], allow_mixed: bool = False, region_level: str = "auto"
) -> SlideEmbeddings:
    """An embeddings file (:func:`read_embeddings`) or a feature folder mean-pooled per slide
    (``allow_mixed``: accept a folder mixing encoders or weights; ``region_level``: see
    :func:`mean_pooled_features`)."""
    p = Path(path)
    if p.is_dir():
        return mean_pooled_features(p, allow_mixed=allow_mixed, region_level=region_level)
    return read_embeddings(p)
