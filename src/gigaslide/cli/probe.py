"""`gigaslide probe`: KNN / linear probes of fixed slide embeddings with grouped cross-validation.

Examples::

    gigaslide probe --embeddings feats/ --labels labels.csv --method knn --folds 10 --out runs/knn
    gigaslide probe --embeddings slides.npz --labels labels.csv --method linear --train-fraction 0.25 --out r/
    gigaslide probe --embeddings slides.h5 --labels labels.csv --method linear --splits clam_splits/ --out r/
    gigaslide probe --embeddings feats/ --labels labels.csv --monte-carlo 20 --test-fraction 0.2 --out r/

Embeddings are read by :func:`gigaslide.data.embeddings.load_slide_embeddings` (the files written by
``gigaslide train --save-embeddings``, ``.npz``/``.pt``/``.h5`` with ``embeddings`` + ``slide_ids``, or a
feature folder mean-pooled per slide); labels by :func:`read_labels_csv`; the evaluation itself is
:func:`gigaslide.eval.probes.run_probe` and :func:`gigaslide.eval.reports.write_report`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd

from gigaslide.cli.common import SPLIT_DEFAULTS, add_split_arguments, add_wait_argument, output_folder
from gigaslide.data.embeddings import load_slide_embeddings
from gigaslide.data.labels import format_ids, read_labels
from gigaslide.data.split_plan import build_splits
from gigaslide.data.splits import save_splits
from gigaslide.eval.probes import DEFAULT_KNN_K, run_probe
from gigaslide.eval.reports import FOLD_CI_METHOD, format_metric_table, write_report
from gigaslide.utils.errors import UserError

log = logging.getLogger(__name__)


def read_labels_csv(
    path: str | os.PathLike[str], task: str = "classification", label_col: str = "label"
) -> pd.DataFrame:
    """The labels table, read and checked by the reader `train` uses
    (:func:`gigaslide.data.labels.read_labels`); the class column is returned as ``label``."""
    return read_labels(path, task, label_col)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "probe",
        help="evaluate slide embeddings with a KNN or linear probe",
        description="Cross-validated KNN (HIPT) or logistic-regression/Cox (Giga-SSL) probe of slide embeddings.",
    )
    p.add_argument(
        "--embeddings", required=True, type=Path, help=".npz/.h5/.pt (embeddings, slide_ids) or a feature dir"
    )
    p.add_argument(
        "--labels", required=True, type=Path, help="CSV with slide_id, case_id, label (or time, event)"
    )
    p.add_argument("--out", required=True, type=Path, help="output directory for the report")
    p.add_argument("--method", choices=["knn", "linear"], default="linear")
    p.add_argument("--task", choices=["classification", "survival"], default="classification")
    p.add_argument("--label-col", default="label", help="column of --labels holding the class")
    add_split_arguments(p, SPLIT_DEFAULTS)
    p.add_argument(
        "--k",
        type=int,
        default=None,
        help=f"KNN neighbours (default: {DEFAULT_KNN_K}, or half the training slides when fewer)",
    )
    p.add_argument("--knn-metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--knn-weighting", choices=["uniform", "distance"], default="uniform")
    p.add_argument(
        "--normalize", choices=["standard", "l2", "none"], default="standard", help="linear probe scaling"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--allow-mixed-features",
        action="store_true",
        help="use feature files from different encoders/weights anyway (refused by default)",
    )
    p.add_argument(
        "--region-level",
        choices=["auto", "vit4k", "vit256"],
        default="auto",
        help="HIPT region folders: mean ViT_4096 region token (vit4k), mean ViT_256 token of the patches "
        "inside the slide (vit256), or vit4k when the files hold region tokens (auto)",
    )
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    with output_folder(args.out, wait=args.wait):
        text = probe_report(args)
    print(text)
    return 0


def probe_report(args: argparse.Namespace) -> str:
    """Read the inputs, run the probe, write the report into ``args.out``; return the console table."""
    df = read_labels_csv(args.labels, task=args.task, label_col=args.label_col)
    emb = load_slide_embeddings(
        args.embeddings, allow_mixed=args.allow_mixed_features, region_level=args.region_level
    )
    missing = sorted(set(df["slide_id"]) - set(emb.ids))
    if missing:
        detail = [emb.failed[m] for m in missing if m in emb.failed][:5]
        raise UserError(
            f"{len(missing)} labelled slide(s) have no embedding in {args.embeddings}: {format_ids(missing)}"
            + (f"; unreadable: {detail}" if detail else "")
            + f" (embed them, or drop them from {args.labels})"
        )
    splits = build_splits(
        df, args.task, folds=args.folds, monte_carlo=args.monte_carlo, test_fraction=args.test_fraction,
        val_fraction=args.val_fraction, seed=args.seed, splits_dir=args.splits, few_shot_n=args.few_shot,
        train_fraction=args.train_fraction,
    )  # fmt: skip
    save_splits(splits, args.out / "splits")
    kw = (
        {"k": args.k, "metric": args.knn_metric, "weighting": args.knn_weighting}
        if args.method == "knn"
        else {"normalize": args.normalize}
    )
    X = np.asarray(emb.vectors, dtype=np.float64)  # (S, E)
    result = run_probe(X, emb.ids, df, splits, method=args.method, task=args.task, **kw)
    source = "monte_carlo_splits" if args.monte_carlo is not None else "kfold_splits"
    config = {
        **result.config,
        "embeddings": str(args.embeddings),
        "labels": str(args.labels),
        "label_col": args.label_col,
        "folds": len(splits),
        "splits_source": str(args.splits) if args.splits else source,
        "test_fraction": args.test_fraction if args.monte_carlo is not None else None,
        "val_fraction": args.val_fraction,
        "train_fraction": args.train_fraction,
        "few_shot": args.few_shot,
        "seed": args.seed,
        "unreadable_features": emb.failed,
        "embeddings_provenance": emb.attrs,
    }
    protocol = f"{len(splits)} Monte Carlo splits" if args.monte_carlo is not None else f"{len(splits)} folds"
    title = f"{args.method} probe ({args.task}, {protocol})"
    paths = write_report(
        args.out, result.summary, result.per_fold, result.predictions, args.task,
        splits=splits, title=title, config=config, n_boot=args.n_boot, seed=args.seed,
        features=emb.provenance.to_dict() if emb.provenance is not None else None,
    )  # fmt: skip
    doc = json.loads(paths["results"].read_text())
    n_pred = doc["n_predictions"]
    lines = [
        f"{title} -> {args.out}",
        format_metric_table(doc["metrics"], doc["pooled"]),
        f"  fold columns: per-fold test metrics, {FOLD_CI_METHOD}",
        f"  pooled columns: metric on all {n_pred} pooled out-of-fold test predictions, "
        + next((p["ci_method"] for p in doc["pooled"].values()), "bootstrap CI undefined"),
    ]
    return "\n".join(lines)
