"""`gigaslide hipt-attention`: HIPT attention maps (ViT_256 heads, ViT_4096 heads, factorised) of one region."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "hipt-attention",
        help="HIPT attention maps of one region of a slide, as PNGs",
        description=(
            "Read the region at level-0 (X, Y) of SLIDE (REGION_SIZE px at TARGET_MPP; white beyond the slide), "
            "run ViT_256 over its 256 px patches and ViT_4096 over their tokens, and write per-head attention "
            "maps of both levels and the factorised (region x patch) map into OUT."
        ),
    )
    p.add_argument("slide", help="slide file")
    p.add_argument("--x", type=int, required=True, help="level-0 x of the region's top-left corner")
    p.add_argument("--y", type=int, required=True, help="level-0 y of the region's top-left corner")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument(
        "--weights", default=None, help="ViT_256 weights (vit256_small_dino.pth), 'registry' or 'random'"
    )
    p.add_argument("--vit4k-weights", default=None, help="ViT_4096 weights (vit4k_xs_dino.pth) or 'random'; "
                   "without it only the patch level is drawn")  # fmt: skip
    p.add_argument("--region-size", type=int, default=4096, help="region side in px (default 4096)")
    p.add_argument("--target-mpp", type=float, default=0.5, help="region resolution in um/px (default 0.5)")
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px if the slide lacks one")
    p.add_argument("--scale", type=int, default=4, help="PNGs are REGION_SIZE / SCALE px wide (default 4)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.eval.hipt_attention import slide_region_attention

    try:
        paths = slide_region_attention(
            args.slide,
            args.x,
            args.y,
            args.out,
            weights=args.weights,
            vit4k_weights=args.vit4k_weights,
            region_size=args.region_size,
            target_mpp=args.target_mpp,
            slide_mpp=args.slide_mpp,
            scale=args.scale,
            device=args.device,
        )
    except Exception as e:  # a CLI: report any failure in one line, no traceback
        print(f"gigaslide hipt-attention: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"wrote {len(paths)} attention maps to {args.out}")
    return 0
