"""`gigaslide convert`: move tile features or coordinates between gigaslide, CLAM and TRIDENT layouts."""

from __future__ import annotations

import argparse
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "convert",
        help="convert feature or coordinate folders between gigaslide, CLAM and TRIDENT layouts",
        description=(
            "Convert SRC (features: gigaslide/CLAM h5_files/ + pt_files/, or TRIDENT features_<encoder>/; "
            "coordinates: a tiling output or CLAM patches/<id>.h5, TRIDENT patches/<id>_patches.h5) into "
            "the layout given by --to in the folder given by --out. Features and coordinates are copied exactly; "
            "attributes are rewritten in the target's meaning (TRIDENT's patch_size is the tile size at "
            "the target resolution, CLAM's the size read at patch_level)."
        ),
    )
    p.add_argument("src", metavar="SRC", type=Path, help="source feature folder")
    p.add_argument("--out", required=True, type=Path, help="destination folder")
    p.add_argument("--to", required=True, choices=["gigaslide", "clam", "trident"])
    p.add_argument("--encoder", default=None, help="encoder name (TRIDENT folder name) when not in the files")
    p.add_argument(
        "--slide-mpp",
        type=float,
        default=None,
        help="level-0 um/px of the slides: needed to turn CLAM coordinates (no resolution stored) into TRIDENT's",
    )
    p.add_argument(
        "--slides", default=None, help="convert only these slides: a slide folder or CSV (by stem)"
    )
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.pipeline.convert import convert_folder

    ids = None
    if args.slides is not None:
        from gigaslide.pipeline.inputs import collect_slides

        ids = set()
        for s in collect_slides(args.slides):
            ids.update({s.slide_id, s.path.stem})
    with output_folder(args.out, wait=args.wait):
        summary = convert_folder(
            args.src, args.out, args.to, encoder=args.encoder, slide_mpp=args.slide_mpp, slide_ids=ids
        )
    print(f"converted {len(summary.written)} slide(s) to {args.to} in {summary.out_dir}")
    for sid, err in sorted(summary.failed.items()):
        print(f"  FAILED {sid}: {err}")
    return 1 if summary.failed else 0
