"""Patient-grouped, stratified train/val/test splits; data-budget subsets; CLAM/HIPT split files.

Protocols reproduced:

* HIPT Tables 1-2 / CLAM: k-fold cross-validation (10 folds for subtyping, 5 for survival) where no
  case (patient) appears in two sets, each fold's train cases split again into train/val, and
  "25% training" budgets drawn inside each training fold (:func:`subsample_train`).
* Giga-SSL Tables 2-4: the same folds, plus tiny training sets of a fixed number of slides
  (:func:`few_shot`) and repeated random splits (:func:`monte_carlo_splits`).

Published CLAM/HIPT split files ``splits_<k>.csv`` (unnamed index column, then ``train``, ``val``,
``test`` columns of slide ids padded with empty cells) are read by :func:`load_split_csvs` and
written by :func:`save_splits`.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from gigaslide.utils.atomic import atomic_path, atomic_write_text


@dataclass
class Split:
    """One train/val/test partition of slide ids (fold index ``fold``)."""

    fold: int
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    test: list[str] = field(default_factory=list)

    def all_ids(self) -> list[str]:
        return [*self.train, *self.val, *self.test]

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


# ----------------------------------------------------------------------------- strata


def make_strata(
    df: pd.DataFrame,
    task: str = "classification",
    label_col: str = "label",
    time_col: str = "time",
    event_col: str = "event",
    n_time_bins: int = 4,
    min_per_stratum: int = 1,
    group_col: str = "case_id",
) -> pd.Series:
    """Per-slide stratification key.

    Classification: the label. Survival: ``"<event>_<time bin>"`` with time bins at quantiles of the
    observed event times (as in CLAM/MCAT survival set-ups); the number of bins is reduced until every
    stratum holds at least ``min_per_stratum`` cases (down to stratifying by event only).
    """
    if task == "classification":
        _require_cols(df, [label_col])
        return df[label_col].astype(str)
    if task != "survival":
        raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
    _require_cols(df, [time_col, event_col])
    event = df[event_col].astype(int)
    ev_times = df.loc[event == 1, time_col].to_numpy(dtype=float)
    for bins in range(n_time_bins, 1, -1):
        edges = np.unique(np.quantile(ev_times, np.linspace(0, 1, bins + 1)[1:-1])) if ev_times.size else []
        tbin = np.searchsorted(edges, df[time_col].to_numpy(dtype=float), side="right")
        strata = event.astype(str) + "_" + pd.Series(tbin, index=df.index).astype(str)
        cases = (
            df.assign(_s=strata).groupby("_s")[group_col].nunique()
            if group_col in df
            else strata.value_counts()
        )
        if cases.min() >= min_per_stratum:
            return strata
    return event.astype(str) + "_0"  # one time bin: stratify by event only


def _require_cols(df: pd.DataFrame, cols: list[str]) -> None:
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValueError(f"labels table lacks column(s) {missing}; it has {list(df.columns)}")


def _case_table(df: pd.DataFrame, strata: pd.Series, group_col: str) -> pd.DataFrame:
    """One row per case: its stratum (the most frequent among its slides) and its slide count."""
    tab = pd.DataFrame({"case": df[group_col].astype(str).to_numpy(), "stratum": strata.to_numpy()})
    mode = tab.groupby("case")["stratum"].agg(lambda s: s.value_counts().index[0])
    size = tab.groupby("case").size()
    return pd.DataFrame({"stratum": mode, "n_slides": size})


def _pick_cases(cases: pd.DataFrame, n_pick: int, rng: np.random.Generator, min_each: int = 0) -> list[str]:
    """Pick ``n_pick`` cases stratified by ``cases.stratum`` (largest-remainder allocation)."""
    groups = {s: np.asarray(sorted(g.index)) for s, g in cases.groupby("stratum")}
    total = len(cases)
    n_pick = int(min(max(n_pick, 0), total))
    quota = {s: n_pick * len(g) / total for s, g in groups.items()}
    alloc = {s: min(len(groups[s]), max(int(np.floor(q)), min_each)) for s, q in quota.items()}
    order = sorted(groups, key=lambda s: (-(quota[s] - np.floor(quota[s])), str(s)))
    i = 0
    while sum(alloc.values()) < n_pick and i < 10 * len(order) + n_pick:
        s = order[i % len(order)]
        if alloc[s] < len(groups[s]):
            alloc[s] += 1
        i += 1
    picked: list[str] = []
    for s in sorted(groups, key=str):
        perm = rng.permutation(groups[s])
        picked.extend(perm[: alloc[s]].tolist())
    return picked


def _val_keys(
    df: pd.DataFrame, task: str, label_col: str, event_col: str, group_col: str
) -> pd.Series | None:
    """Per-case key that a validation set must contain: the class (classification) or ``"1"`` for a
    case with an observed event (survival). None when the labels table lacks the column."""
    col = label_col if task == "classification" else event_col
    if col not in df.columns:
        return None
    vals = df[col].astype(str) if task == "classification" else df[col].astype(int).astype(str)
    tab = pd.DataFrame({"case": df[group_col].astype(str).to_numpy(), "key": vals.to_numpy()})
    if task == "classification":
        return tab.groupby("case")["key"].agg(lambda s: s.value_counts().index[0])
    return tab.groupby("case")["key"].max()  # "1" when any slide of the case has an event


def _pick_val(
    rest: pd.DataFrame,
    n_val: int,
    rng: np.random.Generator,
    keys: pd.Series | None,
    task: str,
    enforce: bool,
) -> set[str]:
    """Validation cases among the non-test cases ``rest``: ``n_val`` drawn stratified, then (when
    ``enforce``) adjusted so that, where the training side can spare it, validation holds at least one
    case of every class (classification) or at least two cases including an event (survival), while
    training keeps at least one case of every class / one event."""
    val = set(_pick_cases(rest, n_val, rng))
    if not enforce or keys is None:
        return val
    key = keys.reindex(rest.index).astype(str)
    required = sorted(set(key)) if task == "classification" else ["1"]
    for k in required:
        members = sorted(key.index[key == k])
        in_val = [c for c in members if c in val]
        if len(members) < 2:  # a single case: training needs it more than validation
            val.difference_update(members)
        elif len(in_val) == len(members):  # training would lack this class: give one back
            val.discard(str(rng.choice(in_val)))
        elif not in_val:
            val.add(str(rng.choice(members)))
    if task == "survival" and len(val) < 2 and len(rest) - len(val) > 2:
        train = [str(c) for c in rng.permutation(sorted(set(rest.index) - val))]
        train.sort(key=lambda c: key[c] == "1")  # censored cases first: training keeps its events
        n_events_train = sum(key[c] == "1" for c in train)
        for c in train:
            if len(val) >= 2 or len(rest) - len(val) <= 2:
                break
            if key[c] == "1":
                if n_events_train <= 1:
                    continue
                n_events_train -= 1
            val.add(c)
    return val


def _slides_of(df: pd.DataFrame, cases: set[str], id_col: str, group_col: str) -> list[str]:
    mask = df[group_col].astype(str).isin(cases)
    return df.loc[mask, id_col].astype(str).tolist()


def _split_of_cases(
    df: pd.DataFrame,
    fold: int,
    train: set[str],
    val: set[str],
    test: set[str],
    id_col: str,
    group_col: str,
) -> Split:
    """A :class:`Split` listing the slides of the given train/val/test case sets."""
    return Split(
        fold=fold,
        train=_slides_of(df, train, id_col, group_col),
        val=_slides_of(df, val, id_col, group_col),
        test=_slides_of(df, test, id_col, group_col),
    )


# ----------------------------------------------------------------------------- split makers


def kfold_splits(
    df: pd.DataFrame,
    n_folds: int = 10,
    label_col: str = "label",
    group_col: str = "case_id",
    val_fraction: float = 0.1,
    seed: int = 0,
    stratify: bool = True,
    task: str = "classification",
    id_col: str = "slide_id",
    time_col: str = "time",
    event_col: str = "event",
) -> list[Split]:
    """Stratified k-fold grouped by case: each case's slides land in exactly one test fold.

    Test folds come from :class:`sklearn.model_selection.StratifiedGroupKFold` (shuffled with ``seed``);
    a validation set of ``val_fraction`` of the remaining cases is then drawn stratified by case. For
    ``task="survival"`` the strata are event x event-time quantile bin (:func:`make_strata`).

    With ``val_fraction > 0`` the validation set is never left empty by rounding on small cohorts: it
    gets at least one case of every class (survival: two cases, one with an event) whenever the
    training side keeps at least one case of that class (one event). Whatever still falls short is
    reported per fold by :func:`gigaslide.data.split_plan.validation_problem`.
    """
    _require_cols(df, [id_col, group_col])
    if n_folds < 2:
        raise ValueError(f"n_folds must be >= 2, got {n_folds}")
    n_cases = df[group_col].nunique()
    if n_cases < n_folds:
        raise ValueError(f"{n_cases} cases cannot fill {n_folds} folds; use --folds <= {n_cases}")
    strata = (
        make_strata(df, task, label_col, time_col, event_col, min_per_stratum=n_folds, group_col=group_col)
        if stratify
        else pd.Series("all", index=df.index)
    )
    cases = _case_table(df, strata, group_col)
    small = cases.groupby("stratum").size()
    small = small[small < n_folds]
    if stratify and len(small):
        warnings.warn(
            f"strata {small.to_dict()} have fewer cases than {n_folds} folds: some test folds will lack them",
            stacklevel=2,
        )
    sgkf = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    groups = df[group_col].astype(str).to_numpy()
    rng = np.random.default_rng(seed)
    splits: list[Split] = []
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The least populated class")
        folds = list(sgkf.split(np.zeros(len(df)), strata.to_numpy(), groups))
    keys = _val_keys(df, task, label_col, event_col, group_col)
    for k, (_, test_idx) in enumerate(folds):
        test_cases = set(groups[test_idx])
        rest = cases.loc[~cases.index.isin(test_cases)]
        n_val = round(val_fraction * len(rest))
        val_cases = _pick_val(rest, n_val, rng, keys, task, enforce=val_fraction > 0)
        train_cases = set(rest.index) - val_cases
        splits.append(_split_of_cases(df, k, train_cases, val_cases, test_cases, id_col, group_col))
    return splits


def monte_carlo_splits(
    df: pd.DataFrame,
    n_splits: int = 10,
    test_fraction: float = 0.2,
    val_fraction: float = 0.1,
    seed: int = 0,
    label_col: str = "label",
    group_col: str = "case_id",
    task: str = "classification",
    id_col: str = "slide_id",
    time_col: str = "time",
    event_col: str = "event",
) -> list[Split]:
    """``n_splits`` independent random case-grouped stratified splits (fractions of ALL cases).

    The test set holds at least one case; the validation set follows the same small-cohort minimum as
    :func:`kfold_splits`.
    """
    _require_cols(df, [id_col, group_col])
    if n_splits < 1:
        raise ValueError(f"n_splits (Monte Carlo repeats) must be >= 1, got {n_splits}")
    if not (0 < test_fraction < 1 and 0 <= val_fraction < 1 and test_fraction + val_fraction < 1):
        raise ValueError(
            f"bad fractions: test={test_fraction}, val={val_fraction} "
            "(need 0 < test, 0 <= val and test + val < 1)"
        )
    strata = make_strata(df, task, label_col, time_col, event_col, group_col=group_col)
    cases = _case_table(df, strata, group_col)
    if len(cases) < 2:
        raise ValueError(f"{len(cases)} case(s) cannot be split into train and test sets")
    keys = _val_keys(df, task, label_col, event_col, group_col)
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n_splits):
        n_test = min(max(round(test_fraction * len(cases)), 1), len(cases) - 1)
        test_cases = set(_pick_cases(cases, n_test, rng))
        rest = cases.loc[~cases.index.isin(test_cases)]
        n_val = round(val_fraction * len(cases))
        val_cases = _pick_val(rest, n_val, rng, keys, task, enforce=val_fraction > 0)
        train_cases = set(rest.index) - val_cases
        out.append(_split_of_cases(df, k, train_cases, val_cases, test_cases, id_col, group_col))
    return out


def _train_cases(split: Split, df: pd.DataFrame, id_col: str, group_col: str) -> pd.DataFrame:
    sub = df.loc[df[id_col].astype(str).isin(set(split.train))]
    missing = sorted(set(split.train) - set(sub[id_col].astype(str)))
    if missing:
        raise ValueError(f"split {split.fold}: train ids not in the labels table: {missing[:20]}")
    return sub


def subsample_train(
    split: Split,
    df: pd.DataFrame,
    fraction: float = 0.25,
    seed: int = 0,
    label_col: str = "label",
    group_col: str = "case_id",
    id_col: str = "slide_id",
    task: str = "classification",
) -> Split:
    """Keep ``fraction`` of the training CASES of ``split`` (stratified, at least one case per
    stratum); val and test are unchanged (HIPT/Giga-SSL "25% training" budget)."""
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if fraction == 1:
        return replace(split, train=list(split.train))
    sub = _train_cases(split, df, id_col, group_col)
    cases = _case_table(sub, make_strata(sub, task, label_col, group_col=group_col), group_col)
    rng = np.random.default_rng([seed, split.fold])
    keep = set(_pick_cases(cases, round(fraction * len(cases)), rng, min_each=1))
    train = [s for s, c in zip(sub[id_col].astype(str), sub[group_col].astype(str)) if c in keep]
    return replace(split, train=train)


def few_shot(
    split: Split,
    df: pd.DataFrame,
    n_per_class: int,
    seed: int = 0,
    label_col: str = "label",
    group_col: str = "case_id",
    id_col: str = "slide_id",
) -> Split:
    """Keep ``n_per_class`` training slides of each class, taking whole cases (a case's slides
    stay together) in a seeded random order. Val and test are unchanged."""
    if n_per_class < 1:
        raise ValueError(f"n_per_class must be >= 1, got {n_per_class}")
    sub = _train_cases(split, df, id_col, group_col)
    cases = _case_table(sub, sub[label_col].astype(str), group_col)
    rng = np.random.default_rng([seed, split.fold])
    keep: set[str] = set()
    for label, grp in sorted(cases.groupby("stratum"), key=lambda kv: str(kv[0])):
        available = int(grp["n_slides"].sum())
        if available < n_per_class:
            raise ValueError(
                f"split {split.fold}: class {label!r} has only {available} training slides, "
                f"fewer than n_per_class={n_per_class}"
            )
        total = 0
        for case in rng.permutation(np.asarray(sorted(grp.index))):
            size = int(grp.loc[case, "n_slides"])
            if total + size <= n_per_class:
                keep.add(str(case))
                total += size
            if total == n_per_class:
                break
        if total < n_per_class:
            warnings.warn(
                f"split {split.fold}: class {label!r} got {total} slides (whole cases cannot make exactly "
                f"{n_per_class})",
                stacklevel=2,
            )
    train = [s for s, c in zip(sub[id_col].astype(str), sub[group_col].astype(str)) if c in keep]
    return replace(split, train=train)


# ----------------------------------------------------------------------------- validation


def validate_splits(splits: list[Split], df: pd.DataFrame, id_col: str = "slide_id") -> None:
    """Raise if a split names slide ids absent from ``df`` or puts a slide in two of its sets."""
    known = set(df[id_col].astype(str))
    for sp in splits:
        unknown = sorted(set(sp.all_ids()) - known)
        if unknown:
            raise ValueError(
                f"split {sp.fold} references {len(unknown)} slide id(s) not in the labels table: "
                f"{unknown[:20]}{' ...' if len(unknown) > 20 else ''}"
            )
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            both = sorted(set(getattr(sp, a)) & set(getattr(sp, b)))
            if both:
                raise ValueError(f"split {sp.fold}: slides in both {a} and {b}: {both[:20]}")


def assert_no_case_leakage(
    splits: list[Split], df: pd.DataFrame, group_col: str = "case_id", id_col: str = "slide_id"
) -> None:
    """Raise ``ValueError`` listing the case ids whose slides fall in more than one set of a split."""
    case_of = dict(zip(df[id_col].astype(str), df[group_col].astype(str)))
    problems = []
    for sp in splits:
        sets = {
            name: {case_of.get(s, f"<unknown:{s}>") for s in getattr(sp, name)}
            for name in ("train", "val", "test")
        }
        leaked = (sets["train"] & sets["val"]) | (sets["train"] & sets["test"]) | (sets["val"] & sets["test"])
        if leaked:
            problems.append(f"fold {sp.fold}: {sorted(leaked)}")
    if problems:
        raise ValueError("case leakage (same case in two sets of a split): " + "; ".join(problems))


# ----------------------------------------------------------------------------- CLAM split files

_SPLIT_RE = re.compile(r"^splits_(\d+)\.csv$")


def _read_clam_csv(path: Path, fold: int) -> Split:
    tab = pd.read_csv(path, dtype=str, keep_default_na=False)
    tab = tab.loc[:, [c for c in tab.columns if c and not str(c).startswith("Unnamed")]]
    cols = {c.strip().lower(): c for c in tab.columns}
    if "train" not in cols or ("val" not in cols and "test" not in cols):
        raise ValueError(f"{path}: expected CLAM columns train,val,test; found {list(tab.columns)}")

    def col(name: str) -> list[str]:
        if name not in cols:
            return []
        return [v.strip() for v in tab[cols[name]].tolist() if isinstance(v, str) and v.strip()]

    train, val, test = col("train"), col("val"), col("test")
    if "test" not in cols:  # MCAT/HIPT survival files: train + val, where val is the held-out fold
        val, test = [], val
    return Split(fold=fold, train=train, val=val, test=test)


def load_split_csvs(
    dir_or_files: str | os.PathLike[str] | list[str | os.PathLike[str]],
    df: pd.DataFrame | None = None,
    id_col: str = "slide_id",
) -> list[Split]:
    """Read CLAM/HIPT ``splits_<k>.csv`` files (a directory, or explicit files), sorted by k.

    Two-column (train, val) survival files are read with val as the test fold. With ``df`` the ids are
    validated (:func:`validate_splits`).
    """
    if isinstance(dir_or_files, (str, os.PathLike)) and Path(dir_or_files).is_dir():
        d = Path(dir_or_files)
        files = [p for p in d.iterdir() if _SPLIT_RE.match(p.name)]
        if not files:
            raise FileNotFoundError(f"{d}: no splits_<k>.csv files (CLAM format) found")
    else:
        items = dir_or_files if isinstance(dir_or_files, list) else [dir_or_files]
        files = [Path(p) for p in items]
        for p in files:
            if not p.is_file():
                raise FileNotFoundError(f"split file {p} does not exist")
    splits = []
    for i, p in enumerate(files):
        m = _SPLIT_RE.match(p.name)
        splits.append(_read_clam_csv(p, int(m.group(1)) if m else i))
    splits.sort(key=lambda s: s.fold)
    if df is not None:
        validate_splits(splits, df, id_col)
    return splits


def save_splits(splits: list[Split], out_dir: str | os.PathLike[str]) -> list[Path]:
    """Write ``splits_<fold>.csv`` in CLAM format (reloadable by CLAM/HIPT code) and ``splits.json``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for sp in splits:
        n = max(len(sp.train), len(sp.val), len(sp.test), 1)
        tab = pd.DataFrame(
            {
                name: list(getattr(sp, name)) + [""] * (n - len(getattr(sp, name)))
                for name in ("train", "val", "test")
            }
        )
        path = out / f"splits_{sp.fold}.csv"
        with atomic_path(path) as tmp:
            tab.to_csv(tmp, index=True)
        paths.append(path)
    paths.append(
        atomic_write_text(out / "splits.json", json.dumps([sp.to_dict() for sp in splits], indent=1))
    )
    return paths
