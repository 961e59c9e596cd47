"""`gigaslide slide-images`: render slides as single images (LongViT input) into a uint8 cache."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "slide-images",
        help="render each slide (tissue box or whole) as one image for LongViT, cached as uint8 .npy",
        description=(
            "Resize each slide's tissue bounding box (or the whole slide) to SIZE x SIZE, band by band, "
            "into OUT/<slide_id>.npy with a tissue token mask; complete caches are reused."
        ),
    )
    p.add_argument("slides", nargs="+", help="slide files")
    p.add_argument("--out", required=True, help="cache folder")
    p.add_argument("--size", type=int, default=4096, help="output side in pixels (default 4096)")
    p.add_argument(
        "--region", choices=("tissue", "whole"), default="tissue", help="what to render (default tissue)"
    )
    p.add_argument(
        "--keep-aspect", action="store_true", help="keep the aspect ratio (default: squash to a square)"
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px for slides that lack it")
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.data.slide_images import prepare_slide_images
    from gigaslide.preprocess.slide_image import SlideImageSpec

    try:
        spec = SlideImageSpec(target_size=args.size, region=args.region, keep_aspect=args.keep_aspect)
    except ValueError as e:
        print(f"gigaslide slide-images: error: {e}", file=sys.stderr)
        return 2
    report = prepare_slide_images(args.slides, spec, args.out, mpp=args.slide_mpp)
    for slide_id, reason in report.failed.items():
        print(f"gigaslide slide-images: failed {slide_id}: {reason}", file=sys.stderr)
    print(
        f"{args.out}: {len(report.rendered)} rendered, {len(report.reused)} reused, "
        f"{len(report.failed)} failed ({args.size} px, region {args.region})"
    )
    return 1 if report.failed else 0
