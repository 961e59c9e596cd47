"""`gigaslide demo`: the whole pipeline on a synthetic cohort the project generates itself.

Stages (each is the real subcommand, each resumable, so a rerun skips finished work):
synth -> tile -> pretrain (DINO) -> embed -> train (classification, survival) -> probe -> heatmap
-> Giga-SSL (bank -> pretrain gigassl -> encode -> linear evaluation against the untrained aggregator
and mean pooling).
Then LongViT on whole-slide images (``--longvit-size``): slide-images -> pretrain longvit -> train ->
heatmap.
No pretrained weights exist offline, so the demo pretrains its own tile encoder: a small ViT
(``vit_tiny_d4``) trained with DINO on the cohort's tiles for a few epochs (CPU-sized crops and
head), then embeds the tiles with that teacher. ``--pretrain-epochs 0`` skips pretraining and
embeds with a *randomly initialised* ``resnet18_trunc`` instead, and says so.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger("gigaslide.demo")

# resnet18_trunc (the Giga-SSL tile embedder) was trained on 10x tiles: 256 px at 1.0 um/px
TILE_MPP = "1.0"
PRETRAIN_ENCODER = "vit_tiny_d4"
# DINO at CPU size: 256 random tiles, 64/32 px crops (of 256 px tiles at 1 um/px), 2 local crops,
# a 1024-prototype head
PRETRAIN_ARGS = ["--max-tiles", "256", "--global-size", "64", "--local-size", "32", "--local-crops", "2",
                 "--out-dim", "1024",
                 "--head-hidden-dim", "512", "--head-bottleneck-dim", "128", "--warmup-epochs", "1", "--freeze-last-layer", "0",
                 "--warmup-teacher-temp-epochs", "0", "--drop-path", "0", "--batch-size", "32",
                 "--lr", "0.002", "--momentum-teacher", "0.99", "--no-progress"]  # fmt: skip


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "demo",
        help="run the whole pipeline on a generated synthetic cohort",
        description=(
            "Generate a synthetic H&E cohort, tile it, pretrain a small ViT tile encoder on it with DINO "
            "(no weights are downloaded), embed the tiles with it, cross-validate ABMIL for classification "
            "and survival, run a linear probe and draw an attention heatmap. Every stage resumes on a rerun."
        ),
    )
    p.add_argument("--out", type=Path, default=Path("demo_out"), help="output folder (default: demo_out)")
    p.add_argument("--n-slides", type=int, default=24, help="number of synthetic slides")
    p.add_argument("--size", type=int, default=4096, help="synthetic slide side in pixels at 0.5 um/px")
    p.add_argument("--folds", type=int, default=4, help="cross-validation folds")
    p.add_argument("--epochs", type=int, default=20, help="training epochs per fold")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="worker processes for tiling/embedding")
    p.add_argument(
        "--pretrain-epochs",
        type=int,
        default=1,
        help="DINO epochs for the demo's tile encoder (0: no pretraining, random-init resnet18_trunc)",
    )
    p.add_argument("--gigassl-epochs", type=int, default=10, help="Giga-SSL SimCLR epochs (0 skips the step)")
    p.add_argument("--e2e-epochs", type=int, default=2, help="end-to-end training epochs (0 skips the step)")
    p.add_argument(
        "--longvit-size",
        type=int,
        default=256,
        help="LongViT step: slide image side (px) for DINO pretraining + finetuning + heatmap (0: skip)",
    )
    p.add_argument(
        "--hipt-epochs", type=int, default=2, help="HIPT stage-2 DINO epochs (0 skips the HIPT step)"
    )
    return p


def _stage(name: str, argv: Sequence[str]) -> None:
    from gigaslide.cli.main import main
    from gigaslide.utils.errors import UserError

    log.info("== %s: gigaslide %s", name, " ".join(argv))
    t0 = time.perf_counter()
    code = main(list(argv))
    if code != 0:
        # the stage printed its own error line; this one says where the demo stopped (cli.main, exit 2)
        raise UserError(f"demo stage '{name}' failed with exit status {code} (see the message above)")
    log.info("== %s done in %.1f s", name, time.perf_counter() - t0)


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    cohort, tiles, feats = out / "cohort", out / "tiles", out / "features"
    labels = cohort / "labels.csv"
    seed = str(args.seed)
    _stage(
        "synth",
        [
            "synth",
            "--out",
            str(cohort),
            "--n-slides",
            str(args.n_slides),
            "--seed",
            seed,
            "--width",
            str(args.size),
            "--height",
            str(args.size),
            "--workers",
            str(args.workers),
        ],
    )
    _stage(
        "tile",
        [
            "tile",
            str(cohort / "slides"),
            "--out",
            str(tiles),
            "--target-mpp",
            TILE_MPP,
            "--tile-size",
            "256",
            "--workers",
            str(args.workers),
            "--preview",
        ],
    )
    encoder = ["--encoder", "resnet18_trunc"]
    if args.pretrain_epochs > 0:
        ckpt = out / "pretrain" / "checkpoint.pth"
        _stage(
            "pretrain",
            [
                "pretrain",
                "dino",
                str(tiles),
                "--encoder",
                PRETRAIN_ENCODER,
                "--out",
                str(ckpt.parent),
                "--epochs",
                str(args.pretrain_epochs),
                "--workers",
                str(max(0, args.workers - 1)),
                "--seed",
                seed,
                "--device",
                "cpu",
                *PRETRAIN_ARGS,
            ],
        )
        encoder = ["--encoder", PRETRAIN_ENCODER, "--weights", str(ckpt)]
    else:
        print(
            "\nNOTE: --pretrain-epochs 0: the demo embeds tiles with a RANDOMLY INITIALISED resnet18_trunc. "
            "Pass --weights to `gigaslide embed` for real features.\n",
            file=sys.stderr,
        )
    _stage(
        "embed",
        [
            "embed",
            str(tiles),
            *encoder,
            "--out",
            str(feats),
            "--batch-size",
            "32",
            "--workers",
            str(max(0, args.workers - 1)),
            "--seed",
            seed,
        ],
    )
    common = [
        "--features",
        str(feats),
        "--labels",
        str(labels),
        "--folds",
        str(args.folds),
        "--epochs",
        str(args.epochs),
        "--seed",
        seed,
    ]
    _stage(
        "train-classification",
        ["train", *common, "--model", "abmil", "--task", "classification", "--out", str(out / "train_cls")],
    )
    _stage(
        "train-survival",
        ["train", *common, "--model", "abmil", "--task", "survival", "--out", str(out / "train_surv")],
    )
    _stage(
        "probe",
        [
            "probe",
            "--embeddings",
            str(feats),
            "--labels",
            str(labels),
            "--method",
            "linear",
            "--folds",
            str(args.folds),
            "--seed",
            seed,
            "--out",
            str(out / "probe"),
        ],
    )
    first = _heatmap_slide(cohort)
    _stage(
        "heatmap",
        [
            "heatmap",
            "--slide",
            str(first),
            "--scores",
            str(out / "train_cls" / "attention" / f"{first.stem}.h5"),
            "--out",
            str(out / "heatmap.png"),
        ],
    )
    if args.gigassl_epochs > 0:
        _gigassl_stages(out, tiles, feats, labels, encoder, args)
    if args.e2e_epochs > 0:
        _e2e_stage(out, tiles, labels, encoder, args)
    if args.longvit_size > 0:
        _longvit_step(args, out, first)
    if args.hipt_epochs > 0:
        _hipt_stages(out, cohort, labels, encoder, args)
    _print_summary(out, args.pretrain_epochs)
    return 0


# Giga-SSL at demo size: 3 augmentations x 12 tiles per slide, a 64-wide sparse stage, 10 views per slide
GIGASSL_PRETRAIN_ARGS = ["--aggregator-arg", "width=64", "--batch-size", "8", "--lr", "0.1", "--temperature",
                         "0.1", "--warmup-epochs", "1", "--device", "cpu", "--no-progress"]  # fmt: skip


def _gigassl_stages(out: Path, tiles: Path, feats: Path, labels: Path, encoder: list[str],
                    args: argparse.Namespace) -> None:  # fmt: skip
    """Bank -> SimCLR pretraining -> encode (trained and untrained) -> linear evaluation beside mean pooling."""
    from gigaslide.ssl.simclr import untrained_checkpoint_like

    g, seed = out / "gigassl", str(args.seed)
    _stage("gigassl-bank", ["gigassl", "bank", str(tiles), *encoder, "--out", str(g / "bank"), "--n-aug", "3",
                            "--n-tiles", "12", "--batch-size", "36", "--workers", str(args.workers), "--seed", seed,
                            "--device", "cpu", "--no-progress"])  # fmt: skip
    ckpt = g / "pretrain" / "checkpoint.pth"
    _stage("gigassl-pretrain", ["pretrain", "gigassl", str(g / "bank"), "--out", str(ckpt.parent), "--epochs",
                                str(args.gigassl_epochs), "--seed", seed, *GIGASSL_PRETRAIN_ARGS])  # fmt: skip
    untrained = untrained_checkpoint_like(ckpt, g / "untrained.pth", seed=args.seed)
    for name, c in (("gigassl", ckpt), ("untrained", untrained)):
        _stage(f"gigassl-encode-{name}", ["gigassl", "encode", str(feats), "--checkpoint", str(c), "--out",
                                          str(g / f"{name}.npz"), "--views", "10", "--seed", seed, "--device", "cpu",
                                          "--no-progress"])  # fmt: skip
    _stage("gigassl-evaluate", ["gigassl", "evaluate", "--embeddings", str(g / "gigassl.npz"), "--compare",
                                f"untrained aggregator={g / 'untrained.npz'}", "--features", str(feats), "--labels",
                                str(labels), "--budgets", "100%,25%", "--folds", str(args.folds), "--seed", seed,
                                "--out", str(g / "evaluation")])  # fmt: skip


def _e2e_stage(out: Path, tiles: Path, labels: Path, encoder: list[str], args: argparse.Namespace) -> None:
    """End-to-end training of the demo's tile encoder with a gated-attention aggregator, gradient-cached:
    16 tiles per slide read from the slides at every step (96 px, the DINO crop size), 4 per encoder pass."""
    _stage("e2e", ["e2e", "--tiles", str(tiles), "--labels", str(labels), *encoder, "--model", "gated_abmil",
                   "--tiles-per-slide", "16", "--mode", "cached", "--chunk-size", "4", "--input-size", "96",
                   "--epochs", str(args.e2e_epochs), "--lr", "1e-4", "--seed", str(args.seed),
                   "--out", str(out / "e2e")])  # fmt: skip


# LongViT at demo size: 2 layers, 64-d, 4 heads; DINO on size/2 and size/4 px crops with a 256-prototype head
LONGVIT_MODEL = {"depth": 2, "embed_dim": 64, "num_heads": 4}
LONGVIT_PRETRAIN_ARGS = ["--epochs", "1", "--batch-size", "4", "--samples-per-slide", "2", "--local-crops", "2",
                         "--out-dim", "256", "--head-hidden-dim", "256", "--head-bottleneck-dim", "64",
                         "--warmup-epochs", "1", "--warmup-teacher-temp-epochs", "0", "--drop-path", "0",
                         "--lr", "0.05", "--momentum-teacher", "0.99", "--device", "cpu", "--no-progress"]  # fmt: skip


def _longvit_step(args: argparse.Namespace, out: Path, slide: Path) -> None:
    """Slide images -> LongViT DINO pretraining -> cross-validated finetuning -> relevance heatmap."""
    cohort, size, seed = out / "cohort", args.longvit_size, str(args.seed)
    images, pre, run_dir = (
        out / "longvit" / f"images-{size}",
        out / "longvit" / "pretrain",
        out / "longvit" / "train",
    )
    _stage("longvit-images", ["slide-images", *map(str, sorted((cohort / "slides").glob("*.tiff"))),
                              "--out", str(images), "--size", str(size)])  # fmt: skip
    model_args = [a for k, v in LONGVIT_MODEL.items() for a in ("--model-arg", f"{k}={v}")]
    _stage("longvit-pretrain", ["pretrain", "longvit", str(images), "--out", str(pre), "--global-size",
                                str(size // 2), "--local-size", str(size // 4), "--seed", seed,
                                *model_args, *LONGVIT_PRETRAIN_ARGS])  # fmt: skip
    sets = [a for k, v in LONGVIT_MODEL.items() for a in ("--set", f"model_kwargs.{k}={v}")]
    _stage("longvit-train", ["train", "--slide-images", str(images), "--labels", str(cohort / "labels.csv"),
                             "--model", "longvit", "--input-size", str(size), "--folds", str(args.folds),
                             "--epochs", "3", "--seed", seed, *sets, "--set",
                             f"model_kwargs.weights={pre / 'checkpoint.pth'}", "--set", "lr=0.001",
                             "--device", "cpu", "--no-progress", "--out", str(run_dir)])  # fmt: skip
    _stage("longvit-heatmap", ["heatmap", "--slide", str(slide), "--scores", str(images / f"{slide.stem}.npy"),
                               "--model", str(run_dir / "checkpoints" / "fold0.pt"),
                               "--out", str(out / "longvit" / "heatmap.png")])  # fmt: skip


# HIPT at demo size: 1024 px regions at 1 um/px (4x4 grids of 256 px patches instead of 16x16), so views
# are 4x4 global / 2x2 local token crops; ViT_4096 keeps its published size (6 blocks, width 192)
HIPT_PRETRAIN_ARGS = ["--global-size", "4", "--local-size", "2", "--local-crops", "2", "--out-dim", "256",
                      "--head-hidden-dim", "64", "--head-bottleneck-dim", "32", "--warmup-epochs", "0",
                      "--batch-size", "16", "--lr", "0.005", "--device", "cpu", "--no-progress"]  # fmt: skip


def _hipt_stages(out: Path, cohort: Path, labels: Path, encoder: list[str], args: argparse.Namespace) -> None:
    """HIPT: regions -> (M, 16, D) token grids -> stage-2 DINO of ViT_4096 -> `train --model hipt` with
    ViT_4096 frozen (at most 5 epochs) -> KNN on mean patch tokens (HIPT's KNN evaluation) -> region
    attention heatmap. Everything under OUT/hipt/.
    Measured 74 s for 12 slides x 3 folds on the shared 2-core machine (embedding the regions: 30 s)."""
    h, seed = out / "hipt", str(args.seed)
    _stage("hipt-tile", ["tile", str(cohort / "slides"), "--out", str(h / "tiles"), "--target-mpp", TILE_MPP,
                         "--tile-size", "256", "--region-size", "1024", "--workers", str(args.workers)])  # fmt: skip
    _stage("hipt-embed", ["embed", str(h / "tiles"), *encoder, "--regions", "--out", str(h / "regions"),
                          "--batch-size", "32", "--seed", seed])  # fmt: skip
    ckpt = h / "stage2" / "checkpoint.pth"
    _stage("hipt-pretrain", ["pretrain", "hipt-region", str(h / "regions"), "--out", str(ckpt.parent),
                             "--epochs", str(args.hipt_epochs), "--seed", seed, *HIPT_PRETRAIN_ARGS])  # fmt: skip
    _stage("hipt-train", ["train", "--features", str(h / "regions"), "--labels", str(labels), "--model", "hipt",
                          "--folds", str(args.folds), "--epochs", str(min(args.epochs, 5)), "--seed", seed,
                          "--set", f"model_kwargs.vit4k_weights={ckpt}", "--set", "model_kwargs.freeze_4k=true",
                          "--out", str(h / "train")])  # fmt: skip
    _stage("hipt-knn", ["probe", "--embeddings", str(h / "regions"), "--labels", str(labels), "--method", "knn",
                        "--region-level", "vit256", "--folds", str(args.folds), "--seed", seed,
                        "--out", str(h / "knn")])  # fmt: skip
    first = _heatmap_slide(cohort)
    _stage("hipt-heatmap", ["heatmap", "--slide", str(first), "--scores",
                            str(h / "train" / "attention" / f"{first.stem}.h5"), "--out", str(h / "heatmap.png")])  # fmt: skip


def _heatmap_slide(cohort: Path) -> Path:
    """The positive slide with the most tumour (where attention has something to show)."""
    import pandas as pd

    labels = pd.read_csv(cohort / "labels.csv")
    positives = labels[labels["label"] == 1]
    pick = positives if len(positives) else labels
    if "tumor_fraction" in pick:
        pick = pick.sort_values("tumor_fraction", ascending=False)
    return cohort / "slides" / f"{pick['slide_id'].iloc[0]}.tiff"


def _print_summary(out: Path, pretrain_epochs: int) -> None:
    lines = ["", "gigaslide demo results", "======================"]
    if pretrain_epochs > 0:
        lines.append(
            f"tile encoder: {PRETRAIN_ENCODER} pretrained with DINO on the demo tiles for {pretrain_epochs} "
            f"epoch(s) ({out / 'pretrain' / 'checkpoint.pth'})"
        )
    else:
        lines.append("tile encoder: resnet18_trunc with RANDOM weights (--pretrain-epochs 0)")
    for name in ("train_cls", "train_surv", "probe", "longvit/train"):
        path = out / name / "results.json"
        if not path.exists():
            continue
        res = json.loads(path.read_text())
        summary = res.get("metrics", {})
        shown = []
        for metric, value in summary.items():
            if isinstance(value, dict) and "mean" in value:
                shown.append(f"{metric}={value['mean']:.3f}±{value.get('std', 0.0):.3f}")
        lines.append(f"{name:>12}: " + ", ".join(shown[:4]))
    lines.append(f"report: {out / 'train_cls' / 'summary.md'}   heatmap: {out / 'heatmap.png'}")
    hipt = out / "hipt" / "train" / "results.json"
    if hipt.exists():
        auc = json.loads(hipt.read_text()).get("metrics", {}).get("auc", {})
        lines.append(f"HIPT (stage-2 pretrained ViT_4096, frozen): AUC {auc.get('mean', float('nan')):.3f}   "
                     f"heatmap: {out / 'hipt' / 'heatmap.png'}")  # fmt: skip
    knn = out / "hipt" / "knn" / "results.json"
    if knn.exists():
        auc = json.loads(knn.read_text()).get("metrics", {}).get("auc", {})
        lines.append(f"HIPT KNN on mean ViT_256 region tokens: AUC {auc.get('mean', float('nan')):.3f}")
    e2e = out / "e2e" / "results.json"
    if e2e.exists():
        res = json.loads(e2e.read_text())
        auc = res.get("best_val_auc")
        lines.append(f"end-to-end ({res['n_train']} training slides, encoder {res['encoder_init']}): best validation "
                     f"AUC {auc:.3f}" if auc is not None else "end-to-end: no validation AUC")  # fmt: skip
    gigassl = out / "gigassl" / "evaluation" / "report.md"
    if gigassl.exists():
        table = [line for line in gigassl.read_text().splitlines() if line.startswith("|")]
        lines += ["Giga-SSL linear probe (AUC):", *table]
    print("\n".join(lines))
