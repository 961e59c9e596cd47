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
import warnings
from pathlib import Path

import numpy as np
import pandas as pd

from gigaslide.data.embeddings import load_slide_embeddings
from gigaslide.data.split_plan import build_splits
from gigaslide.data.splits import save_splits
from gigaslide.eval.probes import run_probe
from gigaslide.eval.reports import write_report

log = logging.getLogger(__name__)


def read_labels_csv(
    path: str | os.PathLike[str], task: str = "classification", label_col: str = "label"
) -> pd.DataFrame:
    """Read a labels table (slide_id, case_id, label | time, event); ids are strings.

    Without ``case_id`` every slide is its own case (warned: grouping by patient is then impossible).
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"labels CSV {p} not found")
    df = pd.read_csv(p, dtype={"slide_id": str, "case_id": str})
    need = ["slide_id", *([label_col] if task == "classification" else ["time", "event"])]
    missing = [c for c in need if c not in df.columns]
    if missing:
        raise ValueError(f"{p}: missing column(s) {missing}; has {list(df.columns)}")
    if "case_id" not in df.columns:
        warnings.warn(f"{p}: no case_id column; each slide is treated as its own case", stacklevel=2)
        df["case_id"] = df["slide_id"]
    dup = df["slide_id"][df["slide_id"].duplicated()].tolist()
    if dup:
        raise ValueError(f"{p}: duplicated slide_id(s): {dup[:20]}")
    na = df.loc[df[need].isna().any(axis=1), "slide_id"].tolist()
    if na:
        raise ValueError(f"{p}: {len(na)} slide(s) with missing {need[1:]}: {na[:20]} (drop those rows)")
    return df


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
    p.add_argument("--label-col", default="label")
    p.add_argument("--folds", type=int, default=10, help="number of case-grouped stratified folds")
    p.add_argument(
        "--monte-carlo",
        type=int,
        default=None,
        metavar="R",
        help="R random case-grouped stratified splits (Monte Carlo CV) instead of k folds",
    )
    p.add_argument(
        "--test-fraction", type=float, default=0.2, help="fraction of cases tested per Monte Carlo split"
    )
    p.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="validation cases: fraction of the training cases (k-fold) or of all cases (Monte Carlo)",
    )
    p.add_argument("--train-fraction", type=float, default=1.0, help="training-data budget inside each fold")
    p.add_argument(
        "--few-shot", type=int, default=None, metavar="N", help="N training slides per class per fold"
    )
    p.add_argument("--splits", type=Path, default=None, help="directory of CLAM/HIPT splits_<k>.csv files")
    p.add_argument("--k", type=int, default=20, help="KNN neighbours")
    p.add_argument("--knn-metric", choices=["cosine", "euclidean"], default="cosine")
    p.add_argument("--knn-weighting", choices=["uniform", "distance"], default="uniform")
    p.add_argument(
        "--normalize", choices=["standard", "l2", "none"], default="standard", help="linear probe scaling"
    )
    p.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples for confidence intervals")
    p.add_argument("--seed", type=int, default=0)
    return p


def run(args: argparse.Namespace) -> int:
    df = read_labels_csv(args.labels, task=args.task, label_col=args.label_col)
    emb = load_slide_embeddings(args.embeddings)
    have = set(emb.ids)
    missing = sorted(set(df["slide_id"]) - have)
    if missing:
        detail = [emb.failed[m] for m in missing if m in emb.failed][:5]
        raise SystemExit(
            f"error: {len(missing)} labelled slide(s) have no embedding in {args.embeddings}: {missing[:20]}"
            + (f"; unreadable: {detail}" if detail else "")
            + " (embed them, or drop them from the labels CSV)"
        )
    try:
        splits = build_splits(
            df, args.task, folds=args.folds, monte_carlo=args.monte_carlo, test_fraction=args.test_fraction,
            val_fraction=args.val_fraction, seed=args.seed, splits_dir=args.splits, few_shot_n=args.few_shot,
            train_fraction=args.train_fraction, label_col=args.label_col,
        )  # fmt: skip
    except ValueError as e:
        raise SystemExit(f"error: {e}") from e
    save_splits(splits, args.out / "splits")
    kw = (
        {"k": args.k, "metric": args.knn_metric, "weighting": args.knn_weighting}
        if args.method == "knn"
        else {"normalize": args.normalize}
    )
    X = np.asarray(emb.vectors, dtype=np.float64)  # (S, E)
    result = run_probe(
        X, emb.ids, df, splits, method=args.method, task=args.task, label_col=args.label_col, **kw
    )
    source = "monte_carlo_splits" if args.monte_carlo is not None else "kfold_splits"
    config = {
        **result.config,
        "embeddings": str(args.embeddings),
        "labels": str(args.labels),
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
    )  # fmt: skip
    doc = json.loads(paths["results"].read_text())
    summary = {}
    for name, r in doc["metrics"].items():
        pooled = doc["pooled"].get(name, {})
        summary[name] = {
            "fold_mean": r["mean"],
            "fold_std": r["std"],
            "ci_over_folds": [r["ci_low"], r["ci_high"]],
            "pooled": pooled.get("value"),
            "ci_pooled": [pooled.get("ci_low"), pooled.get("ci_high")],
        }
    print(json.dumps(summary, indent=1))
    log.info("report written to %s", args.out)
    return 0
