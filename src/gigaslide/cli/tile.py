"""`gigaslide tile`: tissue detection and tile coordinates for a slide, a folder or a CSV of slides."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from gigaslide.cli.common import add_wait_argument, output_folder

if TYPE_CHECKING:
    from gigaslide.preprocess.tissue import TissueParams


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from gigaslide.preprocess.tiling import DEFAULT_REGION_MIN_TISSUE

    p = subparsers.add_parser(
        "tile",
        help="detect tissue and write tile coordinates for many slides",
        description=(
            "Tile slides at an exact resolution. Writes OUT/patches/<slide_id>.h5 (TRIDENT layout: "
            "<slide_id>_patches.h5) and OUT/manifest.csv, with --outlines OUT/tissue/<slide_id>.geojson; "
            "a rerun skips finished slides and retries failed ones."
        ),
    )
    p.add_argument("input", help="a slide file, a folder of slides, or a CSV with a `path` column")
    p.add_argument("--out", required=True, help="output folder")
    res = p.add_mutually_exclusive_group()
    res.add_argument("--target-mpp", type=float, default=None, help="tile resolution in um/px (default 0.5)")
    res.add_argument(
        "--magnification",
        type=float,
        default=None,
        help="tile resolution as an objective magnification (20 = 0.5 um/px, 40 = 0.25 um/px)",
    )
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--stride", type=int, default=None, help="grid step in pixels (default: tile size)")
    add_tissue_arguments(p)
    p.add_argument(
        "--region-size", type=int, default=None, help="also write regions of this size (4096 for HIPT)"
    )
    p.add_argument(
        "--region-min-tissue",
        type=float,
        default=DEFAULT_REGION_MIN_TISSUE,
        help="keep a region when tissue covers this fraction of its area INSIDE the slide "
        f"(default {DEFAULT_REGION_MIN_TISSUE:g}; 0 keeps any region touching tissue). "
        "A slide without regions is still tiled, with a warning in the manifest",
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px for slides lacking one")
    p.add_argument("--workers", type=int, default=1, help="slides processed in parallel (default 1)")
    p.add_argument("--backend", default=None, help="slide reader backend (default: automatic)")
    p.add_argument("--preview", action="store_true", help="also write OUT/previews/<slide_id>.png")
    p.add_argument(
        "--outlines",
        action="store_true",
        help="also write the tissue outlines as GeoJSON (OUT/tissue/<slide_id>.geojson, level-0 px, QuPath)",
    )
    p.add_argument(
        "--layout",
        choices=["gigaslide", "clam", "trident"],
        default="gigaslide",
        help="coordinate files for CLAM (= gigaslide: patches/<id>.h5, patch_size read at patch_level) "
        "or TRIDENT (patches/<id>_patches.h5, patch_size at the target resolution); default gigaslide",
    )
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_wait_argument(p)
    return p


def add_tissue_arguments(p: argparse.ArgumentParser) -> None:
    """Tissue detection and tile selection options, one definition for `gigaslide tile` and `gigaslide
    preview` (a preview then shows what the same options tile)."""
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile (default 0.25)"
    )
    p.add_argument(
        "--tile-rule",
        choices=["fraction", "clam"],
        default="fraction",
        help="fraction: keep tiles whose tissue fraction >= --min-tissue (default); clam: CLAM's rule (any "
        "of 4 points at the centre +- a quarter tile in tissue, centre not in a hole; --min-tissue unused)",
    )
    p.add_argument(
        "--min-tissue-area",
        type=float,
        default=None,
        metavar="UM2",
        help="tissue fragments smaller than this many um^2 are dropped (default 20000; 0 keeps every "
        "fragment, e.g. for small biopsies or TMA cores)",
    )
    p.add_argument(
        "--keep-ink", action="store_true", help="do not remove marker ink (coloured/dark pen strokes)"
    )


def tissue_params(args: argparse.Namespace) -> TissueParams | None:
    """The :class:`~gigaslide.preprocess.tissue.TissueParams` that the tissue options ask for; None = the
    defaults (``--min-tissue-area``, ``--keep-ink`` not given)."""
    if args.min_tissue_area is None and not args.keep_ink:
        return None
    from gigaslide.preprocess.tissue import TissueParams

    defaults = TissueParams()
    area = defaults.min_tissue_area_um2 if args.min_tissue_area is None else args.min_tissue_area
    return TissueParams(min_tissue_area_um2=area, remove_pen=not args.keep_ink)


def run(args: argparse.Namespace) -> int:
    from gigaslide.pipeline.inputs import collect_slides
    from gigaslide.pipeline.tile_job import run_tiling
    from gigaslide.preprocess.tiling_spec import magnification_to_mpp

    # bad input (missing path, bad CSV, invalid parameter) raises; cli.main prints it as one line, exit 2
    if args.magnification is not None:
        if args.magnification <= 0:
            raise ValueError("--magnification must be positive")
        target_mpp = magnification_to_mpp(args.magnification)
    else:
        target_mpp = args.target_mpp if args.target_mpp is not None else 0.5
    slides = collect_slides(args.input, slide_mpp=args.slide_mpp)
    with output_folder(args.out, wait=args.wait):
        summary = run_tiling(
            slides,
            args.out,
            target_mpp=target_mpp,
            tile_size=args.tile_size,
            stride=args.stride,
            min_tissue=args.min_tissue,
            region_size=args.region_size,
            region_min_tissue=args.region_min_tissue,
            workers=args.workers,
            backend=args.backend,
            preview=args.preview,
            tissue_params=tissue_params(args),
            layout=args.layout,
            outlines=args.outlines,
            tile_rule=args.tile_rule,
            progress=not args.no_progress,
        )
    print(summary.describe())
    return 0 if summary.ok else 1
