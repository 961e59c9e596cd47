"""Per-step learning-rate schedules."""

from __future__ import annotations

import numpy as np
import pytest

from gigaslide.train.schedules import constant_schedule, cosine_schedule, lr_schedule, steps_per_epoch


def test_cosine_endpoints_and_warmup() -> None:
    s = cosine_schedule(1e-3, 1e-5, total_steps=110, warmup_steps=10, start_warmup_value=0.0)
    assert s.shape == (110,)
    assert s[0] == 0.0 and s[10] == pytest.approx(1e-3) and s[-1] == pytest.approx(1e-5)
    np.testing.assert_allclose(s[:10], np.arange(10) * 1e-4)  # linear warmup
    assert np.all(np.diff(s[10:]) <= 0)  # monotone decay
    # midpoint of the cosine is the mean of base and final
    decay = s[10:]
    assert decay[(len(decay) - 1) // 2] == pytest.approx((1e-3 + 1e-5) / 2, rel=0.02)


def test_cosine_without_warmup_and_edge_cases() -> None:
    s = cosine_schedule(2.0, 0.0, total_steps=5)
    np.testing.assert_allclose(
        s, [2.0, 2.0 * (1 + np.cos(np.pi / 4)) / 2, 1.0, 2.0 * (1 + np.cos(3 * np.pi / 4)) / 2, 0.0]
    )
    assert cosine_schedule(1.0, 0.5, total_steps=1).tolist() == [1.0]  # one step: the peak, not a no-op
    assert cosine_schedule(1.0, 0.0, total_steps=0).shape == (0,)
    with pytest.raises(ValueError):
        cosine_schedule(1.0, 0.0, total_steps=-1)


def test_constant_and_dispatch() -> None:
    np.testing.assert_allclose(constant_schedule(1.0, 6, warmup_steps=2), [0.0, 0.5, 1, 1, 1, 1])
    assert steps_per_epoch(10, 4) == 3 and steps_per_epoch(8, 4) == 2
    s = lr_schedule("cosine", 1e-3, 0.0, epochs=4, n_steps_per_epoch=3, warmup_epochs=1)
    assert s.shape == (12,) and s[3] == pytest.approx(1e-3) and s[-1] == 0.0
    with pytest.raises(ValueError, match="unknown lr schedule"):
        lr_schedule("step", 1e-3, 0.0, 1, 1)


def test_single_step_decay_trains_at_the_peak() -> None:
    assert cosine_schedule(1e-3, 0.0, 1).tolist() == [1e-3]
    assert cosine_schedule(1e-3, 0.0, 3, warmup_steps=2).tolist()[-1] == 1e-3
