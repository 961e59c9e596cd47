"""`gigaslide pretrain hipt-region`: HIPT stage 2, DINO of ViT_4096 on stored region token grids."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gigaslide.cli.pretrain_args import add_dino_arguments, add_run_arguments, dino_options
from gigaslide.cli.pretrain_args import key_value as _key_value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "hipt-region",
        help="HIPT stage 2: DINO of ViT_4096 on region token grids",
        description=(
            "HIPT stage-2 pretraining: DINO self-distillation of the region transformer ViT_4096-256 on the "
            "16x16 grids of frozen ViT_256 tokens stored by `gigaslide embed --regions` (REGION_FEATURES: its "
            "output folder, a folder of region .h5 files or one file). Views: 2 global 14x14 and N local 6x6 "
            "token crops, left-right flips, dropout on every view. Defaults: HIPT's main_dino4k.py. Writes "
            "OUT/checkpoint.pth in the vit4k_xs_dino.pth layout: use it with `gigaslide embed --regions "
            "--vit4k-weights OUT/checkpoint.pth` or `gigaslide train --model hipt`. Reruns resume."
        ),
    )
    p.add_argument("region_features", metavar="REGION_FEATURES", type=Path,
                   help="region feature folder or file (gigaslide embed --regions)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint.pth, logs)")
    p.add_argument("--weights", default=None, help="initial student ViT_4096 weights (default: random init)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64, help="regions per GPU/process and step")
    p.add_argument("--global-size", type=int, default=14, help="global crop side (tokens)")
    p.add_argument("--local-size", type=int, default=6, help="local crop side (tokens)")
    p.add_argument("--local-crops", type=int, default=8, help="number of local crops")
    p.add_argument("--view-dropout", type=float, default=0.1, help="dropout on every view (paper: 0.1)")
    add_dino_arguments(p, "regions", warmup_teacher_temp_epochs=0)
    p.add_argument("--vit4k-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra ViT_4096 constructor argument (repeatable), e.g. depth=2")  # fmt: skip
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes building views")
    add_run_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.ssl.hipt_region import pretrain_hipt_region, stage2_dino_config
    from gigaslide.ssl.region_crops import RegionCropConfig
    from gigaslide.utils.dist import cleanup, init_distributed, quiet_other_ranks

    cfg = stage2_dino_config(
        **dino_options(args),
    )  # fmt: skip
    crops = RegionCropConfig(global_size=args.global_size, local_size=args.local_size, n_local=args.local_crops,
                             dropout=args.view_dropout)  # fmt: skip
    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    quiet_other_ranks(info)  # every rank trains on the same data: rank 0 reports for the job
    try:
        ckpt = pretrain_hipt_region(
            args.region_features, args.out, epochs=args.epochs, batch_size=args.batch_size, cfg=cfg, crops=crops,
            weights=args.weights, vit4k_kwargs=dict(args.vit4k_arg), num_workers=args.workers,
            device=args.device, precision=args.precision, seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
    finally:
        cleanup()
    if info.is_main:
        extra = "".join(f" (built with {k}={v})" for k, v in args.vit4k_arg)
        print(f"ViT_4096 DINO checkpoint: {ckpt}{extra}")
        print(
            f"region tokens with it:    gigaslide embed TILING_DIR --regions --vit4k-weights {ckpt} --out FEATURES"
        )
    sys.stdout.flush()
    return 0
