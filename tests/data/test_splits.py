"""Grouped stratified splits, data-budget subsets and CLAM split files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gigaslide.data.splits import (
    Split,
    assert_no_case_leakage,
    few_shot,
    kfold_splits,
    load_split_csvs,
    make_strata,
    monte_carlo_splits,
    save_splits,
    subsample_train,
    validate_splits,
)


def _cohort(n_cases: int = 60, seed: int = 0, n_classes: int = 2) -> pd.DataFrame:
    """1-3 slides per case; class imbalance 2:1 for two classes."""
    rng = np.random.default_rng(seed)
    rows = []
    for c in range(n_cases):
        label = c % n_classes if n_classes > 2 else int(c % 3 == 0)
        for s in range(int(rng.integers(1, 4))):
            rows.append(
                {
                    "slide_id": f"S{c:03d}_{s}",
                    "case_id": f"C{c:03d}",
                    "label": label,
                    "time": float(rng.integers(1, 100)),
                    "event": int(rng.random() < 0.5),
                }
            )
    return pd.DataFrame(rows)


def _cases(df: pd.DataFrame, ids: list[str]) -> set[str]:
    return set(df.set_index("slide_id").loc[ids, "case_id"])


def test_kfold_grouped_partition_and_no_leakage() -> None:
    df = _cohort()
    splits = kfold_splits(df, n_folds=5, val_fraction=0.2, seed=0)
    assert len(splits) == 5
    tests = [s for sp in splits for s in sp.test]
    assert sorted(tests) == sorted(df.slide_id)  # every slide tested exactly once
    for sp in splits:
        assert sorted(sp.all_ids()) == sorted(df.slide_id)
        tr, va, te = _cases(df, sp.train), _cases(df, sp.val), _cases(df, sp.test)
        assert not (tr & va or tr & te or va & te)
        assert len(va) == round(0.2 * (len(tr) + len(va)))
    assert_no_case_leakage(splits, df)
    validate_splits(splits, df)


def test_kfold_stratification_balance_and_determinism() -> None:
    df = _cohort(n_cases=100)
    splits = kfold_splits(df, n_folds=5, seed=3)
    overall = df.label.mean()
    for sp in splits:
        frac = df.set_index("slide_id").loc[sp.test, "label"].mean()
        assert abs(frac - overall) < 0.12
    again = kfold_splits(df, n_folds=5, seed=3)
    assert [s.to_dict() for s in splits] == [s.to_dict() for s in again]
    other = kfold_splits(df, n_folds=5, seed=4)
    assert [s.test for s in splits] != [s.test for s in other]


def test_survival_strata_and_kfold() -> None:
    df = _cohort(n_cases=80)
    strata = make_strata(df, task="survival", n_time_bins=3)
    assert strata.str.startswith(("0_", "1_")).all()
    assert strata.nunique() <= 6
    splits = kfold_splits(df, n_folds=5, task="survival", seed=0)
    assert_no_case_leakage(splits, df)
    for sp in splits:
        ev = df.set_index("slide_id").loc[sp.test, "event"].mean()
        assert abs(ev - df.event.mean()) < 0.2


def test_leakage_detected_with_case_ids() -> None:
    df = _cohort(n_cases=10)
    c1 = df[df.case_id == "C001"].slide_id.tolist()
    rest = df[df.case_id != "C001"].slide_id.tolist()
    ok = Split(fold=0, train=rest, val=[], test=c1)
    assert_no_case_leakage([ok], df)
    extra = df[df.case_id == "C001"].assign(slide_id="S001_9")  # second slide of C001 in train
    df2 = pd.concat([df, extra.iloc[:1]], ignore_index=True)
    bad = Split(fold=0, train=[*rest, "S001_9"], val=[], test=["S001_0"])
    with pytest.raises(ValueError, match=r"fold 0: \['C001'\]"):
        assert_no_case_leakage([bad], df2)


def test_validate_unknown_ids_listed() -> None:
    df = _cohort(n_cases=10)
    sp = Split(fold=0, train=["S000_0", "ghost_1"], val=[], test=["ghost_2"])
    with pytest.raises(ValueError, match=r"ghost_1.*ghost_2"):
        validate_splits([sp], df)


def test_subsample_train_inside_fold_stratified() -> None:
    df = _cohort(n_cases=100)
    sp = kfold_splits(df, n_folds=5, seed=0)[1]
    sub = subsample_train(sp, df, fraction=0.25, seed=0)
    assert set(sub.train) < set(sp.train)
    assert sub.val == sp.val and sub.test == sp.test
    n_cases = len(_cases(df, sp.train))
    assert len(_cases(df, sub.train)) == round(0.25 * n_cases)
    labels = df.set_index("slide_id").loc[sub.train, "label"]
    assert set(labels) == {0, 1}
    # every slide of a kept case is kept (grouping)
    kept = _cases(df, sub.train)
    assert set(sub.train) == set(df[df.case_id.isin(kept)].slide_id) & set(sp.train)
    assert subsample_train(sp, df, 0.25, seed=0).train == sub.train


def test_few_shot_inside_fold_exact_counts() -> None:
    df = _cohort(n_cases=100)
    sp = kfold_splits(df, n_folds=5, seed=0)[0]
    fs = few_shot(sp, df, n_per_class=8, seed=1)
    assert set(fs.train) <= set(sp.train)
    counts = df.set_index("slide_id").loc[fs.train, "label"].value_counts()
    assert counts.to_dict() == {0: 8, 1: 8}
    assert_no_case_leakage([fs], df)
    with pytest.raises(ValueError, match="fewer than n_per_class"):
        few_shot(sp, df, n_per_class=10_000)


def test_monte_carlo_splits_fractions() -> None:
    df = _cohort(n_cases=50)
    splits = monte_carlo_splits(df, n_splits=4, test_fraction=0.2, val_fraction=0.1, seed=0)
    assert len(splits) == 4
    assert_no_case_leakage(splits, df)
    for sp in splits:
        assert len(_cases(df, sp.test)) == 10 and len(_cases(df, sp.val)) == 5
    assert splits[0].test != splits[1].test


def test_clam_csv_round_trip(tmp_path: Path) -> None:
    df = _cohort(n_cases=30)
    splits = kfold_splits(df, n_folds=3, seed=0)
    save_splits(splits, tmp_path)
    assert (tmp_path / "splits.json").exists()
    head = (tmp_path / "splits_0.csv").read_text().splitlines()[0]
    assert head == ",train,val,test"  # CLAM layout: unnamed index column
    back = load_split_csvs(tmp_path, df=df)
    assert [s.to_dict() for s in back] == [s.to_dict() for s in splits]
    one = load_split_csvs([tmp_path / "splits_2.csv"])
    assert one[0].fold == 2 and one[0].test == splits[2].test


def test_load_hipt_style_and_survival_two_column(tmp_path: Path) -> None:
    (tmp_path / "splits_0.csv").write_text(",train,val,test\n0,a,c,d\n1,b,,e\n2,x,,\n")
    (tmp_path / "splits_0_bool.csv").write_text("ignored")
    sp = load_split_csvs(tmp_path)[0]
    assert (sp.train, sp.val, sp.test) == (["a", "b", "x"], ["c"], ["d", "e"])
    surv = tmp_path / "surv"
    surv.mkdir()
    (surv / "splits_1.csv").write_text(",train,val\n0,a,c\n1,b,\n")
    sp = load_split_csvs(surv)[0]
    assert (sp.fold, sp.train, sp.val, sp.test) == (1, ["a", "b"], [], ["c"])
    df = pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["1", "2"], "label": [0, 1]})
    with pytest.raises(ValueError, match=r"not in the labels table: \['c'\]"):
        load_split_csvs(surv, df=df)


def test_too_few_cases_error() -> None:
    df = _cohort(n_cases=4)
    with pytest.raises(ValueError, match="cannot fill 10 folds"):
        kfold_splits(df, n_folds=10)


def _tiny(n_cases: int, n_classes: int = 2) -> pd.DataFrame:
    """One slide per case, balanced classes; events on every other case of each class."""
    return pd.DataFrame(
        {
            "slide_id": [f"s{c:02d}" for c in range(n_cases)],
            "case_id": [f"c{c:02d}" for c in range(n_cases)],
            "label": [c % n_classes for c in range(n_cases)],
            "time": [float(10 + 7 * c % 23) for c in range(n_cases)],
            "event": [int((c // n_classes) % 2 == 0) for c in range(n_cases)],
        }
    )


@pytest.mark.parametrize("n_cases", [6, 12])
def test_small_cohort_validation_has_every_class(n_cases: int) -> None:
    # round(0.1 * 4) = 0 and round(0.1 * 8) = 1 validation cases: empty or one-class validation sets
    df = _tiny(n_cases)
    splits = kfold_splits(df, n_folds=3, val_fraction=0.1, seed=0)
    assert_no_case_leakage(splits, df)
    assert sorted(s for sp in splits for s in sp.test) == sorted(df.slide_id)
    label = df.set_index("slide_id")["label"]
    for sp in splits:
        assert set(label[sp.val]) == {0, 1}, sp
        assert set(label[sp.train]) == {0, 1}, sp
        assert sorted(sp.all_ids()) == sorted(df.slide_id)
    assert [s.to_dict() for s in splits] == [s.to_dict() for s in kfold_splits(df, 3, val_fraction=0.1)]
    # val_fraction 0 still means no validation set
    assert all(sp.val == [] for sp in kfold_splits(df, n_folds=3, val_fraction=0.0))


def test_small_cohort_validation_keeps_training_class() -> None:
    # class 1 has two cases: one is tested, the other must stay in training (validation lacks it)
    df = pd.DataFrame({"slide_id": [f"s{i}" for i in range(8)], "case_id": [f"c{i}" for i in range(8)],
                       "label": [0, 0, 0, 0, 0, 0, 1, 1]})  # fmt: skip
    splits = kfold_splits(df, n_folds=2, val_fraction=0.75, seed=1)  # round(0.75 * 4) = 3 of 4 cases
    label = df.set_index("slide_id")["label"]
    for sp in splits:
        assert set(label[sp.train]) == {0, 1}
        assert 1 not in set(label[sp.val]) and len(sp.val) >= 1


def test_small_survival_validation_has_two_cases_and_an_event() -> None:
    df = _tiny(10)
    splits = kfold_splits(df, n_folds=3, val_fraction=0.1, seed=0, task="survival")
    assert_no_case_leakage(splits, df)
    event = df.set_index("slide_id")["event"]
    for sp in splits:
        assert len(sp.val) >= 2 and event[sp.val].sum() >= 1, sp
        assert event[sp.train].sum() >= 1, sp


def test_monte_carlo_small_cohort_minimums() -> None:
    df = _tiny(10)
    splits = monte_carlo_splits(df, n_splits=5, test_fraction=0.2, val_fraction=0.05, seed=2)
    assert_no_case_leakage(splits, df)
    label = df.set_index("slide_id")["label"]
    for sp in splits:
        assert len(sp.test) == 2 and set(label[sp.test]) == {0, 1}  # stratified test set
        assert set(label[sp.val]) == {0, 1} and set(label[sp.train]) == {0, 1}
    with pytest.raises(ValueError, match="n_splits"):
        monte_carlo_splits(df, n_splits=0)
    with pytest.raises(ValueError, match="bad fractions"):
        monte_carlo_splits(df, test_fraction=0.7, val_fraction=0.3)
