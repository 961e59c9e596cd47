"""`gigaslide pretrain gigassl`: Giga-SSL SimCLR pretraining of a slide aggregator on an augmented bank."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_folder
from gigaslide.cli.pretrain_args import add_run_arguments
from gigaslide.cli.pretrain_args import key_value as _key_value


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "gigassl",
        help="Giga-SSL: SimCLR of a slide aggregator on a `gigaslide gigassl bank`",
        description=(
            "Giga-SSL pretraining (Lazard et al. 2023): two views per slide (one bank augmentation, T random "
            "tiles, slide-level flips/rotations/scaling of their sparse map) through the aggregator and a "
            "projector MLP, NT-Xent over minibatches of B slides, Adam with warm-up and cosine decay. Writes "
            "OUT/checkpoint.pth (reruns resume); encode with `gigaslide gigassl encode`. Multi-GPU: "
            "torchrun --nproc_per_node K -m gigaslide pretrain gigassl ..."
        ),
    )
    p.add_argument("bank_dir", metavar="BANK_DIR", type=Path, help="bank folder (gigaslide gigassl bank)")
    p.add_argument("--out", required=True, type=Path, help="output folder (checkpoint.pth, logs)")
    p.add_argument(
        "--aggregator", default="sparseconvmil", help="sparseconvmil (paper), mean or abmil (ablations)"
    )
    p.add_argument("--aggregator-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator constructor argument (repeatable), e.g. width=128")  # fmt: skip
    p.add_argument("--epochs", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=256, help="slides per GPU/process and step")
    p.add_argument("--n-tiles", type=int, default=5, help="tiles per view (T)")
    p.add_argument("--temperature", type=float, default=0.05, help="NT-Xent temperature")
    p.add_argument("--proj-dim", type=int, default=256, help="projector output width")
    p.add_argument("--lr", type=float, default=0.03, help="Adam learning rate per 256 slides of global batch")
    p.add_argument("--min-lr", type=float, default=0.0)
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear warm-up (capped at --epochs)")
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.add_argument("--no-slide-augment", action="store_true", help="no slide-level augmentation (ablation)")
    p.add_argument("--grid-unit", type=float, default=None,
                   help="map cell in pixels at the tiling resolution (224 = the paper's d); default one tile")  # fmt: skip
    p.add_argument("--checkpoint-every", type=int, default=0, help="also checkpoint every N steps")
    add_run_arguments(p)
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.ssl.simclr import GigaSSLConfig, pretrain_gigassl
    from gigaslide.utils.dist import cleanup, init_distributed, quiet_other_ranks

    cfg = GigaSSLConfig(
        aggregator=args.aggregator, aggregator_kwargs=dict(args.aggregator_arg), proj_dim=args.proj_dim,
        temperature=args.temperature, n_tiles=args.n_tiles, lr=args.lr, min_lr=args.min_lr,
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay,
        slide_augment=not args.no_slide_augment, grid_unit=args.grid_unit,
    )  # fmt: skip
    info = init_distributed(backend="gloo" if args.device == "cpu" else None)
    quiet_other_ranks(info)  # every rank trains on its share of the same batches: rank 0 reports
    try:
        with output_folder(args.out, wait=args.wait, dist_info=info):
            ckpt = pretrain_gigassl(
                args.bank_dir, args.out, epochs=args.epochs, batch_size=args.batch_size, cfg=cfg,
                device=args.device, precision=args.precision, seed=args.seed,
                checkpoint_every=args.checkpoint_every, progress=not args.no_progress,
            )  # fmt: skip
    finally:
        cleanup()
    if info.is_main:
        print(f"Giga-SSL checkpoint: {ckpt}")
        print(
            f"encode with it:      gigaslide gigassl encode FEATURES_OR_BANK --checkpoint {ckpt} --out emb.npz"
        )
    sys.stdout.flush()
    return 0
