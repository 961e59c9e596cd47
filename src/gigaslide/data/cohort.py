"""`Cohort`: a label CSV joined with a folder of tile-feature files, validated up front.

Label CSV columns (read by :func:`gigaslide.data.labels.read_labels`, the reader `probe` uses too):
``slide_id``, ``case_id`` and either ``label`` (classification) or ``time`` + ``event`` (survival;
``event`` 1 = death/progression observed, 0 = censored).
Features: ``DIR/h5_files/<slide_id>.h5`` as written by ``gigaslide embed`` (CLAM layout), or
``DIR/<slide_id>.h5`` / ``DIR/<slide_id>.pt`` / ``DIR/pt_files/<slide_id>.pt`` directly.
Files hold (N, D) tile features or N items of another shape (HIPT region grids (M, 256, 384));
every file of a cohort has the same per-item shape, :attr:`Cohort.item_shape`, and
:attr:`Cohort.dim` is its last axis (the feature size a slide model is built for).

Every problem found (missing columns, duplicate ids, slides without features, unknown labels,
NaN/inf features, empty bags, conflicting labels within a case) raises :class:`CohortError`
naming the file and listing the offending ids (the first 20 and the total count).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import pandas as pd

from gigaslide.data.features_io import ITEM_SHAPE_ATTR, FeatureBag, read_features
from gigaslide.data.labels import format_ids, read_labels
from gigaslide.data.provenance import check_provenance
from gigaslide.preprocess.coords_io import _plain

log = logging.getLogger(__name__)

CACHE_MODES = ("memory", "lazy", "mmap")


class CohortError(ValueError):
    """Invalid cohort input; the message names the file, the offending ids and the fix."""


@dataclass(frozen=True)
class Sample:
    """One training unit: a slide, or all slides of a case for case-level bags."""

    sample_id: str  # slide_id, or case_id for case-level bags
    case_id: str
    slide_ids: tuple[str, ...]
    label: int | None = None
    time: float | None = None
    event: int | None = None


def find_feature_file(features_dir: Path, slide_id: str) -> Path | None:
    """The feature file of ``slide_id`` under ``features_dir`` (h5 preferred over pt), or None."""
    for cand in (
        features_dir / "h5_files" / f"{slide_id}.h5",
        features_dir / f"{slide_id}.h5",
        features_dir / "pt_files" / f"{slide_id}.pt",
        features_dir / f"{slide_id}.pt",
    ):
        if cand.is_file():
            return cand
    return None


def _map_labels(
    raw: pd.Series, slide_ids: pd.Series, classes: Sequence[str] | None, labels_path: Path
) -> tuple[np.ndarray, list[str]]:
    """Map label strings to class indices. Without ``classes``: integers keep their numeric order,
    other strings are sorted alphabetically."""
    values = raw.astype(str).str.strip()
    if classes is not None:
        names = [str(c) for c in classes]
        if len(set(names)) != len(names):
            raise CohortError(f"--classes has duplicates: {names}")
    else:
        uniq = sorted(set(values))
        try:
            names = [str(v) for v in sorted(uniq, key=lambda s: float(s))]
            # "1.0" and "1" are the same class for a numeric column written by pandas
            if all(float(v).is_integer() for v in names):
                names = sorted({str(int(float(v))) for v in names}, key=int)
                values = values.map(lambda s: str(int(float(s))))
        except ValueError:
            names = uniq
    index = {n: i for i, n in enumerate(names)}
    unknown = values[~values.isin(list(index))]
    if len(unknown):
        bad = slide_ids[~values.isin(list(index))]
        raise CohortError(
            f"{labels_path}: {len(unknown)} slide(s) have labels outside the classes {names} "
            f"(labels {sorted(set(unknown))}): slide_id {format_ids(bad)}. "
            "Fix the CSV or pass the full --classes list."
        )
    present = sorted(set(values))
    if len(present) == 1:
        raise CohortError(
            f"{labels_path}: every slide has the label {present[0]!r}: classification needs at least "
            "two classes; add slides of another class or fix the label column"
        )
    return values.map(index).to_numpy(dtype=np.int64), names


def read_label_table(
    labels_path: str | os.PathLike[str], task: str = "classification", label_col: str = "label"
) -> pd.DataFrame:
    """The validated label table of a CSV: ``slide_id``, ``case_id`` and ``label`` (as text) or
    ``time`` + ``event``; errors (:class:`CohortError`) name the file, the rows and the fix. The one
    reader is :func:`gigaslide.data.labels.read_labels` (also used by `gigaslide probe`)."""
    return read_labels(labels_path, task, label_col, error=CohortError)


class Cohort:
    """Validated slides with labels or outcomes and their tile features.

    Args:
        labels_csv: the label CSV.
        features_dir: folder of feature files (see module docstring).
        task: ``"classification"`` or ``"survival"``.
        classes: ordered class names; labels outside it are an error. Default: all labels seen.
        cache: ``"memory"`` (load every bag once), ``"lazy"`` (read on access) or ``"mmap"``
            (memory-map contiguous HDF5 datasets; falls back to reading for chunked/compressed ones).
        check_values: scan every bag for NaN/inf values and empty bags at construction.
        label_col: the class column of ``labels_csv`` (classification); read into ``label``.
        allow_mixed_features: accept feature files from different encoders/weights (refused by
            default, see :mod:`gigaslide.data.provenance`); ``self.provenance`` records them.
    """

    def __init__(
        self,
        labels_csv: str | os.PathLike[str],
        features_dir: str | os.PathLike[str],
        task: str = "classification",
        classes: Sequence[str] | None = None,
        cache: str = "memory",
        check_values: bool = True,
        label_col: str = "label",
        allow_mixed_features: bool = False,
    ) -> None:
        if task not in ("classification", "survival"):
            raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
        if cache not in CACHE_MODES:
            raise ValueError(f"cache must be one of {CACHE_MODES}, got {cache!r}")
        self.labels_path = Path(labels_csv)
        self.features_dir = Path(features_dir)
        self.task = task
        self.cache = cache
        self.label_col = label_col
        if not self.labels_path.is_file():
            raise CohortError(f"{self.labels_path}: label CSV not found")
        if not self.features_dir.is_dir():
            raise CohortError(f"{self.features_dir}: features directory not found")
        table = self._read_table()
        self.class_names: list[str] | None = None
        if task == "classification":
            labels, self.class_names = _map_labels(
                table["label"], table["slide_id"], classes, self.labels_path
            )
            table["label"] = labels
        table["path"] = [find_feature_file(self.features_dir, s) for s in table["slide_id"]]
        missing = table.loc[table["path"].isna(), "slide_id"]
        if len(missing):
            raise CohortError(
                f"{self.labels_path}: {len(missing)} slide(s) have no feature file in {self.features_dir} "
                f"(looked for h5_files/<id>.h5, <id>.h5, pt_files/<id>.pt, <id>.pt): slide_id "
                f"{format_ids(missing)}. Run `gigaslide embed` on them or drop them from the CSV."
            )
        self.table = table.reset_index(drop=True)
        self._index = {s: i for i, s in enumerate(self.table["slide_id"])}
        self._cache: dict[str, FeatureBag] = {}
        self.dim = self._check_bags(check_values)
        self.provenance = check_provenance(
            dict(zip(self.table["slide_id"], self.table["path"])),
            allow_mixed=allow_mixed_features,
            source=str(self.features_dir),
        )

    # -- construction helpers ---------------------------------------------------------------
    def _read_table(self) -> pd.DataFrame:
        return read_label_table(self.labels_path, self.task, self.label_col)

    def _check_bags(self, check_values: bool) -> int:
        """Validate every bag (dimension, emptiness, finiteness); load into memory when caching."""
        empty, nonfinite, unreadable, dims = [], [], [], {}
        for sid, path in zip(self.table["slide_id"], self.table["path"]):
            try:
                if self.cache == "memory" or check_values:
                    bag = self._read(sid, path)
                    n, d = bag.n_tiles, bag.item_shape
                    if check_values and n and not _all_finite(bag.features):
                        nonfinite.append(sid)
                    if self.cache == "memory":
                        self._cache[sid] = bag
                else:
                    n, d = _peek_shape(path)
            except (ValueError, OSError, RuntimeError) as e:
                unreadable.append(f"{sid} ({e})")
                continue
            if n == 0:
                empty.append(sid)
            dims.setdefault(d, []).append(sid)
        if unreadable:
            raise CohortError(f"{self.features_dir}: unreadable feature file(s): {format_ids(unreadable)}")
        if empty:
            raise CohortError(
                f"{self.features_dir}: empty bag(s) (0 tiles, e.g. no tissue found) for slide_id "
                f"{format_ids(empty)}; drop them from {self.labels_path} or re-tile with a lower min_tissue."
            )
        if nonfinite:
            raise CohortError(
                f"{self.features_dir}: NaN/inf feature values in slide_id {format_ids(nonfinite)}; "
                "re-run `gigaslide embed` for them (check the encoder precision)."
            )
        if len(dims) > 1:
            detail = "; ".join(f"dim {_shape_text(d)}: {format_ids(ids, 5)}" for d, ids in dims.items())
            raise CohortError(f"{self.features_dir}: feature files disagree on the dimension: {detail}")
        self.item_shape: tuple[int, ...] = tuple(next(iter(dims)))
        return int(self.item_shape[-1])

    def _read(self, slide_id: str, path: Path) -> FeatureBag:
        if self.cache == "mmap" and path.suffix == ".h5":
            mapped = _mmap_h5(path)
            if mapped is not None:
                return mapped
        return read_features(path)

    # -- access -------------------------------------------------------------------------------
    @property
    def slide_ids(self) -> list[str]:
        return list(self.table["slide_id"])

    def __len__(self) -> int:
        return len(self.table)

    def load(self, slide_id: str) -> FeatureBag:
        """Features (N, D) or (N, ...) and coords of one slide (from the cache when in memory)."""
        if slide_id in self._cache:
            return self._cache[slide_id]
        if slide_id not in self._index:
            raise KeyError(f"slide {slide_id!r} is not in cohort {self.labels_path}")
        path = self.table.at[self._index[slide_id], "path"]
        bag = self._read(slide_id, path)
        if bag.n_tiles == 0:
            raise CohortError(f"{path}: empty bag for slide {slide_id}")
        return bag

    def label_map(self) -> dict[str, int]:
        """Class name -> index (empty for survival)."""
        return {n: i for i, n in enumerate(self.class_names or [])}

    @property
    def n_classes(self) -> int:
        return len(self.class_names or [])

    def samples(self, case_level: bool = False) -> list[Sample]:
        """Training units in CSV order: one per slide, or one per case (all its slides) when ``case_level``.

        Case-level bags require every slide of a case to share its label (or time and event).
        """
        t = self.table
        if not case_level:
            return [
                self._sample(row["slide_id"], row["case_id"], (row["slide_id"],), row)
                for _, row in t.iterrows()
            ]
        cols = ["label"] if self.task == "classification" else ["time", "event"]
        conflicting = [c for c, g in t.groupby("case_id", sort=False) if len(g[cols].drop_duplicates()) > 1]
        if conflicting:
            raise CohortError(
                f"{self.labels_path}: case-level bags need one {'/'.join(cols)} per case, but these cases have "
                f"slides with conflicting values: case_id {format_ids(conflicting)}. Fix the CSV or train "
                "slide-level (without --case-level)."
            )
        out = []
        for case, g in t.groupby("case_id", sort=False):
            out.append(self._sample(case, case, tuple(g["slide_id"]), g.iloc[0]))
        return out

    def _sample(self, sample_id: str, case_id: str, slides: tuple[str, ...], row: pd.Series) -> Sample:
        if self.task == "classification":
            return Sample(str(sample_id), str(case_id), slides, label=int(row["label"]))
        return Sample(str(sample_id), str(case_id), slides, time=float(row["time"]), event=int(row["event"]))

    def __repr__(self) -> str:
        return (
            f"Cohort({self.labels_path.name}, task={self.task}, slides={len(self)}, "
            f"cases={self.table['case_id'].nunique()}, dim={self.dim}, classes={self.class_names})"
        )


def _all_finite(x: np.ndarray, chunk: int = 65536) -> bool:
    """True when every value of (N, D) ``x`` is finite; scans in row chunks to bound memory."""
    return all(bool(np.isfinite(x[i : i + chunk]).all()) for i in range(0, x.shape[0], chunk))


def _shape_text(item_shape: tuple[int, ...]) -> str:
    return "x".join(map(str, item_shape))


def _peek_shape(path: Path) -> tuple[int, tuple[int, ...]]:
    """(N, item shape) of a feature file without reading the data (h5 only; .pt files are read)."""
    if path.suffix == ".h5":
        with h5py.File(path, "r") as f:
            if "features" not in f:
                raise ValueError(f"{path}: no 'features' dataset")
            shape = f["features"].shape
            fattrs = f["features"].attrs
            nd_file = ITEM_SHAPE_ATTR in fattrs or _plain(fattrs.get("kind", "")) == "hipt_region_tokens"
        if len(shape) == 3 and shape[0] == 1 and not nd_file:
            shape = shape[1:]
        if len(shape) < 2:
            raise ValueError(f"{path}: features must be (N, D) or (N, ...), got {tuple(shape)}")
        return int(shape[0]), tuple(int(s) for s in shape[1:])
    bag = read_features(path)
    return bag.n_tiles, bag.item_shape


def _mmap_h5(path: Path) -> FeatureBag | None:
    """Memory-map a contiguous, uncompressed ``features`` dataset; None when the layout does not allow it."""
    with h5py.File(path, "r") as f:
        ds = f["features"]
        offset = ds.id.get_offset()
        if offset is None or ds.chunks is not None or ds.compression is not None or ds.ndim != 2:
            return None
        shape, dtype = ds.shape, ds.dtype
    bag = read_features_coords_only(path)
    feats = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
    return FeatureBag(features=feats, coords=bag.coords, attrs=bag.attrs, spec=bag.spec)


def read_features_coords_only(path: Path) -> FeatureBag:
    """Coordinates and attributes of a feature file with an empty (0, D) feature placeholder."""
    from gigaslide.preprocess.coords_io import _plain
    from gigaslide.preprocess.tiling_spec import TileSpec

    with h5py.File(path, "r") as f:
        attrs = {k: _plain(v) for k, v in f["features"].attrs.items()}
        coords, spec = None, None
        if "coords" in f:
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            try:
                spec = TileSpec.from_attrs(cattrs) if cattrs else None
            except (ValueError, KeyError, TypeError):
                spec = None
        dim = int(f["features"].shape[-1])
    return FeatureBag(features=np.zeros((0, dim), np.float32), coords=coords, attrs=attrs, spec=spec)
