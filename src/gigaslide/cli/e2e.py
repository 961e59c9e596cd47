"""`gigaslide e2e`: end-to-end full-slide training of a tile encoder and a slide aggregator.

One process (``--mode naive`` or ``--mode cached``) or N + 1 processes under torchrun
(``torchrun --nproc_per_node N+1 -m gigaslide e2e --mode distributed ...``: rank 0 runs the aggregator,
ranks 1..N the encoder).
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_folder


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "e2e",
        help="train a tile encoder and a slide aggregator jointly, from the slides (Campanella et al. 2024)",
        description="End-to-end full-slide training: K tiles per slide read on the fly, encoded with gradients, "
        "aggregated, one slide per step. Resumable (rerun the same command).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--labels", type=Path, required=True, help="CSV with slide_id, case_id, label")
    p.add_argument(
        "--out", type=Path, required=True, help="output folder (checkpoints, encoder.pth, aggregator.pt)"
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--slides", default=None, help="slide file, folder or CSV (`path` column): tiled into OUT/tiles"
    )
    src.add_argument(
        "--tiles", type=Path, default=None, help="a `gigaslide tile` output folder to train from"
    )
    p.add_argument("--encoder", default="resnet18_trunc", help="tile encoder (see `gigaslide encoders`)")
    p.add_argument("--weights", default=None, help="encoder weights file, 'registry' or 'random'")
    p.add_argument("--model", default="gated_abmil", help="slide aggregator (see `gigaslide models`)")
    p.add_argument(
        "--tiles-per-slide", type=int, default=64, metavar="K", help="tiles sampled per slide and step"
    )
    p.add_argument("--mode", choices=["naive", "cached", "distributed"], default="naive",
                   help="naive: encode K tiles at once; cached: gradient caching (memory flat in K); "
                   "distributed: N encoder processes + 1 aggregator process (torchrun)")  # fmt: skip
    p.add_argument("--chunk-size", type=int, default=32, help="tiles per encoder pass in cached mode")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument(
        "--optimizer", choices=["adamw", "adam", "sgd"], default="adamw", help="AdamW is the paper's"
    )
    p.add_argument("--lr", type=float, default=5e-5, help="peak learning rate (the paper's AdamW value)")
    p.add_argument("--weight-decay", type=float, default=1e-2)
    p.add_argument("--slide-fraction", type=float, default=1.0, help="slides per epoch (the paper: 0.5)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="cases held out for the validation AUC")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--deterministic", action="store_true", help="deterministic torch algorithms")
    p.add_argument("--freeze-bn", action="store_true",
                   help="batch norm in eval mode (exact equality of naive, cached and distributed modes)")  # fmt: skip
    p.add_argument("--no-augment", action="store_true", help="no tile augmentation")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="AMP on GPU")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (torchrun: each rank its local GPU)")
    p.add_argument(
        "--target-mpp", type=float, default=None, help="tiling resolution (default: the encoder's)"
    )
    p.add_argument(
        "--tile-size", type=int, default=None, help="tile side when tiling (default: encoder input)"
    )
    p.add_argument("--input-size", type=int, default=None, help="encoder input side (default: the encoder's)")
    p.add_argument(
        "--min-tissue", type=float, default=0.25, help="tissue fraction to keep a tile when tiling"
    )
    p.add_argument("--slide-mpp", type=float, default=None, help="level-0 um/px for slides lacking it")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="aggregator keyword argument, e.g. --set dropout=0.0")  # fmt: skip
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    import yaml

    from gigaslide.experiments.e2e import E2EConfig, run_e2e
    from gigaslide.utils.dist import init_distributed, quiet_other_ranks

    kwargs = {}
    for item in args.set:
        if "=" not in item:
            raise ValueError(f"--set {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        kwargs[key.strip()] = yaml.safe_load(value)
    cfg = E2EConfig(
        labels_csv=args.labels, out_dir=args.out, slides=args.slides, tiles=args.tiles, encoder=args.encoder,
        weights=args.weights, model=args.model, model_kwargs=kwargs, tiles_per_slide=args.tiles_per_slide,
        mode=args.mode, chunk_size=args.chunk_size, epochs=args.epochs, optimizer=args.optimizer, lr=args.lr, weight_decay=args.weight_decay,
        slide_fraction=args.slide_fraction, val_fraction=args.val_fraction, seed=args.seed,
        deterministic=args.deterministic, precision=args.precision, device=args.device, target_mpp=args.target_mpp,
        tile_size=args.tile_size, input_size=args.input_size, min_tissue=args.min_tissue, freeze_bn=args.freeze_bn,
        augment=not args.no_augment, slide_mpp=args.slide_mpp,
    )  # fmt: skip
    info = init_distributed()  # run_e2e joins the same group; the lock needs it to tell every rank
    quiet_other_ranks(info, logging.WARNING)  # notices once (rank 0); any rank's warnings still show
    with output_folder(args.out, wait=args.wait, dist_info=info):
        res = run_e2e(cfg)
    if info.is_main:
        last = res.history[-1] if res.history else {}
        print(json.dumps({"out": str(res.out_dir), "epochs": len(res.history), "final_loss": last.get("loss"),
                          "best_val_auc": res.best_val_auc, "n_train": res.n_train, "n_val": res.n_val}))  # fmt: skip
        if res.random_init:
            print("note: the encoder started from RANDOM weights (no --weights given)")
    return 0
