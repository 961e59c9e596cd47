"""Giga-SSL linear evaluation (paper, section 4.2): linear probes of several slide representations
under the paper's data budgets, on the same splits, in one table.

Budgets: a fraction of each fold's training cases (``1.0`` and ``0.25``, Table 2) or a number of
training slides (50, 100, 250; Figure 2), drawn stratified by class with
:func:`gigaslide.data.splits.subsample_train` from the same case-grouped k folds. For every budget
the splits are built once and every representation is probed on exactly those splits with
:func:`gigaslide.eval.probes.run_probe` (logistic regression, C chosen on the fold's validation set).
A budget of N slides that is not smaller than a fold's training set is skipped and reported.

Each representation has its own scaling, as in the paper: Giga-SSL embeddings L2-normalised, the
mean-pooling baseline standardised (``normalize`` per representation).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from gigaslide.data.split_plan import build_splits
from gigaslide.data.splits import Split, subsample_train
from gigaslide.eval.probes import run_probe
from gigaslide.utils.atomic import atomic_write_text

log = logging.getLogger(__name__)

#: the paper's budgets: 100% and 25% of the training data, then 50, 100 and 250 training slides
PAPER_BUDGETS: tuple[float | int, ...] = (1.0, 0.25, 50, 100, 250)


@dataclass
class Representation:
    """(N, E) slide embeddings named by ``ids``, probed after ``normalize`` (standard | l2 | none)."""

    X: np.ndarray
    ids: list[str]
    normalize: str = "standard"


def budget_name(budget: float | int) -> str:
    """``1.0`` -> ``100%``, ``0.25`` -> ``25%``, ``50`` -> ``50 slides``."""
    if isinstance(budget, float):
        return f"{budget * 100:g}%"
    return f"{budget} slides"


def parse_budget(text: str) -> float | int:
    """``100%`` / ``25%`` / ``0.25`` -> a fraction; ``50`` -> a number of slides."""
    t = text.strip()
    try:
        if t.endswith("%"):
            v = float(t[:-1]) / 100.0
        elif "." in t:
            v = float(t)
        else:
            n = int(t)
            if n < 1:
                raise ValueError
            return n
    except ValueError:
        raise ValueError(
            f"budget {text!r}: give a percentage (25%), a fraction (0.25) or a slide count (50)"
        ) from None
    if not 0 < v <= 1:
        raise ValueError(f"budget {text!r}: a fraction must lie in (0, 1]")
    return v


def budget_splits(
    base: Sequence[Split], df: pd.DataFrame, budget: float | int, seed: int = 0, label_col: str = "label"
) -> list[Split] | str:
    """The training budget applied to every split of ``base``, or why it cannot be (a message)."""
    if isinstance(budget, float):
        frac = budget
        return [subsample_train(s, df, frac, seed=seed, label_col=label_col) for s in base]
    small = min(len(s.train) for s in base)
    if budget >= small:
        return f"a fold has only {small} training slides (budget {budget})"
    return [subsample_train(s, df, budget / len(s.train), seed=seed, label_col=label_col) for s in base]


def evaluate_representations(
    reps: Mapping[str, Representation],
    df: pd.DataFrame,
    out_dir: str | os.PathLike[str] | None,
    *,
    budgets: Sequence[float | int] = PAPER_BUDGETS,
    folds: int = 10,
    val_fraction: float = 0.1,
    seed: int = 0,
    label_col: str = "label",
) -> pd.DataFrame:
    """Linear-probe AUC of every representation under every budget, on shared splits.

    Returns the long table (budget, representation, n_train, auc_mean, auc_std, folds, note); with
    ``out_dir``, writes it as ``results.csv`` and a side-by-side ``report.md`` (atomically).
    """
    if not reps:
        raise ValueError("nothing to evaluate: give at least one representation")
    labelled = set(df["slide_id"].astype(str))
    for name, rep in reps.items():
        missing = sorted(labelled - set(rep.ids))
        if missing:
            raise ValueError(
                f"{len(missing)} labelled slide(s) have no {name} embedding: {missing[:10]} "
                "(encode them, or drop them from the labels CSV)"
            )
    base = build_splits(df, "classification", folds=folds, val_fraction=val_fraction, seed=seed,
                        label_col=label_col)  # fmt: skip
    rows = []
    for budget in budgets:
        splits = budget_splits(base, df, budget, seed=seed, label_col=label_col)
        if isinstance(splits, str):
            log.warning("budget %s skipped: %s", budget_name(budget), splits)
            rows += [dict(budget=budget_name(budget), representation=n, n_train=np.nan, auc_mean=np.nan,
                          auc_std=np.nan, folds=0, note=splits) for n in reps]  # fmt: skip
            continue
        for name, rep in reps.items():
            res = run_probe(rep.X, rep.ids, df, splits, method="linear", label_col=label_col,
                            normalize=rep.normalize)  # fmt: skip
            mean, std = res.summary["auc"]
            rows.append(dict(budget=budget_name(budget), representation=name,
                             n_train=float(np.mean([f["n_train"] for f in res.per_fold])), auc_mean=mean,
                             auc_std=std, folds=len(splits), note=""))  # fmt: skip
    table = pd.DataFrame(rows)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / "results.csv", table.to_csv(index=False))
        atomic_write_text(out / "report.md", format_report(table, reps, folds, seed))
    return table


def format_report(table: pd.DataFrame, reps: Mapping[str, Representation], folds: int, seed: int) -> str:
    """Markdown: one row per budget, one column per representation (AUC mean +- std over folds)."""
    names = list(reps)
    lines = [
        "# Giga-SSL linear evaluation",
        "",
        f"Logistic-regression probe, {folds} case-grouped stratified folds (seed {seed}), the same splits "
        "for every representation; AUC mean +- std over folds.",
        "",
        "| budget | mean train slides | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    for budget, grp in table.groupby("budget", sort=False):
        by = grp.set_index("representation")
        n = by["n_train"].dropna()
        cells = []
        for name in names:
            r = by.loc[name]
            cells.append(
                r["note"] if not np.isfinite(r["auc_mean"]) else f"{r['auc_mean']:.3f} +- {r['auc_std']:.3f}"
            )
        lines.append(f"| {budget} | {n.iloc[0]:.0f} | " if len(n) else f"| {budget} | - | ")
        lines[-1] += " | ".join(cells) + " |"
    lines += ["", "Scaling: " + ", ".join(f"{k}: {v.normalize}" for k, v in reps.items()), ""]
    return "\n".join(lines)
