"""`gigaslide heatmap`: paint per-tile attention or prediction scores over a slide thumbnail."""

from __future__ import annotations

import argparse
from pathlib import Path

from gigaslide.cli.common import output_file


def _region(text: str) -> tuple[int, int, int, int]:
    try:
        x, y, w, h = (int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--region must be x,y,w,h in level-0 pixels, got {text!r}"
        ) from None
    return x, y, w, h


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "heatmap",
        help="overlay per-tile attention/scores on a slide thumbnail (PNG)",
        description=(
            "Paint per-tile scores over a slide and write a PNG. Scores come from an attention file "
            "(OUTDIR/attention/<slide_id>.h5 written by `gigaslide train`), or are computed from a feature "
            "file with --model CHECKPOINT. Scores are shown as within-slide percentiles. The score file "
            "must belong to the slide: its slide id must match the slide's file name (--force "
            "overrides) and its tiles must lie inside the slide."
        ),
    )
    p.add_argument("--slide", type=Path, required=True, help="the whole-slide image")
    p.add_argument(
        "--scores",
        type=Path,
        required=True,
        help="attention h5 (coords + scores, from `gigaslide train`), or a feature h5 with --model",
    )
    p.add_argument(
        "--model", type=Path, default=None, help="checkpoint (checkpoints/fold<k>.pt) to compute attention"
    )
    p.add_argument(
        "--out", type=Path, required=True, help="output PNG (a folder: <slide stem>_heatmap.png in it)"
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px when the slide lacks it")
    p.add_argument("--backend", default=None, help="slide reader backend (default: automatic)")
    p.add_argument(
        "--region", type=_region, default=None, help="level-0 x,y,w,h to render at higher resolution"
    )
    p.add_argument("--max-size", type=int, default=2048, help="longest output side in pixels (default 2048)")
    p.add_argument("--alpha", type=float, default=0.5, help="overlay opacity (default 0.5)")
    p.add_argument("--cmap", default="jet", help="matplotlib colormap (default jet)")
    p.add_argument(
        "--tile-size-level0", type=int, default=None, help="tile side in level-0 px if not in the file"
    )
    p.add_argument("--device", default="cpu", help="device for --model (default cpu)")
    p.add_argument(
        "--force",
        action="store_true",
        help="draw even when the score file's slide id differs from the slide's file name",
    )
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.eval.heatmap import (
        attention_from_checkpoint,
        check_scores_match_slide,
        read_scores,
        render_heatmap,
    )
    from gigaslide.io import open_slide

    # bad input raises; cli.main prints it as one line (exit status 2)
    out_path = output_file(args.out, f"{Path(args.slide).stem}_heatmap.png")
    if args.model is not None:
        ts = attention_from_checkpoint(args.scores, args.model, device=args.device, slide_mpp=args.slide_mpp)
    else:
        ts = read_scores(args.scores, slide_mpp=args.slide_mpp)
    size = args.tile_size_level0 or ts.tile_size_level0
    if size is None:
        raise ValueError(f"{args.scores}: no tile size in the file attributes; pass --tile-size-level0")
    with open_slide(args.slide, mpp=args.slide_mpp, backend=args.backend) as slide:
        check_scores_match_slide(ts, slide.dimensions, args.slide, args.scores, force=args.force)
        out = render_heatmap(
            slide,
            ts.coords,
            ts.scores,
            size,
            out_path,
            max_size=args.max_size,
            region=args.region,
            alpha=args.alpha,
            cmap=args.cmap,
        )
    print(out)
    return 0
