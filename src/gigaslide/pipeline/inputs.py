"""Slide lists for batch jobs: one slide file, a folder of slides, or a CSV with a `path` column."""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

SLIDE_EXTENSIONS: tuple[str, ...] = (
    ".svs",
    ".tif",
    ".tiff",
    ".ndpi",
    ".mrxs",
    ".scn",
    ".vms",
    ".vmu",
    ".bif",
    ".svslide",
    ".png",
    ".jpg",
    ".jpeg",
)


class SlideListError(ValueError):
    """The slide list (folder, CSV) is unusable; the message names the input and the fix."""


@dataclass(frozen=True)
class SlideInput:
    """One slide of a batch: its id (output file names), path and optional level-0 mpp.

    ``mpp`` (a CSV ``mpp`` column) overrides the file's metadata; ``default_mpp`` (``--slide-mpp``)
    is used only when the file has none.
    """

    slide_id: str
    path: Path
    mpp: float | None = None
    default_mpp: float | None = None


def is_slide_file(path: Path) -> bool:
    """True when ``path``'s extension is a known slide/image format (case-insensitive)."""
    return path.suffix.lower() in SLIDE_EXTENSIONS


def _parse_mpp(value: str | None, where: str) -> float | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        mpp = float(value)
    except ValueError:
        raise SlideListError(
            f"{where}: mpp {value!r} is not a number (microns per pixel, e.g. 0.25)"
        ) from None
    if not math.isfinite(mpp) or mpp <= 0:
        raise SlideListError(f"{where}: mpp must be a positive number of microns per pixel, got {value!r}")
    return mpp


def _relative_hint(csv_path: Path, folder: Path) -> str:
    return (
        f"relative paths in a slide list are resolved relative to the CSV's folder ({folder}), "
        "not the current directory; write them relative to that folder or make them absolute"
    )


def _from_csv(csv_path: Path) -> list[SlideInput]:
    """Rows of a slide-list CSV; relative paths are resolved against the CSV's folder.

    Raises:
        SlideListError: no `path` column, an empty path, a bad mpp, or none of the listed files exists.
    """
    folder = csv_path.absolute().parent
    missing: list[tuple[int, str, Path]] = []  # (line, path as written, resolved path)
    with csv_path.open(newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        fields = [c.strip() for c in reader.fieldnames or []]
        if "path" not in fields:
            raise SlideListError(
                f"{csv_path}: the slide list needs a `path` column (optional `slide_id`, `mpp`); "
                f"found columns {fields}"
            )
        slides = []
        for line, raw in enumerate(reader, start=2):
            row = {(k or "").strip(): (v or "").strip() for k, v in raw.items()}
            if not row.get("path"):
                raise SlideListError(f"{csv_path}, line {line}: empty `path`")
            path = Path(os.path.expanduser(row["path"]))
            if not path.is_absolute():
                path = folder / path  # relative to the CSV's folder, whatever the current directory
            if not path.exists():
                missing.append((line, row["path"], path))
            slide_id = row.get("slide_id") or path.stem
            slides.append(SlideInput(slide_id, path, _parse_mpp(row.get("mpp"), f"{csv_path}, line {line}")))
    if missing:
        listing = "; ".join(f"line {ln}: {raw!r} -> {res}" for ln, raw, res in missing[:5])
        more = f" (and {len(missing) - 5} more)" if len(missing) > 5 else ""
        relative = any(not Path(os.path.expanduser(raw)).is_absolute() for _, raw, _ in missing)
        hint = f" Note: {_relative_hint(csv_path, folder)}." if relative else ""
        if len(missing) == len(slides):
            raise SlideListError(
                f"{csv_path}: none of the listed slide files exists ({listing}{more}).{hint}"
            )
        logger.warning(
            "%s: %d of %d listed slide files do not exist (%s%s); they will be recorded as failed.%s",
            csv_path,
            len(missing),
            len(slides),
            listing,
            more,
            hint,
        )
    return slides


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _drop_images_beside_slides(folder: Path, files: list[Path]) -> list[Path]:
    """In a folder of whole-slide images, PNG/JPEG files are thumbnails or label images, not slides.

    They are skipped (and named in a log message) when the folder holds any other slide format;
    a folder of only plain images is kept as it is.
    """
    images = [p for p in files if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not images or len(images) == len(files):
        return files
    shown = ", ".join(p.name for p in images[:5]) + (f" (+{len(images) - 5} more)" if len(images) > 5 else "")
    logger.warning(
        "%s: skipping %d plain image(s) next to the whole-slide images (%s); list them in a CSV "
        "to tile them as slides",
        folder,
        len(images),
        shown,
    )
    return [p for p in files if p.suffix.lower() not in IMAGE_EXTENSIONS]


def collect_slides(input: str | os.PathLike[str], slide_mpp: float | None = None) -> list[SlideInput]:
    """List the slides of a batch.

    Args:
        input: a slide file, a folder (its files with a slide extension, not recursive, sorted by
            name), or a ``.csv`` with a ``path`` column and optional ``slide_id``/``mpp`` columns
            (relative paths are relative to the CSV's folder, never the current directory).
        slide_mpp: level-0 mpp for slides whose file has no mpp metadata and whose CSV row gives
            none (stored as ``default_mpp``: it never overrides a file's own value).

    Returns:
        One :class:`SlideInput` per slide; ``slide_id`` defaults to the file stem.

    Raises:
        FileNotFoundError: ``input`` does not exist.
        SlideListError: no slides found, a bad CSV, or duplicate slide ids (all listed).
    """
    src = Path(input).expanduser()
    if slide_mpp is not None:
        slide_mpp = _parse_mpp(str(slide_mpp), "--slide-mpp")
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such slide, folder or CSV file")
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if is_slide_file(p) and not p.name.startswith("."))
        if not files:
            raise SlideListError(
                f"{src}: no slide files in this folder (extensions: {' '.join(SLIDE_EXTENSIONS)})"
            )
        files = _drop_images_beside_slides(src, files)
        slides = [SlideInput(p.stem, p.resolve(), None) for p in files]
    elif src.suffix.lower() == ".csv":
        slides = _from_csv(src)
        if not slides:
            raise SlideListError(f"{src}: the slide list is empty")
    else:
        slides = [SlideInput(src.stem, src.resolve(), None)]
    if slide_mpp is not None:
        slides = [SlideInput(s.slide_id, s.path, s.mpp, slide_mpp) for s in slides]
    dupes = {k: n for k, n in Counter(s.slide_id for s in slides).items() if n > 1}
    if dupes:
        listing = "; ".join(
            f"{sid}: {', '.join(str(s.path) for s in slides if s.slide_id == sid)}" for sid in sorted(dupes)
        )
        raise SlideListError(
            f"{src}: duplicate slide ids would overwrite each other's outputs ({listing}). "
            "Give unique ids in a CSV with `path` and `slide_id` columns."
        )
    return slides
