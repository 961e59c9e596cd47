"""Training config overrides: YAML values coerced to the field types, errors naming the key."""

from __future__ import annotations

import pytest

from gigaslide.train.config import TrainConfig, apply_overrides


def test_exponent_without_a_dot_is_a_float() -> None:
    cfg = apply_overrides(TrainConfig(), ["lr=1e-3", "weight_decay=5E-4", "epochs=3"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.weight_decay == 5e-4 and cfg.epochs == 3


def test_non_numbers_are_still_refused_by_name() -> None:
    with pytest.raises(ValueError, match="config key 'lr'"):
        apply_overrides(TrainConfig(), ["lr=fast"])
