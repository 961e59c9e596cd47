""" "early stopping" is reported only for a run that stopped before its last epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.data.bags import BagDataset
from gigaslide.data.cohort import Cohort
from gigaslide.data.features_io import write_features
from gigaslide.eval.validation import validation_metric
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig
from gigaslide.train.mil import train_model


def _run(root: Path, epochs: int, caplog: pytest.LogCaptureFixture):
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(8):
        write_features(root / f"s{i}.h5", rng.normal(size=(6, 4)).astype(np.float32), np.zeros((6, 2)))
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "label": i % 2})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    cohort = Cohort(root / "labels.csv", root)
    s = cohort.samples()
    torch.manual_seed(0)
    model = create_slide_model("abmil", 4, 2, hidden_dims=[8, 8], dropout=0.0)
    # a vanishing learning rate: the validation loss never improves after epoch 0
    cfg = TrainConfig(epochs=epochs, lr=1e-12, warmup_epochs=0, patience=2, min_epochs=0)
    with caplog.at_level(logging.INFO, logger="gigaslide.train.mil"):
        return train_model(
            model, BagDataset(cohort, s[:6], train=True), BagDataset(cohort, s[6:]), cfg, "cpu",
            validation_metric("classification"),
        )  # fmt: skip


def test_patience_reached_at_the_last_epoch_is_no_early_stop(tmp_path: Path, caplog) -> None:
    result = _run(tmp_path, epochs=3, caplog=caplog)  # epochs 1 and 2 stale: patience met at the last one
    assert len(result.history) == 3 and not result.stopped_early
    assert "early stopping" not in caplog.text


def test_early_stop_before_the_last_epoch_is_reported(tmp_path: Path, caplog) -> None:
    result = _run(tmp_path, epochs=6, caplog=caplog)
    assert len(result.history) == 3 and result.stopped_early
    assert "early stopping after epoch 2 (best epoch 0)" in caplog.text
