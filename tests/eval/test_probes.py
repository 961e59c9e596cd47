"""KNN / linear / Cox probes on synthetic slide embeddings."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.neighbors import KNeighborsClassifier

from gigaslide.data.splits import Split, kfold_splits
from gigaslide.eval.metrics import roc_auc
from gigaslide.eval.probes import (
    IndexSplit,
    knn_predict_proba,
    linear_probe_fold,
    linear_probe_splits,
    run_probe,
)


def _data(n: int = 120, dim: int = 16, signal: float = 2.5, seed: int = 0, n_classes: int = 2):
    rng = np.random.default_rng(seed)
    y = np.arange(n) % n_classes
    X = rng.normal(size=(n, dim))
    X[:, :n_classes] += signal * np.eye(n_classes)[y]
    ids = [f"s{i:03d}" for i in range(n)]
    df = pd.DataFrame({"slide_id": ids, "case_id": [f"c{i // 2:03d}" for i in range(n)], "label": y})
    return X, ids, df


def test_knn_uniform_matches_sklearn_euclidean() -> None:
    rng = np.random.default_rng(1)
    Xtr, Xte = rng.normal(size=(50, 5)), rng.normal(size=(20, 5))
    ytr = rng.integers(0, 3, 50)
    ours = knn_predict_proba(Xtr, ytr, Xte, 3, k=7, metric="euclidean")
    ref = KNeighborsClassifier(n_neighbors=7).fit(Xtr, ytr).predict_proba(Xte)
    np.testing.assert_allclose(ours, ref)
    cos = knn_predict_proba(Xtr, ytr, Xte, 3, k=7, metric="cosine", weighting="distance")
    np.testing.assert_allclose(cos.sum(1), 1.0)
    assert knn_predict_proba(Xtr[:3], ytr[:3], Xte, 3, k=20).shape == (20, 3)  # k capped at n_train


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_probe_learns_separable_signal(method: str) -> None:
    X, ids, df = _data(n_classes=3)
    splits = kfold_splits(df, n_folds=4, seed=0)
    res = run_probe(X, ids, df, splits, method=method, k=10)
    assert res.summary["auc"][0] > 0.9
    assert len(res.per_fold) == 4
    preds = res.predictions
    assert sorted(preds.slide_id) == sorted(ids)  # each slide predicted once (k-fold)
    assert {"slide_id", "fold", "y", "label", "prob_0", "prob_1", "prob_2", "pred"} <= set(preds.columns)
    np.testing.assert_allclose(preds[["prob_0", "prob_1", "prob_2"]].sum(1), 1.0, atol=1e-9)
    assert res.config["classes"] == ["0", "1", "2"]


@pytest.mark.parametrize("method", ["knn", "linear"])
def test_probe_on_noise_is_chance(method: str) -> None:
    X, ids, df = _data(n=200, signal=0.0, seed=2)
    res = run_probe(X, ids, df, kfold_splits(df, n_folds=4, seed=0), method=method)
    assert abs(res.summary["auc"][0] - 0.5) < 0.15


def test_linear_probe_selects_C_on_val_and_is_deterministic() -> None:
    X, _, df = _data(n=100)
    y = df.label.to_numpy()
    idx = np.arange(100)
    probs, hp = linear_probe_fold(X[idx[:60]], y[:60], X[80:], X[60:80], y[60:80], 2)
    again, hp2 = linear_probe_fold(X[idx[:60]], y[:60], X[80:], X[60:80], y[60:80], 2)
    np.testing.assert_array_equal(probs, again)
    assert hp == hp2 and hp["hp_C_selected_on_val"] and hp["hp_C"] in (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)
    _, hp_noval = linear_probe_fold(X[:60], y[:60], X[80:], n_classes=2, default_C=0.5)
    assert hp_noval == {"hp_C": 0.5, "hp_C_selected_on_val": False}
    assert roc_auc(y[80:], probs[:, 1]) > 0.9


def test_linear_probe_splits_index_and_id_forms_agree() -> None:
    X, ids, df = _data(n=80)
    y = df.label.to_numpy()
    splits = kfold_splits(df, n_folds=4, seed=0)
    by_id = linear_probe_splits(X, y, splits, ids=ids)
    pos = {s: i for i, s in enumerate(ids)}
    idx = [
        IndexSplit(s.fold, *(np.array([pos[i] for i in lst]) for lst in (s.train, s.val, s.test)))
        for s in splits
    ]
    by_idx = linear_probe_splits(X, y, idx)
    for a, b in zip(by_id, by_idx):
        np.testing.assert_array_equal(a.test_idx, b.test_idx)
        np.testing.assert_allclose(a.scores, b.scores)
    with pytest.raises(ValueError, match="pass ids="):
        linear_probe_splits(X, y, splits)


def test_run_probe_errors_name_ids() -> None:
    X, ids, df = _data(n=40)
    sp = [Split(0, train=ids[:30], val=[], test=[*ids[30:], "ghost"])]
    with pytest.raises(ValueError, match="ghost"):
        run_probe(X, ids, df, sp)
    df2 = df.copy()
    df2.loc[3, "label"] = np.nan
    with pytest.raises(ValueError, match="s003"):
        run_probe(X, ids, df2, [Split(0, train=ids[:30], val=[], test=ids[30:])])
    Xn = X.copy()
    Xn[5, 0] = np.nan
    with pytest.raises(ValueError, match="s005"):
        run_probe(Xn, ids, df, [Split(0, train=ids[:30], val=[], test=ids[30:])])
    with pytest.raises(ValueError, match="classification only"):
        run_probe(
            X, ids, df, [Split(0, train=ids[:30], val=[], test=ids[30:])], method="knn", task="survival"
        )


def test_cox_probe_survival_signal() -> None:
    rng = np.random.default_rng(0)
    n = 120
    X = rng.normal(size=(n, 4))
    hazard = np.exp(1.5 * X[:, 0])
    time = rng.exponential(1.0 / hazard) * 10
    event = (rng.random(n) < 0.8).astype(int)
    ids = [f"s{i}" for i in range(n)]
    df = pd.DataFrame({"slide_id": ids, "case_id": ids, "time": time, "event": event})
    splits = kfold_splits(df, n_folds=3, task="survival", seed=0)
    res = run_probe(X, ids, df, splits, method="linear", task="survival", penalizers=(0.01, 0.1))
    assert res.summary["c_index"][0] > 0.7
    assert {"slide_id", "fold", "time", "event", "risk"} <= set(res.predictions.columns)
    assert all(r["hp_penalizer"] in (0.01, 0.1) for r in res.per_fold)


def test_unusable_validation_set_warned_and_recorded(caplog: pytest.LogCaptureFixture) -> None:
    X, ids, df = _data(n=40)
    sp = kfold_splits(df, n_folds=4, seed=0)
    label = df.set_index("slide_id")["label"]
    one_class = [s for s in sp[1].val if label[s] == 0]
    bad = [Split(0, sp[0].train + sp[0].val, [], sp[0].test), Split(1, sp[1].train, one_class, sp[1].test)]
    with caplog.at_level("WARNING", logger="gigaslide.eval.probes"):
        res = run_probe(X, ids, df, [*bad, *sp[2:]], method="linear")
    w = [r["val_warning"] for r in res.per_fold]
    assert w[0] == "fold 0: validation set is empty; no hyper-parameter selection: the default C is used"
    assert w[1].startswith(f"fold 1: validation set ({len(one_class)} slide(s)) lacks class(es) ['1']")
    assert w[2] is None and w[3] is None
    assert res.per_fold[0]["hp_C_selected_on_val"] is False
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [("WARNING", w[0]), ("WARNING", w[1])]
    knn = run_probe(X, ids, df, bad, method="knn", k=5)  # KNN never uses the validation set
    assert [r["val_warning"] for r in knn.per_fold] == [None, None]


def test_knn_k_clamped_to_training_set_is_warned(caplog: pytest.LogCaptureFixture) -> None:
    X, ids, df = _data(n=40)
    splits = kfold_splits(df, n_folds=4, seed=0)
    with caplog.at_level("WARNING", logger="gigaslide.eval.probes"):
        res = run_probe(X, ids, df, splits, method="knn", k=100)
    msgs = [r.getMessage() for r in caplog.records if "KNN" in r.getMessage()]
    assert len(msgs) == 4
    for sp, fold, msg in zip(splits, res.per_fold, msgs):
        n = len(sp.train)
        assert fold["hp_k"] == n < 100
        assert msg.startswith(f"fold {sp.fold}: KNN k=100 exceeds the {n} training slide(s); using k={n}")
        assert "class prior" in msg and "--k" in msg
    # uniform votes over the whole training set: every test slide gets the training class prior
    sp0 = res.predictions[res.predictions.fold == splits[0].fold]
    train_labels = df.set_index("slide_id").loc[splits[0].train, "label"]
    prior = np.bincount(train_labels, minlength=2) / len(train_labels)
    np.testing.assert_allclose(sp0[["prob_0", "prob_1"]].to_numpy(), np.tile(prior, (len(sp0), 1)))
    caplog.clear()
    with caplog.at_level("WARNING", logger="gigaslide.eval.probes"):
        run_probe(X, ids, df, splits, method="knn", k=5)
    assert not [r for r in caplog.records if "KNN" in r.getMessage()]


def test_knn_default_k_is_20_or_half_the_training_set() -> None:
    from gigaslide.eval.probes import default_knn_k, knn_predict_proba

    assert [default_knn_k(n) for n in (1, 3, 18, 40, 41, 1000)] == [1, 1, 9, 20, 20, 20]
    # a small separable set: all 18 training slides voting would give every test slide the class prior
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 9)
    X = rng.normal(size=(18, 4)) + 3.0 * y[:, None]
    X_test = np.array([[-3.0, 0, 0, 0], [6.0, 3, 3, 3]])
    proba = knn_predict_proba(X, y, X_test, 2)  # k = 9
    assert proba[0, 0] > 0.8 and proba[1, 1] > 0.8
    np.testing.assert_allclose(knn_predict_proba(X, y, X_test, 2, k=18), 0.5)  # the degenerate vote
