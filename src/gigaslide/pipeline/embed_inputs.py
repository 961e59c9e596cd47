"""Which slides an embedding run covers: a tiling output or a CLAM/TRIDENT patches folder.

:func:`discover_jobs` pairs every coordinate file with its slide file and returns the jobs
sorted by slide id, identically on every torchrun rank.
"""

from __future__ import annotations

import csv
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py

from gigaslide.utils.manifest import STATUS_DONE

log = logging.getLogger(__name__)


class EmbedInputError(ValueError):
    """The coordinates folder or slide list cannot be used; the message names it and the fix."""


@dataclass(frozen=True)
class SlideJob:
    """One slide to embed: its coordinates file and slide file (``None`` if it was not found)."""

    slide_id: str
    coords_path: Path
    slide_path: Path | None
    mpp: float | None = None
    n_tiles: int = 0
    error: str = ""  # a problem found while listing (e.g. no matching slide file)
    default_mpp: float | None = None  # --slide-mpp: used only when neither the file nor a CSV gives one


def _h5_rows(path: Path) -> int:
    try:
        with h5py.File(path, "r") as f:
            return int(f["coords"].shape[0]) if "coords" in f else 0
    except OSError:
        return 0


def _strip_patches(stem: str) -> str:
    return stem[: -len("_patches")] if stem.endswith("_patches") else stem


def _no_slide_message(sid: str, coords_path: Path, slides: str | os.PathLike[str]) -> str:
    return (
        f"{coords_path}: no slide named {sid!r} in --slides {slides}; pass --slides DIR_OR_CSV where "
        f"DIR holds a slide file named {sid}.<ext> (e.g. {sid}.svs) or the CSV has a row with "
        f"`path` to the slide (and `slide_id` {sid!r} if the file name differs)"
    )


def discover_jobs(
    coords_dir: str | os.PathLike[str],
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
) -> list[SlideJob]:
    """List the slides of a tiling output (``manifest.csv`` + ``patches/``) or a CLAM/TRIDENT patches folder.

    A tiling output names its slide files in its manifest (``slides`` overrides them); a
    CLAM/TRIDENT folder (``*.h5``, or ``patches/*.h5``; TRIDENT names end in ``_patches.h5``)
    needs ``slides`` (a folder or a CSV with a ``path`` column) matched by file stem.
    Jobs come back sorted by slide id, identically on every rank.
    """
    from gigaslide.pipeline.inputs import collect_slides

    root = Path(coords_dir)
    if not root.is_dir():
        raise EmbedInputError(f"{root}: not a folder; pass a tiling output folder or a patches folder")
    by_id: dict[str, Any] = {}
    if slides is not None:
        for s in collect_slides(slides, slide_mpp=slide_mpp):
            by_id.setdefault(s.slide_id, s)
            by_id.setdefault(s.path.stem, s)
    manifest = root / "manifest.csv"
    jobs: list[SlideJob] = []
    rows: list[dict[str, str]] = []
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    if rows and "status" in rows[0]:  # a tiling output, even when no slide could be tiled
        tiled = [r for r in rows if r.get("status") == STATUS_DONE]
        if not tiled:
            errors = "; ".join(f"{r.get('slide_id')}: {r.get('error') or r.get('status')}" for r in rows[:3])
            raise EmbedInputError(
                f"{root}: every slide of this tiling output failed to tile ({len(rows)} slide(s); {errors}); "
                f"see {manifest}, fix the cause and rerun `gigaslide tile`"
            )
        for row in rows:
            sid = row.get("slide_id", "")
            if row.get("status") != STATUS_DONE:
                log.info("%s: not tiled (status %r) - not embedded", sid, row.get("status"))
                continue
            cfile = Path(row.get("coords_file") or f"patches/{sid}.h5")
            cpath = cfile if cfile.is_absolute() else root / cfile
            if not cpath.exists():  # the folder moved: gigaslide's or TRIDENT's (--layout trident) name
                trident = root / "patches" / f"{sid}_patches.h5"
                cpath = trident if trident.exists() else root / "patches" / f"{sid}.h5"
            mpp = float(row["mpp"]) if row.get("mpp") else slide_mpp
            source = f"--slides {slides}"
            if sid in by_id:
                spath, mpp = by_id[sid].path, by_id[sid].mpp or mpp
            else:
                source = str(manifest)
                spath = Path(row["path"]) if row.get("path") else None
                if spath is not None and not spath.is_absolute() and (root / spath).exists():
                    spath = root / spath  # relative to the tiling folder
            if spath is None:
                err = (
                    "no slide path in the tiling manifest; pass --slides DIR_OR_CSV "
                    "(a folder of slides or a CSV with a `path` column)"
                )
            elif not spath.exists():
                err = (
                    f"slide file {spath} (from {source}) not found; if the slides moved, pass "
                    "--slides DIR_OR_CSV (their folder, or a CSV with `path`/`slide_id` columns)"
                )
            else:
                err = ""
            jobs.append(SlideJob(sid, cpath, spath, mpp, _h5_rows(cpath), err, slide_mpp))
    else:
        pdir = root / "patches" if (root / "patches").is_dir() else root
        files = sorted(p for p in pdir.glob("*.h5") if not p.name.startswith("."))
        if not files:
            raise EmbedInputError(
                f"{root}: neither a tiling output (manifest.csv + patches/) nor a folder of CLAM/TRIDENT "
                "coordinate files (*.h5); run `gigaslide tile` first"
            )
        if slides is None:
            raise EmbedInputError(
                f"{root}: a CLAM/TRIDENT patches folder has no slide paths; pass --slides DIR_OR_CSV (a folder "
                "of slides or a CSV with a `path` column, matched to the coordinate files by file stem)"
            )
        for cpath in files:
            sid = _strip_patches(cpath.stem)
            s = by_id.get(sid)
            err = "" if s is not None else _no_slide_message(sid, cpath, slides)
            jobs.append(
                SlideJob(
                    sid, cpath, s.path if s else None, s.mpp if s else None, _h5_rows(cpath), err, slide_mpp
                )
            )
    return sorted(jobs, key=lambda j: j.slide_id)
