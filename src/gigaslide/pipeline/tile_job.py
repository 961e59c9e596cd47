"""Batch tiling: tissue detection + tile coordinates for many slides, resumable and fault tolerant.

Output layout of ``run_tiling(slides, OUT)``::

    OUT/manifest.csv              one row per slide (status done/failed, counts, timing, error)
    OUT/patches/<slide_id>.h5     tile coordinates + tissue fractions (CLAM's layout and meaning)
    OUT/patches/<slide_id>_patches.h5  instead, with ``layout="trident"``: TRIDENT's layout and meaning
    OUT/tissue/<slide_id>.geojson with ``outlines``: tissue polygons in level-0 pixels (QuPath)
    OUT/regions/<slide_id>.h5     with ``region_size``: HIPT regions (e.g. 4096 px), see below
    OUT/previews/<slide_id>.png   with ``preview``: thumbnail + tissue outline + tile grid

Every file is written atomically and the coordinate file last, so a slide is finished exactly
when the manifest says ``done`` and its coordinate file exists. A rerun skips finished slides
(with the same tiling parameters) and retries failed ones. A failing slide is recorded and the
batch carries on; slides run in parallel over ``workers`` processes, the manifest is written
only by the parent. One output folder must not be used by two concurrent runs.

Regions follow their own rule (:func:`gigaslide.preprocess.tiling.tile_regions`): a region is
kept when tissue covers at least ``region_min_tissue`` (default 0.05) of the region's area
INSIDE the slide. Regions never fail a slide: a slide without any region (or whose region step
raised) is still ``done`` with its patches, ``n_regions`` 0 and the reason in the ``warning``
column. A rerun with another ``region_size`` or ``region_min_tissue`` tiles the slide again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import h5py
from tqdm import tqdm

from gigaslide.pipeline.inputs import SlideInput
from gigaslide.preprocess.tiling import DEFAULT_REGION_MIN_TISSUE
from gigaslide.utils.atomic import atomic_write_text
from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED, Manifest

if TYPE_CHECKING:
    from gigaslide.io.base import Slide
    from gigaslide.preprocess.tissue import TissueMask, TissueParams

logger = logging.getLogger(__name__)

MANIFEST_COLUMNS: tuple[str, ...] = (
    "slide_id",
    "path",
    "mpp",
    "status",
    "n_tiles",
    "n_regions",
    "backend",
    "seconds",
    "error",
    "warning",
    "coords_file",
)
OUTPUT_DIRS: tuple[str, ...] = ("patches", "tissue", "regions", "previews")


@dataclass(frozen=True)
class TilingParams:
    """What to tile; sent to worker processes, so it must stay picklable."""

    target_mpp: float = 0.5
    tile_size: int = 256
    stride: int | None = None
    min_tissue: float = 0.25
    region_size: int | None = None
    region_min_tissue: float = DEFAULT_REGION_MIN_TISSUE
    backend: str | None = None
    preview: bool = False
    tissue_params: TissueParams | None = None
    layout: str = "gigaslide"
    outlines: bool = False
    tile_rule: str = "fraction"

    def validate(self) -> None:
        """Raise ValueError with the offending option for impossible settings."""
        from gigaslide.preprocess.coords_io import LAYOUTS

        if self.tile_rule not in ("fraction", "clam"):
            raise ValueError(f"--tile-rule must be 'fraction' or 'clam', got {self.tile_rule!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if not (math.isfinite(self.target_mpp) and self.target_mpp > 0):
            raise ValueError(
                f"--target-mpp must be a positive number of microns per pixel, got {self.target_mpp}"
            )
        if self.tile_size <= 0:
            raise ValueError(f"--tile-size must be positive, got {self.tile_size}")
        if self.stride is not None and self.stride <= 0:
            raise ValueError(f"--stride must be positive, got {self.stride}")
        if not 0.0 <= self.min_tissue <= 1.0:
            raise ValueError(f"--min-tissue must be a fraction in [0, 1], got {self.min_tissue}")
        if self.region_size is not None and self.region_size <= 0:
            raise ValueError(f"--region-size must be positive, got {self.region_size}")
        if not 0.0 <= self.region_min_tissue <= 1.0:
            raise ValueError(
                f"--region-min-tissue must be a fraction in [0, 1], got {self.region_min_tissue}"
            )


@dataclass
class TilingSummary:
    """Outcome of :func:`run_tiling`."""

    out_dir: Path
    manifest_path: Path
    done: list[str] = field(default_factory=list)  # tiled in this run
    skipped: list[str] = field(default_factory=list)  # already finished by an earlier run
    failed: dict[str, str] = field(default_factory=dict)  # slide_id -> "ExceptionType: message"
    n_tiles: int = 0  # tiles written in this run
    warnings: dict[str, str] = field(default_factory=dict)  # slide_id -> warning (done slides)

    @property
    def n_total(self) -> int:
        return len(self.done) + len(self.skipped) + len(self.failed)

    @property
    def ok(self) -> bool:
        return not self.failed

    def describe(self) -> str:
        """Human-readable summary; lists each failed slide with its error."""
        lines = [
            f"{self.n_total} slide(s): {len(self.done)} tiled ({self.n_tiles} tiles), "
            f"{len(self.skipped)} already done, {len(self.failed)} failed. Manifest: {self.manifest_path}"
        ]
        if self.warnings:
            lines.append(f"{len(self.warnings)} slide(s) done with a warning:")
            lines += [f"  {sid}: {msg}" for sid, msg in self.warnings.items()]
        if self.failed:
            lines.append(f"{len(self.failed)} of {self.n_total} slides failed:")
            lines += [f"  {sid}: {err}" for sid, err in self.failed.items()]
        return "\n".join(lines)


def output_paths(out_dir: Path, slide_id: str, layout: str = "gigaslide") -> dict[str, Path]:
    """Where the outputs of one slide go (TRIDENT's coordinate files end in ``_patches.h5``)."""
    from gigaslide.preprocess.coords_io import coords_filename

    return {
        "patches": out_dir / "patches" / coords_filename(slide_id, layout),
        "tissue": out_dir / "tissue" / f"{slide_id}.geojson",
        "regions": out_dir / "regions" / f"{slide_id}.h5",
        "previews": out_dir / "previews" / f"{slide_id}.png",
    }


def format_error(exc: BaseException) -> str:
    """``"ExceptionType: message"`` on one line."""
    msg = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__


@contextlib.contextmanager
def atomic_named_path(final: Path) -> Iterator[Path]:
    """Yield ``tmpdir/<final.name>`` (a writer may infer the format from the extension); move on success."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=".tmp-", dir=final.parent))
    try:
        yield tmp_dir / final.name
        os.replace(tmp_dir / final.name, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)


def tile_one(slide: SlideInput, out_dir: str | os.PathLike[str], params: TilingParams) -> dict[str, Any]:
    """Tile one slide and write its outputs; never raises for a bad slide.

    Returns the manifest row: status ``done`` with counts, or ``failed`` with ``error``.
    """
    from gigaslide.io import open_slide
    from gigaslide.preprocess.coords_io import write_coords
    from gigaslide.preprocess.tiling import tile_slide

    out = Path(out_dir)
    paths = output_paths(out, slide.slide_id, params.layout)
    t0 = time.perf_counter()
    row: dict[str, Any] = {
        "path": str(Path(slide.path).resolve()),
        "mpp": slide.mpp,
        "n_tiles": "",
        "n_regions": "",
    }
    warning = ""
    try:
        with open_slide(
            slide.path, mpp=slide.mpp, backend=params.backend, default_mpp=slide.default_mpp
        ) as s:
            row["backend"] = s.backend
            row["mpp"] = s.mpp
            tiles = tile_slide(
                s,
                params.target_mpp,
                params.tile_size,
                stride=params.stride,
                min_tissue=params.min_tissue,
                tissue_params=params.tissue_params,
                rule=params.tile_rule,
            )
            warning = tiles.warning  # e.g. tiles upsampled from level 0
            if params.outlines:  # valid polygons of a fragmented mask cost more than the tiling itself
                atomic_write_text(paths["tissue"], json.dumps(tiles.tissue.to_geojson()))
            attrs = {
                "slide_id": slide.slide_id,
                "name": slide.slide_id,  # CLAM's StitchCoords and TRIDENT read `name`
                "slide_path": str(slide.path),
                **_tissue_attrs(params),
            }
            if params.region_size:
                row["n_regions"], region_warning = _write_regions(
                    s, slide, tiles.tissue, paths["regions"], params
                )
                warning = "; ".join(w for w in (warning, region_warning) if w)
            if params.preview:
                from gigaslide.preprocess.preview import render_preview

                with atomic_named_path(paths["previews"]) as tmp:
                    render_preview(tiles.tissue, tiles.coords, tiles.spec, tmp, slide_name=slide.slide_id)
            # the coordinate file is written last: its presence marks the slide finished
            write_coords(
                paths["patches"],
                tiles.coords,
                tiles.spec,
                tiles.tissue_fraction,
                extra_attrs=attrs,
                layout=params.layout,
            )
        row.update(
            status=STATUS_DONE, n_tiles=tiles.n_tiles, error="", coords_file=str(paths["patches"].resolve())
        )
    except Exception as exc:
        logger.debug("slide %s failed", slide.slide_id, exc_info=True)
        row.update(status=STATUS_FAILED, error=format_error(exc), coords_file="")
    row["warning"] = warning
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _tissue_attrs(params: TilingParams) -> dict[str, Any]:
    """The tissue-detection settings a rerun must match (stored on the coordinate file)."""
    from gigaslide.preprocess.tissue import TissueParams

    tp = params.tissue_params or TissueParams()
    return {
        "min_tissue_area_um2": float(tp.min_tissue_area_um2),
        "remove_ink": int(tp.remove_pen),
        "clam_tile_rule": int(params.tile_rule == "clam"),
    }


def _write_regions(
    s: Slide, slide: SlideInput, tissue: TissueMask, path: Path, params: TilingParams
) -> tuple[int, str]:
    """Write the slide's region file; returns (n_regions, warning). Never raises.

    Zero regions still writes an (empty) region file, so a rerun sees the slide as finished;
    an error leaves no region file, so a rerun tries the regions again.
    """
    from gigaslide.preprocess.coords_io import write_coords
    from gigaslide.preprocess.tiling import tile_regions

    assert params.region_size is not None
    try:
        regions = tile_regions(
            s, params.target_mpp, params.region_size, tissue, min_tissue=params.region_min_tissue
        )
        attrs = {
            "slide_id": slide.slide_id,
            "slide_path": str(slide.path),
            "tissue_fraction_of": "in-slide area of the region",
        }
        write_coords(path, regions.coords, regions.spec, regions.tissue_fraction, extra_attrs=attrs)
    except Exception as exc:
        logger.debug("regions of %s failed", slide.slide_id, exc_info=True)
        path.unlink(missing_ok=True)  # no stale regions from an earlier run
        return 0, f"no regions written: {format_error(exc)}"
    if regions.n_tiles == 0:
        return 0, (
            f"no {params.region_size} px region has tissue on >= {params.region_min_tissue:g} of its "
            "in-slide area; lower --region-min-tissue (0 keeps any region touching tissue)"
        )
    return regions.n_tiles, ""


def _region_spec_matches(path: Path, params: TilingParams) -> bool:
    """True when the region file at ``path`` was written with the requested region parameters."""
    try:
        with h5py.File(path, "r") as f:
            attrs = f["coords"].attrs
            return (
                int(attrs["tile_size"]) == params.region_size
                and math.isclose(float(attrs["target_mpp"]), params.target_mpp, rel_tol=1e-9)
                and math.isclose(float(attrs["min_tissue"]), params.region_min_tissue, abs_tol=1e-12)
            )
    except (OSError, KeyError, ValueError, TypeError):
        return False


def is_finished(manifest: Manifest, slide: SlideInput, out_dir: Path, params: TilingParams) -> bool:
    """True when an earlier run finished ``slide`` with the same tiling parameters."""
    paths = output_paths(out_dir, slide.slide_id, params.layout)
    if not manifest.is_done(slide.slide_id) or not paths["patches"].is_file():
        return False
    if params.region_size and not _region_spec_matches(paths["regions"], params):
        logger.info("%s: regions missing or made with other region parameters; tiling again", slide.slide_id)
        return False
    if params.preview and not paths["previews"].is_file():
        return False
    if params.outlines and not paths["tissue"].is_file():
        return False
    try:
        with h5py.File(paths["patches"], "r") as f:
            attrs = f["coords"].attrs
            same = (
                int(attrs["tile_size"]) == params.tile_size
                and int(attrs["stride"]) == (params.stride or params.tile_size)
                and math.isclose(float(attrs["target_mpp"]), params.target_mpp, rel_tol=1e-9)
                and math.isclose(float(attrs["min_tissue"]), params.min_tissue, abs_tol=1e-12)
            )
            if same and slide.mpp is not None:
                same = math.isclose(float(attrs["slide_mpp"]), slide.mpp, rel_tol=1e-9)
            for key, want in _tissue_attrs(params).items():  # files from before these attrs: defaults
                if same and key in attrs:
                    same = math.isclose(float(attrs[key]), float(want), abs_tol=1e-9)
    except (OSError, KeyError, ValueError):
        return False
    if not same:
        logger.info("%s: finished with other tiling parameters; tiling again", slide.slide_id)
    return same


def clean_stale_temp(out_dir: Path) -> int:
    """Remove temporary files left by a killed run (``.<name>.*.tmp`` files, ``.tmp-*`` folders)."""
    n = 0
    for d in [out_dir, *(out_dir / sub for sub in OUTPUT_DIRS)]:
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if p.name.startswith(".") and p.name.endswith(".tmp") and p.is_file():
                p.unlink(missing_ok=True)
                n += 1
            elif p.name.startswith(".tmp-") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
                n += 1
    return n


def _crashed_row(slide: SlideInput) -> dict[str, Any]:
    return {
        "path": str(Path(slide.path).resolve()),
        "mpp": slide.mpp,
        "status": STATUS_FAILED,
        "error": "WorkerCrashed: the worker process died while reading this slide "
        "(e.g. a crash in the slide reader library on a corrupt file)",
        "coords_file": "",
        "warning": "",
        "seconds": "",
    }


def _pool(workers: int) -> ProcessPoolExecutor:
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def _run_parallel(
    todo: list[SlideInput], out_dir: Path, params: TilingParams, workers: int
) -> Iterable[tuple[SlideInput, dict[str, Any]]]:
    """Yield (slide, row) as slides finish. Slides caught in a crashed pool are each retried alone."""
    retry: list[SlideInput] = []
    with _pool(min(workers, len(todo))) as pool:
        futures: dict[Future, SlideInput] = {pool.submit(tile_one, s, out_dir, params): s for s in todo}
        for fut in as_completed(futures):
            slide = futures[fut]
            try:
                yield slide, fut.result()
            except BrokenProcessPool:
                retry.append(slide)
    for slide in retry:  # isolate each: only the slide that really crashes is marked failed
        with _pool(1) as pool:
            try:
                yield slide, pool.submit(tile_one, slide, out_dir, params).result()
            except BrokenProcessPool:
                yield slide, _crashed_row(slide)


def run_tiling(
    slides: list[SlideInput],
    out_dir: str | os.PathLike[str],
    target_mpp: float = 0.5,
    tile_size: int = 256,
    stride: int | None = None,
    min_tissue: float = 0.25,
    region_size: int | None = None,
    workers: int = 1,
    backend: str | None = None,
    preview: bool = False,
    tissue_params: TissueParams | None = None,
    progress: bool = True,
    region_min_tissue: float = DEFAULT_REGION_MIN_TISSUE,
    layout: str = "gigaslide",
    outlines: bool = False,
    tile_rule: str = "fraction",
) -> TilingSummary:
    """Tile every slide into ``out_dir`` (layout in the module docstring); resumable.

    Args:
        slides: from :func:`gigaslide.pipeline.inputs.collect_slides`.
        out_dir: output folder (created).
        target_mpp, tile_size, stride, min_tissue: the tile grid (see :func:`tile_slide`).
        region_size: also write regions of this size (4096 for HIPT) at ``target_mpp``.
        region_min_tissue: keep a region when tissue covers this fraction of its in-slide area.
        workers: slides processed in parallel (processes); 1 runs in this process.
        backend: reader backend name (None = automatic).
        preview: also write a preview PNG per slide.
        tissue_params: tissue detection parameters (None = defaults).
        progress: show a progress bar on stderr.
        layout: ``gigaslide`` (= CLAM: ``patches/<id>.h5``, ``patch_size`` read at ``patch_level``) or
            ``trident`` (``patches/<id>_patches.h5``, ``patch_size`` at the target resolution); see
            :mod:`gigaslide.preprocess.coords_io`.
        outlines: also write the tissue outlines as GeoJSON (``OUT/tissue/<id>.geojson``).
        tile_rule: ``fraction`` (default) or ``clam`` (CLAM's four-point rule on gigaslide's mask).

    Returns:
        A :class:`TilingSummary`; failed slides are listed there and in the manifest.
    """
    params = TilingParams(
        target_mpp=float(target_mpp),
        tile_size=int(tile_size),
        stride=None if stride is None else int(stride),
        min_tissue=float(min_tissue),
        region_size=None if not region_size else int(region_size),
        region_min_tissue=float(region_min_tissue),
        backend=backend,
        preview=bool(preview),
        tissue_params=tissue_params,
        layout=layout,
        outlines=bool(outlines),
        tile_rule=tile_rule,
    )
    params.validate()
    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n_stale = clean_stale_temp(out)
    if n_stale:
        logger.info("removed %d temporary file(s) left by an interrupted run", n_stale)
    manifest = Manifest(out / "manifest.csv", columns=MANIFEST_COLUMNS)
    summary = TilingSummary(out_dir=out, manifest_path=manifest.path)
    todo = []
    for slide in slides:
        if is_finished(manifest, slide, out, params):
            summary.skipped.append(slide.slide_id)
        else:
            todo.append(slide)
    if summary.skipped:
        logger.info("%d slide(s) already tiled, skipping them", len(summary.skipped))

    if workers == 1 or len(todo) <= 1:
        results: Iterable[tuple[SlideInput, dict[str, Any]]] = ((s, tile_one(s, out, params)) for s in todo)
    else:
        results = _run_parallel(todo, out, params, workers)
    with tqdm(total=len(todo), desc="tiling", unit="slide", file=sys.stderr, disable=not progress) as bar:
        for slide, row in results:
            manifest.update(slide.slide_id, row)
            if row["status"] == STATUS_DONE:
                summary.done.append(slide.slide_id)
                summary.n_tiles += int(row["n_tiles"])
                if row.get("warning"):
                    summary.warnings[slide.slide_id] = row["warning"]
                    logger.warning("%s: %s", slide.slide_id, row["warning"])
            else:
                summary.failed[slide.slide_id] = row["error"]
                logger.warning("%s failed: %s", slide.slide_id, row["error"])
            bar.set_postfix_str(slide.slide_id)
            bar.update(1)
    return summary
