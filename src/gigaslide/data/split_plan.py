"""One entry point for the splits of an evaluation run, shared by ``gigaslide train`` and ``gigaslide probe``.

:func:`build_splits` picks the protocol (published CLAM split files, case-grouped stratified k-fold, or
Monte Carlo repeated random splits), applies the training-data budget (``train_fraction`` or few-shot)
inside every training fold and checks that no case leaks across sets. :func:`validation_problem` says
why a split's validation set cannot drive model selection (empty, a class missing, no event), so the
callers can warn loudly and record it with the fold's results.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

from gigaslide.data.splits import (
    Split,
    assert_no_case_leakage,
    few_shot,
    kfold_splits,
    load_split_csvs,
    monte_carlo_splits,
    subsample_train,
)


def build_splits(
    df: pd.DataFrame,
    task: str = "classification",
    *,
    folds: int = 10,
    monte_carlo: int | None = None,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    splits_dir: str | os.PathLike[str] | None = None,
    few_shot_n: int | None = None,
    train_fraction: float = 1.0,
    label_col: str = "label",
    group_col: str = "case_id",
    id_col: str = "slide_id",
    time_col: str = "time",
    event_col: str = "event",
) -> list[Split]:
    """Train/val/test splits of slide ids, grouped by case and stratified, then the training budget.

    Args:
        df: labels table (``id_col``, ``group_col`` and ``label_col`` or ``time_col`` + ``event_col``).
        folds: number of k-fold folds (ignored with ``splits_dir`` or ``monte_carlo``).
        monte_carlo: number of independent random splits (Monte Carlo cross-validation) holding out
            ``test_fraction`` of the cases for test and ``val_fraction`` of them for validation.
        splits_dir: folder of CLAM/HIPT ``splits_<k>.csv`` files used as they are.
        few_shot_n: keep N training slides per class (classification); exclusive with ``train_fraction``.
        train_fraction: keep this fraction of the training cases of every split.

    Raises:
        ValueError: conflicting options, too few cases, or case leakage in given split files.
    """
    if splits_dir is not None and monte_carlo is not None:
        raise ValueError("split files (--splits) and Monte Carlo splits (--monte-carlo) exclude each other")
    if few_shot_n is not None and train_fraction < 1.0:
        raise ValueError("use either few-shot (N slides per class) or train_fraction < 1, not both")
    if few_shot_n is not None and task != "classification":
        raise ValueError("few-shot (N training slides per class) applies to classification only")
    if splits_dir is not None:
        splits = load_split_csvs(splits_dir, df=df, id_col=id_col)
    elif monte_carlo is not None:
        splits = monte_carlo_splits(
            df, n_splits=monte_carlo, test_fraction=test_fraction, val_fraction=val_fraction, seed=seed,
            label_col=label_col, group_col=group_col, task=task, id_col=id_col, time_col=time_col,
            event_col=event_col,
        )  # fmt: skip
    else:
        if folds < 2:
            raise ValueError(
                f"k-fold cross-validation needs folds >= 2 (got {folds}); or give split files / Monte Carlo"
            )
        splits = kfold_splits(
            df, n_folds=folds, label_col=label_col, group_col=group_col, val_fraction=val_fraction,
            seed=seed, task=task, id_col=id_col, time_col=time_col, event_col=event_col,
        )  # fmt: skip
    if few_shot_n is not None:
        splits = [
            few_shot(s, df, few_shot_n, seed=seed, label_col=label_col, group_col=group_col, id_col=id_col)
            for s in splits
        ]
    elif train_fraction < 1.0:
        kw = {"seed": seed, "label_col": label_col, "group_col": group_col, "id_col": id_col, "task": task}
        splits = [subsample_train(s, df, train_fraction, **kw) for s in splits]
    assert_no_case_leakage(splits, df, group_col=group_col, id_col=id_col)
    return splits


def validation_problem(
    split: Split,
    df: pd.DataFrame,
    task: str = "classification",
    label_col: str = "label",
    time_col: str = "time",
    event_col: str = "event",
    id_col: str = "slide_id",
) -> str | None:
    """Why ``split.val`` cannot score a model, or None when it can.

    Classification: empty, or missing one of the classes of ``df`` (AUC undefined). Survival: empty,
    or no comparable pair (an observed event before another slide's time), so the c-index is undefined.
    """
    tab = df.assign(**{id_col: df[id_col].astype(str)})
    val = tab.loc[tab[id_col].isin(set(split.val))]
    if val.empty:
        return "validation set is empty"
    n = len(val)
    if task == "classification":
        missing = sorted(set(tab[label_col].astype(str)) - set(val[label_col].astype(str)))
        if missing:
            return f"validation set ({n} slide(s)) lacks class(es) {missing}"
        return None
    time = val[time_col].to_numpy(dtype=float)
    event = val[event_col].to_numpy(dtype=float) == 1
    if not np.any(time[event][:, None] < time[None, :]):
        reason = "no observed event" if not event.any() else "no comparable pair"
        return f"validation set ({n} slide(s)) has {reason}"
    return None
