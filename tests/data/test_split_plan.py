"""One split-building path for train and probe; validation-set problems named per fold."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from gigaslide.data.split_plan import build_splits, validation_problem
from gigaslide.data.splits import Split, assert_no_case_leakage, kfold_splits, save_splits


def _df(n_cases: int = 20) -> pd.DataFrame:
    rows = []
    for c in range(n_cases):
        for j in range(1 + c % 2):  # odd cases have two slides
            rows.append({"slide_id": f"s{c:02d}_{j}", "case_id": f"c{c:02d}", "label": ["a", "b"][c % 2],
                         "time": float(5 + (3 * c) % 17), "event": int(c % 3 != 0)})  # fmt: skip
    return pd.DataFrame(rows)


def test_build_splits_protocols_and_budget(tmp_path: Path) -> None:
    df = _df()
    kf = build_splits(df, folds=4, seed=1)
    assert [s.to_dict() for s in kf] == [s.to_dict() for s in kfold_splits(df, n_folds=4, seed=1)]
    mc = build_splits(df, monte_carlo=6, test_fraction=0.25, val_fraction=0.1, seed=1)
    assert len(mc) == 6 and [s.fold for s in mc] == list(range(6))
    case_of = df.set_index("slide_id")["case_id"]
    assert all(case_of[sp.test].nunique() == 5 for sp in mc)  # 25% of 20 cases
    assert_no_case_leakage(mc, df)
    half = build_splits(df, monte_carlo=6, test_fraction=0.25, seed=1, train_fraction=0.5)
    assert all(set(h.train) < set(m.train) and h.test == m.test for h, m in zip(half, mc))
    save_splits(kf, tmp_path)
    again = build_splits(df, splits_dir=tmp_path)
    assert [s.to_dict() for s in again] == [s.to_dict() for s in kf]
    surv = build_splits(df, "survival", monte_carlo=3, seed=0)
    assert len(surv) == 3


def test_build_splits_rejects_conflicts() -> None:
    df = _df()
    with pytest.raises(ValueError, match="exclude each other"):
        build_splits(df, monte_carlo=3, splits_dir="x")
    with pytest.raises(ValueError, match="not both"):
        build_splits(df, few_shot_n=2, train_fraction=0.5)
    with pytest.raises(ValueError, match="classification only"):
        build_splits(df, "survival", few_shot_n=2)
    with pytest.raises(ValueError, match="folds >= 2"):
        build_splits(df, folds=1)


def test_validation_problem_messages() -> None:
    df = _df(6)
    ids = df.slide_id.tolist()
    assert validation_problem(Split(0, ids[2:], [], ids[:2]), df) == "validation set is empty"
    only_a = [s for s, lab in zip(df.slide_id, df.label) if lab == "a"][:1]
    msg = validation_problem(Split(1, ids, only_a, []), df)
    assert msg == "validation set (1 slide(s)) lacks class(es) ['b']"
    both = df.groupby("label").slide_id.first().tolist()
    assert validation_problem(Split(2, ids, both, []), df) is None
    censored = df.loc[df.event == 0, "slide_id"].tolist()
    assert "no observed event" in validation_problem(Split(3, ids, censored, []), df, "survival")
    # an event at the latest time has nobody at risk after it: no comparable pair
    late = df.sort_values("time").slide_id.tolist()[-1:]
    assert "no comparable pair" in validation_problem(Split(4, ids, late, []), df, "survival")
    pair = df.sort_values("time")
    good = [pair.loc[pair.event == 1, "slide_id"].iloc[0], pair.slide_id.iloc[-1]]
    assert validation_problem(Split(5, ids, good, []), df, "survival") is None
