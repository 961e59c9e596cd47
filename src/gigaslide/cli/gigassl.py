"""`gigaslide gigassl`: Giga-SSL commands.

``bank`` builds the augmented embedding bank of a tiling output; ``encode`` turns slides into
Giga-SSL embeddings with a pretrained aggregator (`gigaslide pretrain gigassl`); ``evaluate`` runs the
linear probe of those embeddings beside mean pooling under the paper's data budgets.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from gigaslide.cli.common import add_wait_argument, output_file, output_folder


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
            "OUT/h5_files/<slide_id>.h5: features (n_aug, n_tiles, D) + coords (n_aug, n_tiles, 2). With "
            "--identity-view, also OUT/identity/h5_files/<slide_id>.h5: all tissue tiles without augmentation "
            "(as `gigaslide embed` writes them), what `gigassl encode BANK` reads. Resumable; "
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
    b.add_argument(
        "--identity-view",
        action="store_true",
        help="also embed every tissue tile without augmentation into OUT/identity (for `gigassl encode`; "
        "costs one `gigaslide embed` pass; can be added to a finished bank by a rerun)",
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
    _add_encode(sub)
    _add_evaluate(sub)
    return p


def _add_encode(sub: argparse._SubParsersAction) -> None:
    e = sub.add_parser(
        "encode",
        help="one L2-normalised Giga-SSL embedding per slide (mean of R views)",
        description=(
            "Embed every slide of SOURCE (a `gigaslide embed` output: plain, non-augmented tile features; or a "
            "bank built with --identity-view) with the pretrained aggregator: R views of T random tiles, "
            "their embeddings averaged and L2-normalised. Writes OUT (.npz: embeddings, slide_ids), the "
            "format `gigaslide probe --embeddings` reads."
        ),
    )
    e.add_argument("source", metavar="BANK_OR_FEATURES", type=Path, help="features folder or bank folder")
    e.add_argument("--checkpoint", required=True, type=Path, help="checkpoint.pth of `pretrain gigassl`")
    e.add_argument(
        "--out", required=True, type=Path, help="output .npz (a folder gets gigassl_embeddings.npz)"
    )
    e.add_argument("--views", type=int, default=50, help="R views per slide (default 50)")
    e.add_argument("--n-tiles", type=int, default=None, help="tiles per view (default: the training T)")
    e.add_argument("--use-augmented", action="store_true",
                   help="bank without an identity augmentation: draw views from its augmentations")  # fmt: skip
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    e.set_defaults(_gigassl_run=_run_encode)


def _add_evaluate(sub: argparse._SubParsersAction) -> None:
    v = sub.add_parser(
        "evaluate",
        help="linear probe of Giga-SSL embeddings beside mean pooling, with the paper's data budgets",
        description=(
            "Cross-validated logistic-regression probe (AUC) of the Giga-SSL embeddings (L2) and of the mean of "
            "the tile features (standardised), on the same case-grouped folds, for each training budget "
            "(default: 100%%, 25%%, 50, 100 and 250 training slides). Writes OUT/results.csv and OUT/report.md."
        ),
    )
    v.add_argument("--embeddings", required=True, type=Path, help="Giga-SSL embeddings (.npz of `encode`)")
    v.add_argument("--features", required=True, type=Path, help="tile-feature folder (mean-pooling baseline)")
    v.add_argument("--compare", action="append", default=[], metavar="NAME=PATH",
                   help="another embeddings file probed like the Giga-SSL one (repeatable), e.g. untrained=u.npz")  # fmt: skip
    v.add_argument("--labels", required=True, type=Path, help="CSV with slide_id, case_id, label")
    v.add_argument("--label-col", default="label")
    v.add_argument("--out", required=True, type=Path, help="report folder")
    v.add_argument(
        "--budgets", default="100%,25%,50,100,250", help="comma-separated: percentages or slide counts"
    )
    v.add_argument("--folds", type=int, default=10)
    v.add_argument("--seed", type=int, default=0)
    add_wait_argument(v)
    v.set_defaults(_gigassl_run=_run_evaluate)


def _run_encode(args: argparse.Namespace) -> int:
    from gigaslide.ssl.gigassl_encode import encode_gigassl

    out = output_file(args.out, "gigassl_embeddings.npz")
    res = encode_gigassl(args.source, args.checkpoint, out, n_views=args.views, n_tiles=args.n_tiles,
                         use_augmented=args.use_augmented, device=args.device, seed=args.seed,
                         progress=not args.no_progress)  # fmt: skip
    print(f"{len(res.slide_ids)} slide embeddings {res.embeddings.shape} -> {res.path}")
    if res.failed:
        print(f"{len(res.failed)} slide(s) failed: " + "; ".join(res.failed.values()), file=sys.stderr)
    return 1 if res.failed else 0


def _run_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from gigaslide.cli.probe import read_labels_csv
    from gigaslide.data.embeddings import load_slide_embeddings
    from gigaslide.experiments.gigassl_eval import Representation, evaluate_representations, parse_budget

    budgets = [parse_budget(b) for b in args.budgets.split(",") if b.strip()]
    extra = [c.split("=", 1) for c in args.compare]
    if any(len(c) != 2 for c in extra):
        raise ValueError(f"--compare takes NAME=PATH, got {args.compare}")
    with output_folder(args.out, wait=args.wait):
        df = read_labels_csv(args.labels, label_col=args.label_col)
        reps = {}
        for name, path, norm in [("giga-ssl", args.embeddings, "l2"), *[(n, Path(p), "l2") for n, p in extra],
                                 ("mean pooling", args.features, "standard")]:  # fmt: skip
            emb = load_slide_embeddings(path)
            reps[name] = Representation(np.asarray(emb.vectors, dtype=np.float64), emb.ids, norm)
        evaluate_representations(reps, df, args.out, budgets=budgets, folds=args.folds, seed=args.seed,
                                 label_col=args.label_col)  # fmt: skip
    print((args.out / "report.md").read_text())
    return 0


def run(args: argparse.Namespace) -> int:
    sub_run = getattr(args, "_gigassl_run", None)
    if sub_run is not None:
        return int(sub_run(args))
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
                identity_view=args.identity_view,
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
    text, n_failed = summary.report(info.is_distributed and info.is_main)
    if info.is_main:  # summaries go to stdout, as in every command
        print(text)
    return 1 if n_failed else 0
