"""`gigaslide pretrain dino`: DINO pretraining of a registry tile encoder on the tiles of a tiling output."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gigaslide.cli.pretrain_args import add_dino_arguments, add_run_arguments, dino_options
from gigaslide.cli.pretrain_args import key_value as _key_value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "dino",
        help="DINO self-distillation of a tile encoder (HIPT stage 1)",
        description=(
            "DINO pretraining (student/teacher self-distillation with multi-crop views) of a registry ViT tile "
            "encoder on the tiles of TILING_DIR (a `gigaslide tile` output), read from the slides at the "
            "tiling's exact resolution. Writes OUT/checkpoint.pth in DINO's layout (teacher, student, "
            "dino_loss, optimizer, epoch, ...): use it with `gigaslide embed --encoder NAME --weights "
            "OUT/checkpoint.pth` (the teacher backbone). Reruns resume. Multi-GPU: "
            "torchrun --nproc_per_node K -m gigaslide pretrain dino ..."
        ),
    )
    p.add_argument(
        "tiling_dir", metavar="TILING_DIR", type=Path, help="tiling output folder (gigaslide tile)"
    )
    p.add_argument(
        "--encoder", required=True, help="encoder name (see `gigaslide encoders`), e.g. hipt_vit256"
    )
    p.add_argument("--weights", default="random", help="initial student weights (default: random init)")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint.pth, logs)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="tiles per GPU/process and step")
    p.add_argument("--global-size", type=int, default=224, help="global crop side (px)")
    p.add_argument("--local-size", type=int, default=96, help="local crop side (px)")
    p.add_argument("--local-crops", type=int, default=8, help="number of local crops")
    add_dino_arguments(p, "tiles")
    p.add_argument("--encoder-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra encoder constructor argument (repeatable), e.g. depth=2")  # fmt: skip
    p.add_argument("--slides", default=None, help="slide folder or CSV (when the tiling's slides moved)")
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 mpp for slides lacking metadata")
    p.add_argument(
        "--max-tiles", type=int, default=None, help="pretrain on a seeded random subset of N tiles"
    )
    p.add_argument("--workers", type=int, default=2, help="DataLoader processes building crops")
    add_run_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.ssl.dino import DINOConfig, pretrain_dino
    from gigaslide.ssl.multicrop import MultiCropConfig
    from gigaslide.utils.dist import cleanup, init_distributed, quiet_other_ranks

    cfg = DINOConfig(
        **dino_options(args),
        crops=MultiCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.local_crops),
    )  # fmt: skip
    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    quiet_other_ranks(info)  # every rank trains on the same data: rank 0 reports for the job
    try:
        ckpt = pretrain_dino(
            args.tiling_dir, args.encoder, args.out, epochs=args.epochs, batch_size=args.batch_size, cfg=cfg,
            weights=args.weights, encoder_kwargs=dict(args.encoder_arg), slides=args.slides,
            slide_mpp=args.slide_mpp, max_tiles=args.max_tiles, num_workers=args.workers, device=args.device, precision=args.precision,
            seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
    finally:
        cleanup()
    if info.is_main:
        extra = "".join(f" (built with {k}={v})" for k, v in args.encoder_arg)
        print(f"DINO checkpoint: {ckpt}{extra}")
        print(
            f"embed with it:   gigaslide embed {args.tiling_dir} --encoder {args.encoder} --weights {ckpt} --out FEATURES"
        )
    sys.stdout.flush()
    return 0
