"""`gigaslide gigassl`: Giga-SSL commands. ``bank`` builds the augmented embedding bank of a tiling output."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "gigassl",
        help="Giga-SSL: augmented embedding banks for slide-level self-supervision",
        description="Giga-SSL (Lazard et al. 2023) commands.",
    )
    sub = p.add_subparsers(dest="gigassl_command", metavar="SUBCOMMAND", required=True)
    b = sub.add_parser(
        "bank",
        help="embed n_aug augmented views of n_tiles random tiles per slide",
        description=(
            "For every slide of TILING_DIR, draw --n-aug tile augmentations (crop, flips, 90-degree rotations, "
            "colour jitter, grayscale, blur; shared by all tiles of a view unless --no-share) and --n-tiles "
            "random tissue tiles for each, embed them with the frozen encoder, and write "
            "OUT/h5_files/<slide_id>.h5: features (n_aug, n_tiles, D) + coords (n_aug, n_tiles, 2). Resumable; "
            "scale out with `torchrun --nproc_per_node K -m gigaslide gigassl bank ...`."
        ),
    )
    b.add_argument(
        "tiling_dir", metavar="TILING_DIR", help="`gigaslide tile` output (or CLAM/TRIDENT patches)"
    )
    b.add_argument(
        "--encoder", required=True, help="tile encoder, e.g. resnet18_trunc (see `gigaslide encoders`)"
    )
    b.add_argument("--weights", default=None, help="weights file/folder, 'registry' or 'random'")
    b.add_argument("--out", required=True, type=Path, help="output bank folder")
    b.add_argument("--n-aug", type=int, default=50, help="augmentations per slide (default 50)")
    b.add_argument("--n-tiles", type=int, default=256, help="tiles per augmentation (default 256)")
    b.add_argument(
        "--no-share", action="store_true", help="augment each tile independently (the NS ablation)"
    )
    b.add_argument("--seed", type=int, default=0, help="seed of the tile and augmentation draws")
    b.add_argument("--batch-size", type=int, default=256, help="tiles per encoder call")
    b.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="tile reader threads")
    b.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast precision on GPU"
    )
    b.add_argument(
        "--store-dtype",
        choices=["float32", "float16"],
        default="float32",
        help="dtype of the stored features",
    )
    b.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    b.add_argument("--slides", default=None, help="slide folder or CSV (path column), matched by file stem")
    b.add_argument("--slide-mpp", type=float, default=None, help="level-0 mpp for slides lacking metadata")
    b.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_wait_argument(b)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.models.encoders import create_encoder
    from gigaslide.pipeline.gigassl_bank import build_gigassl_bank
    from gigaslide.utils.dist import cleanup, init_distributed
    from gigaslide.utils.seed import seed_everything

    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    try:
        with output_folder(args.out, wait=args.wait, dist_info=info):
            seed_everything(args.seed)
            encoder = create_encoder(args.encoder, weights=args.weights, warn_random=False)
            if encoder.weights_info.get("random_init") and info.is_main:  # the one random-weights warning
                print(
                    f"RANDOM WEIGHTS: encoder {args.encoder!r} has no pretrained weights; the bank is for "
                    "testing only",
                    file=sys.stderr,
                )
            summary = build_gigassl_bank(
                args.tiling_dir,
                encoder,
                args.out,
                n_aug=args.n_aug,
                n_tiles=args.n_tiles,
                shared=not args.no_share,
                seed=args.seed,
                batch_size=args.batch_size,
                num_workers=args.workers,
                precision=args.precision,
                device=args.device,
                store_dtype=args.store_dtype,
                slides=args.slides,
                slide_mpp=args.slide_mpp,
                dist_info=info,
                progress=not args.no_progress,
            )
    finally:
        cleanup()
    if info.is_main:  # summaries go to stdout, as in every command
        print(summary.describe())
    return 1 if summary.failed else 0
