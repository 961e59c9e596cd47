"""`gigaslide embed`: tile features for every slide of a tiling output (single process or torchrun)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_folder

RANDOM_WARNING = (
    "\n" + "!" * 78 + "\n"
    "RANDOM WEIGHTS: features are not meaningful. Encoder {name!r} was built without pretrained\n"
    "weights (none given with --weights and none in the weights registry). Use these features for\n"
    "testing only; every output file records random_init=True.\n" + "!" * 78 + "\n"
)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "embed",
        help="extract tile features with a tile encoder",
        description=(
            "Embed the tiles of every slide of COORDS_DIR (a `gigaslide tile` output, or a CLAM/TRIDENT "
            "patches folder together with --slides) into OUT/h5_files/<slide_id>.h5. Resumable; "
            "scale out with `torchrun --nproc_per_node K -m gigaslide embed ...`."
        ),
    )
    p.add_argument(
        "coords_dir", metavar="COORDS_DIR", help="tiling output folder or CLAM/TRIDENT patches folder"
    )
    p.add_argument("--encoder", required=True, help="encoder name (see `gigaslide encoders`)")
    p.add_argument("--weights", default=None, help="weights file/folder, 'registry' or 'random'")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=64, help="tiles per forward pass")
    p.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="reader threads (--loader threads) or DataLoader worker processes (--loader processes)",
    )
    p.add_argument(
        "--loader",
        choices=["threads", "processes"],
        default="threads",
        help="threads: a thread pool reads uint8 tiles, normalisation on the device (default); "
        "processes: DataLoader worker processes read and normalise tiles",
    )
    p.add_argument(
        "--precision", choices=["fp32", "fp16", "bf16"], default="fp32", help="autocast precision on GPU"
    )
    p.add_argument("--store-dtype", choices=["float32", "float16"], default="float32",
                   help="dtype of the stored features (float16 halves the files; use with --precision fp16)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    p.add_argument("--save-pt", action="store_true", help="also write CLAM-style pt_files/<slide_id>.pt")
    p.add_argument("--chunk-size", type=int, default=4096, help="rows per committed chunk (resume step)")
    p.add_argument("--slides", default=None, help="slide folder or CSV (path column), matched by file stem")
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 mpp for slides lacking metadata")
    p.add_argument("--regions", action="store_true",
                   help="HIPT: embed the regions of `gigaslide tile --region-size 4096` as (M, 256, D) token "
                   "grids of their 256 px patches (OUT/h5_files/<slide_id>.h5 with patch mask + coords); "
                   "--batch-size counts patches; regions are read in the main process")  # fmt: skip
    p.add_argument("--vit4k-weights", default=None,
                   help="with --regions: also store ViT_4096 region tokens (M, 192); vit4k_xs_dino.pth or 'random'")  # fmt: skip
    p.add_argument("--seed", type=int, default=0, help="seed (identical random-init weights on every rank)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.models.encoders import create_encoder
    from gigaslide.pipeline.embed_job import run_embedding
    from gigaslide.utils.dist import cleanup, init_distributed
    from gigaslide.utils.seed import seed_everything

    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    try:
        with output_folder(args.out, wait=args.wait, dist_info=info):
            seed_everything(args.seed)
            if args.vit4k_weights and not args.regions:
                raise ValueError("--vit4k-weights only applies with --regions")
            if args.regions and args.save_pt:
                raise ValueError("--save-pt writes CLAM (N, D) tensors; it does not apply with --regions")
            encoder = create_encoder(args.encoder, weights=args.weights, warn_random=False)
            if encoder.weights_info.get("random_init") and info.is_main:
                print(RANDOM_WARNING.format(name=args.encoder), file=sys.stderr, flush=True)
            if args.regions:
                from gigaslide.pipeline.region_embed import run_region_embedding

                summary = run_region_embedding(
                    args.coords_dir,
                    encoder,
                    args.out,
                    vit4k=args.vit4k_weights,
                    batch_size=args.batch_size,
                    precision=args.precision,
                    device=args.device,
                    slides=args.slides,
                    slide_mpp=args.slide_mpp,
                    store_dtype=args.store_dtype,
                    dist_info=info,
                    progress=not args.no_progress,
                )
            else:
                summary = run_embedding(
                    args.coords_dir,
                    encoder,
                    args.out,
                    batch_size=args.batch_size,
                    num_workers=args.workers,
                    loader=args.loader,
                    precision=args.precision,
                    device=args.device,
                    save_pt=args.save_pt,
                    chunk_size=args.chunk_size,
                    slides=args.slides,
                    slide_mpp=args.slide_mpp,
                    store_dtype=args.store_dtype,
                    dist_info=info,
                    progress=not args.no_progress,
                )
    finally:
        cleanup()
    text, n_failed = summary.report(info.is_distributed and info.is_main)
    if info.is_main:  # summaries go to stdout, as in `tile`
        print(text)
    return 1 if n_failed else 0
