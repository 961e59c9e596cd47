"""`gigaslide tile`: tissue detection and tile coordinates for a slide, a folder or a CSV of slides."""

from __future__ import annotations

import argparse
from typing import Any

from gigaslide.cli.common import add_wait_argument, output_folder


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from gigaslide.preprocess.tiling import DEFAULT_REGION_MIN_TISSUE

    p = subparsers.add_parser(
        "tile",
        help="detect tissue and write tile coordinates for many slides",
        description=(
            "Tile slides at an exact resolution. Writes OUT/patches/<slide_id>.h5, "
            "OUT/tissue/<slide_id>.geojson and OUT/manifest.csv; a rerun skips finished slides "
            "and retries failed ones."
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
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="minimum tissue fraction of a kept tile (default 0.25)"
    )
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
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_wait_argument(p)
    return p


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
            progress=not args.no_progress,
        )
    print(summary.describe())
    return 0 if summary.ok else 1
