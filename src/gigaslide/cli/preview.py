"""`gigaslide preview`: one slide's thumbnail with its tissue outline and tile grid, as a PNG."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.cli.common import output_file
from gigaslide.cli.tile import add_tissue_arguments, tissue_params


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "preview",
        help="render a slide's thumbnail with tissue outline and tile grid",
        description="Check tissue detection and tiling parameters on one slide before a batch run; the "
        "tissue options are those of `gigaslide tile`.",
    )
    p.add_argument("slide", help="slide file")
    p.add_argument(
        "--out",
        default=None,
        help="PNG path, or a folder for <slide stem>_preview.png (default: that file in the current folder)",
    )
    p.add_argument("--target-mpp", type=float, default=0.5, help="tile resolution in um/px (default 0.5)")
    p.add_argument("--tile-size", type=int, default=256, help="tile side in pixels (default 256)")
    p.add_argument("--stride", type=int, default=None, help="grid step in pixels (default: tile size)")
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px if the slide lacks one")
    add_tissue_arguments(p)  # the tissue options of `gigaslide tile`
    p.add_argument("--backend", default=None, help="slide reader backend (default: automatic)")
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.io import open_slide
    from gigaslide.pipeline.tile_job import atomic_named_path
    from gigaslide.preprocess.preview import render_preview
    from gigaslide.preprocess.tiling import NoTissueError, make_spec, tile_slide
    from gigaslide.preprocess.tissue import detect_tissue

    # bad input raises; cli.main prints it as one line (exit status 2)
    slide_path = Path(args.slide)
    name = f"{slide_path.stem}_preview.png"
    out = output_file(args.out, name) if args.out else Path(name)
    with open_slide(slide_path, mpp=args.slide_mpp, backend=args.backend) as slide:
        spec = make_spec(slide, args.target_mpp, args.tile_size, args.stride, args.min_tissue)
        tissue = detect_tissue(slide, tissue_params(args))
        try:
            coords = tile_slide(
                slide, args.target_mpp, args.tile_size, args.stride, args.min_tissue, tissue=tissue,
                rule=args.tile_rule,
            ).coords  # fmt: skip
        except NoTissueError as e:  # still draw the tissue outline: that is what needs checking
            print(f"gigaslide preview: warning: {e}", file=sys.stderr)
            coords = np.zeros((0, 2), dtype=np.int64)
    with atomic_named_path(out) as tmp:
        render_preview(tissue, coords, spec, tmp, slide_name=slide_path.name)
    print(
        f"{out}: {len(coords)} tiles of {spec.tile_size} px at {spec.target_mpp:g} um/px "
        f"({spec.level0_size} level-0 px each, read at level {spec.read_level})"
    )
    return 0
