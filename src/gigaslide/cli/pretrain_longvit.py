"""`gigaslide pretrain longvit`: DINO pretraining of the LongViT encoder on tissue regions of slide images."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gigaslide.cli.pretrain_args import add_dino_arguments, add_run_arguments, dino_options
from gigaslide.cli.pretrain_args import key_value as _key_value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "longvit",
        help="DINO pretraining of the LongViT slide-image encoder",
        description=(
            "DINO pretraining (LongViT, Table 5: global views 1,024^2 at scale (0.4, 1), local views 512^2 at "
            "scale (0.05, 0.4)) of the LongViT encoder on crops of the tissue region of each slide image. "
            "SOURCE is a `gigaslide slide-images` cache folder, or slides (files, folder or CSV) rendered once "
            "at --image-size into OUT/slide-images. Writes OUT/checkpoint.pth in DINO's layout (teacher, "
            "student, dino_loss, optimizer, ...): finetune with `gigaslide train --model longvit --set "
            "model_kwargs.weights=OUT/checkpoint.pth`. Reruns resume."
        ),
    )
    p.add_argument("source", metavar="SOURCE", nargs="+", help="slide-image cache folder, or slides")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint.pth, logs)")
    p.add_argument("--image-size", type=int, default=4096, help="side of the rendered slide images (px)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="slide regions per process and step")
    p.add_argument("--samples-per-slide", type=int, default=1, help="regions drawn per slide and epoch")
    p.add_argument("--global-size", type=int, default=1024, help="global crop side (px)")
    p.add_argument("--local-size", type=int, default=512, help="local crop side (px)")
    p.add_argument("--local-crops", type=int, default=8, help="number of local crops")
    add_dino_arguments(p, "regions")
    p.add_argument("--model-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra LongViT argument (repeatable), e.g. depth=2, embed_dim=64")  # fmt: skip
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 mpp for slides lacking metadata")
    p.add_argument("--workers", type=int, default=0, help="DataLoader processes building crops")
    add_run_arguments(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.ssl.longvit_dino import longvit_dino_config, pretrain_longvit
    from gigaslide.ssl.multicrop import MultiCropConfig
    from gigaslide.utils.dist import cleanup, init_distributed, quiet_other_ranks

    try:
        crops = MultiCropConfig(
            global_size=args.global_size, local_size=args.local_size, n_local=args.local_crops
        )
    except ValueError as e:
        print(f"gigaslide pretrain longvit: error: {e}", file=sys.stderr)
        return 2
    cfg = longvit_dino_config(
        **dino_options(args), crops=crops,
    )  # fmt: skip
    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    quiet_other_ranks(info)  # every rank trains on the same data: rank 0 reports for the job
    try:
        ckpt = pretrain_longvit(
            args.source, args.out, image_size=args.image_size, epochs=args.epochs, batch_size=args.batch_size,
            samples_per_slide=args.samples_per_slide, cfg=cfg, model_kwargs=dict(args.model_arg),
            slide_mpp=args.slide_mpp, num_workers=args.workers, device=args.device, precision=args.precision,
            seed=args.seed, progress=not args.no_progress,
        )  # fmt: skip
    finally:
        cleanup()
    if info.is_main:
        extra = "".join(f" (built with {k}={v})" for k, v in args.model_arg)
        print(f"LongViT DINO checkpoint: {ckpt}{extra}")
    sys.stdout.flush()
    return 0
