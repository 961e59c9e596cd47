"""MIL training loop: learns synthetic signals, determinism, early stopping, checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.data.bags import BagDataset
from gigaslide.data.cohort import Cohort
from gigaslide.data.features_io import write_features
from gigaslide.eval.metrics import classification_metrics, concordance_index
from gigaslide.eval.validation import validation_metric
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig
from gigaslide.train.mil import load_slide_model, n_outputs, predict, save_checkpoint, train_model

DIM = 16
SMALL = {"hidden_dims": [32, 16], "dropout": 0.0}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest single-threaded (and do not fight other jobs for cores)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cohort(root: Path, n: int, task: str, seed: int = 0) -> Cohort:
    """Bags of N(0, 1) tiles; signal tiles are shifted by 3 along one fixed direction.

    Classification: positive bags hold 2-4 signal tiles. Survival: a risk group g in {0, 1, 2}
    shifts 6-10 tiles by 2.5 * g; log-time = -1.2 g + N(0, 0.5^2) (log-normal AFT), 25% censored.
    """
    rng = np.random.default_rng(seed)
    direction = np.random.default_rng(99).normal(size=DIM)
    direction /= np.linalg.norm(direction)
    rows = []
    for i in range(n):
        n_tiles = int(rng.integers(20, 50))
        feats = rng.normal(size=(n_tiles, DIM)).astype(np.float32)
        if task == "classification":
            label = i % 2
            k = int(rng.integers(2, 5)) * label
            feats[:k] += 3.0 * direction
        else:
            group = int(rng.integers(0, 3))
            feats[: int(rng.integers(6, 11))] += 2.5 * group * direction
        coords = np.stack([np.arange(n_tiles) * 256, np.zeros(n_tiles)], axis=1)
        write_features(root / "h5_files" / f"s{i:03d}.h5", feats, coords)
        row = {"slide_id": f"s{i:03d}", "case_id": f"c{i:03d}"}
        if task == "classification":
            row["label"] = ["neg", "pos"][label]
        else:
            row["time"] = float(np.exp(-1.2 * group + 0.5 * rng.normal()))
            row["event"] = int(rng.random() > 0.25)
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return Cohort(root / "labels.csv", root, task=task)


def _fit(cohort: Cohort, cfg: TrainConfig, n_train: int, n_val: int):
    s = cohort.samples()
    torch.manual_seed(cfg.seed)
    model = create_slide_model("abmil", cohort.dim, n_outputs(cfg, cohort.n_classes), **SMALL)
    train = BagDataset(cohort, s[:n_train], max_tiles=cfg.max_tiles, train=True, seed=cfg.seed)
    val = BagDataset(cohort, s[n_train : n_train + n_val])
    result = train_model(model, train, val, cfg, "cpu", validation_metric(cfg.task))
    model.load_state_dict(result.best_state)
    return model, result, BagDataset(cohort, s[n_train + n_val :])


def test_abmil_learns_few_signal_tiles(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, 80, "classification")
    cfg = TrainConfig(epochs=10, lr=5e-3, warmup_epochs=0, max_tiles=32, monitor="loss", patience=10)
    model, result, test = _fit(cohort, cfg, 40, 10)
    pred = predict(model, test, "cpu")
    auc = classification_metrics([s.label for s in pred.samples], pred.probs)["auc"]
    assert auc > 0.85, f"ABMIL test AUC {auc:.3f}"
    # attention concentrates on the shifted tiles (the first rows of positive bags)
    pos = next(s for s in pred.samples if s.label == 1)
    att = pred.attention[pos.slide_ids[0]]
    assert att["scores"].shape == att["tile_index"].shape and att["coords"].shape[1] == 2
    assert int(np.argmax(att["scores"])) < 4
    assert len(result.history) == 10 and {"train_loss", "val_loss", "val_metric", "lr"} <= set(
        result.history[0]
    )


def test_metric_monitor_needs_a_metric_fn(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, 12, "classification")
    s = cohort.samples()
    model = create_slide_model("abmil", cohort.dim, 2, **SMALL)
    cfg = TrainConfig(epochs=1, monitor="metric")
    with pytest.raises(ValueError, match="metric_fn"):
        train_model(model, BagDataset(cohort, s[:8], train=True), BagDataset(cohort, s[8:]), cfg, "cpu")


@pytest.mark.parametrize("loss", ["nll", "nll+cox", "cox"])
def test_survival_learns_hazard_signal(tmp_path: Path, loss: str) -> None:
    cohort = _cohort(tmp_path, 90, "survival")
    cfg = TrainConfig(
        task="survival",
        survival_loss=loss,
        epochs=8,
        lr=5e-3,
        warmup_epochs=0,
        accum_steps=8 if "cox" in loss else 1,
        n_bins=4,
    )
    model, result, test = _fit(cohort, cfg, 60, 10)
    if "nll" in loss:
        assert result.time_bins is not None and result.time_bins.shape == (5,)
    pred = predict(model, test, "cpu")
    ci = concordance_index([s.time for s in pred.samples], [s.event for s in pred.samples], pred.risk)
    assert ci > 0.6, f"{loss}: test c-index {ci:.3f}"


def test_cox_needs_accumulation(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, 12, "survival")
    with pytest.raises(ValueError, match="accum_steps >= 2"):
        _fit(cohort, TrainConfig(task="survival", survival_loss="cox", epochs=1), 8, 2)


def test_same_seed_same_result(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, 30, "classification")
    cfg = TrainConfig(epochs=3, lr=1e-3, max_tiles=16, accum_steps=2, model_kwargs=SMALL, seed=5)
    runs = []
    for _ in range(2):
        model, result, test = _fit(cohort, cfg, 20, 4)
        runs.append((result.history, predict(model, test, "cpu").probs))
    assert runs[0][0] == runs[1][0]
    np.testing.assert_array_equal(runs[0][1], runs[1][1])
    model, result, _ = _fit(cohort, TrainConfig(**{**cfg.to_dict(), "seed": 6}), 20, 4)
    assert result.history != runs[0][0]


def test_early_stopping_stops(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path, 16, "classification")
    # a vanishing learning rate cannot improve the validation loss after the first epoch
    cfg = TrainConfig(epochs=30, lr=1e-12, warmup_epochs=0, patience=2, min_epochs=4)
    _, result, _ = _fit(cohort, cfg, 10, 4)
    assert result.stopped_early and len(result.history) == 4  # min_epochs delays the stop
    assert result.best_epoch == 0
    # best epoch 0, no improvement at epochs 1 and 2: patience 2 is used up after exactly 3 epochs
    cfg = TrainConfig(epochs=30, lr=1e-12, warmup_epochs=0, patience=2, min_epochs=1)
    _, result, _ = _fit(cohort, cfg, 10, 4)
    assert result.stopped_early and len(result.history) == 3 and result.best_epoch == 0
    cfg = TrainConfig(epochs=5, lr=1e-12, warmup_epochs=0, early_stopping=False)
    _, result, _ = _fit(cohort, cfg, 10, 4)
    assert not result.stopped_early and len(result.history) == 5


def test_checkpoint_roundtrip(tmp_path: Path) -> None:
    cohort = _cohort(tmp_path / "c", 12, "classification")
    cfg = TrainConfig(epochs=1)
    model, result, test = _fit(cohort, cfg, 8, 2)
    meta = {"model": "abmil", "model_kwargs": SMALL, "in_dim": DIM, "n_outputs": 2}
    path = save_checkpoint(tmp_path / "ck" / "fold0.pt", result.best_state, meta)
    loaded, got = load_slide_model(path)
    assert got["in_dim"] == DIM
    np.testing.assert_allclose(
        predict(loaded, test, "cpu").probs, predict(model, test, "cpu").probs, rtol=1e-6
    )
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(tmp_path / "x.pt", result.best_state, {"model": "abmil"})
