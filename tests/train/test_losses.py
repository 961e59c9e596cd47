"""Survival losses and time bins against hand-computed values and lifelines."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.train.losses import (
    CoxPHLoss,
    NLLSurvLoss,
    discretize_times,
    make_time_bins,
    risk_from_hazards,
)

# logits chosen so that hazards are h = sigmoid(logits) = [0.5, 0.25, 0.75]
# survival S_j = prod_{i<=j} (1 - h_i) = [0.5, 0.375, 0.09375]
LOGITS = torch.tensor([[0.0, math.log(1 / 3), math.log(3)]])


def test_nll_surv_single_slides_by_hand() -> None:
    loss = NLLSurvLoss()
    # uncensored, died in bin 1: -log S_0 - log h_1 = -log 0.5 - log 0.25 = log 8
    assert loss(LOGITS, torch.tensor([1]), torch.tensor([1])).item() == pytest.approx(2.0794415, abs=1e-6)
    # uncensored in bin 0: -log S_{-1} - log h_0 = -log 1 - log 0.5 = log 2
    assert loss(LOGITS, torch.tensor([0]), torch.tensor([1])).item() == pytest.approx(0.6931472, abs=1e-6)
    # censored in bin 1: -log S_1 = -log 0.375
    assert loss(LOGITS, torch.tensor([1]), torch.tensor([0])).item() == pytest.approx(0.9808293, abs=1e-6)
    # censored in the last bin: -log S_2 = -log 0.09375
    assert loss(LOGITS, torch.tensor([2]), torch.tensor([0])).item() == pytest.approx(2.3671236, abs=1e-6)


def test_nll_surv_batch_mean_sum_none_and_alpha() -> None:
    logits = LOGITS.repeat(2, 1)
    bins, events = torch.tensor([1, 1]), torch.tensor([1.0, 0.0])
    # mean of log 8 and -log 0.375
    assert NLLSurvLoss()(logits, bins, events).item() == pytest.approx(1.5301354, abs=1e-6)
    assert NLLSurvLoss(reduction="sum")(logits, bins, events).item() == pytest.approx(3.0602708, abs=1e-6)
    per = NLLSurvLoss(reduction="none")(logits, bins, events)
    torch.testing.assert_close(per, torch.tensor([2.0794415, 0.9808293]))
    # alpha=0.4: uncensored term unchanged, censored term scaled by (1 - alpha) = 0.6
    assert NLLSurvLoss(alpha=0.4)(logits, bins, events).item() == pytest.approx(1.3339695, abs=1e-6)


def test_nll_surv_eps_clamp_keeps_loss_finite() -> None:
    logits = torch.tensor([[-200.0, -200.0]])  # hazards underflow to 0
    value = NLLSurvLoss(eps=1e-7)(logits, torch.tensor([1]), torch.tensor([1]))
    assert value.item() == pytest.approx(-math.log(1e-7), rel=1e-5)


def test_nll_surv_gradient_direction() -> None:
    """Dying in bin 2 should push hazard 2 up and hazards 0, 1 down."""
    logits = torch.zeros(1, 4, requires_grad=True)
    NLLSurvLoss()(logits, torch.tensor([2]), torch.tensor([1])).backward()
    g = logits.grad[0]
    assert g[0] > 0 and g[1] > 0 and g[2] < 0 and g[3] == 0


def test_nll_surv_rejects_bad_bins() -> None:
    with pytest.raises(ValueError, match=r"bin indices must lie in \[0, 2\]"):
        NLLSurvLoss()(LOGITS, torch.tensor([3]), torch.tensor([1]))
    with pytest.raises(ValueError, match="batch sizes differ"):
        NLLSurvLoss()(LOGITS, torch.tensor([0, 1]), torch.tensor([1, 1]))


def test_risk_from_hazards() -> None:
    # risk = -(0.5 + 0.375 + 0.09375)
    assert risk_from_hazards(LOGITS).item() == pytest.approx(-0.96875, abs=1e-6)
    higher = risk_from_hazards(LOGITS + 1.0)
    assert higher.item() > risk_from_hazards(LOGITS).item()


def test_cox_ph_loss_hand_example_with_ties() -> None:
    # exp(risk) = [2, 1, 3, 1]; times 1, 2, 2 (tied events), 3 (censored)
    # event t=1: risk set all -> log 2 - log 7
    # events t=2 (Breslow, both use the full set {2,3,4} = 1+3+1 = 5): (0 - log 5) + (log 3 - log 5)
    # loss = -log(6 / 175) / 3 events = 1.1243422
    risk = torch.tensor([math.log(2), 0.0, math.log(3), 0.0])
    times = torch.tensor([1.0, 2.0, 2.0, 3.0])
    events = torch.tensor([1, 1, 1, 0])
    assert CoxPHLoss()(risk, times, events).item() == pytest.approx(1.1243422, abs=1e-6)
    assert CoxPHLoss()(risk.unsqueeze(1), times, events).item() == pytest.approx(1.1243422, abs=1e-6)


def test_cox_ph_loss_without_events_is_zero_and_differentiable() -> None:
    risk = torch.tensor([0.3, -0.2], requires_grad=True)
    loss = CoxPHLoss()(risk, torch.tensor([1.0, 2.0]), torch.tensor([0, 0]))
    loss.backward()
    assert loss.item() == 0 and torch.equal(risk.grad, torch.zeros(2))


def test_cox_ph_loss_matches_lifelines_partial_likelihood() -> None:
    lifelines = pytest.importorskip("lifelines")
    rng = np.random.default_rng(0)
    n = 40
    x = rng.normal(size=n)
    times = rng.exponential(scale=np.exp(-0.8 * x))  # continuous: no ties, so Efron == Breslow
    events = (rng.random(n) < 0.7).astype(int)
    df = pd.DataFrame({"x": x, "T": times, "E": events})
    cph = lifelines.CoxPHFitter().fit(df, duration_col="T", event_col="E")
    beta = float(cph.params_["x"])
    ours = CoxPHLoss()(
        torch.tensor(beta * x, dtype=torch.float64), torch.tensor(times), torch.tensor(events)
    ).item()
    assert ours * events.sum() == pytest.approx(-cph.log_likelihood_, rel=1e-6)


def test_make_time_bins_uses_uncensored_quantiles() -> None:
    times = np.arange(1, 11, dtype=float)
    events = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 1])
    # uncensored times 1, 3, 5, 7, 9, 10 -> quartiles 3.5, 6, 8.5; outer edges cover all times +- eps
    edges = make_time_bins(times, events, n_bins=4, eps=1e-6)
    np.testing.assert_allclose(edges, [1 - 1e-6, 3.5, 6.0, 8.5, 10 + 1e-6])
    unc = times[events == 1]
    np.testing.assert_allclose(edges[1:-1], pd.qcut(unc, 4, retbins=True)[1][1:-1])
    bins = discretize_times(times, edges)
    np.testing.assert_array_equal(bins, [0, 0, 0, 1, 1, 2, 2, 2, 3, 3])
    expected = pd.cut(times, bins=edges, right=False, labels=False)
    np.testing.assert_array_equal(bins, expected)
    # outside the training range: clipped into the first / last bin
    np.testing.assert_array_equal(discretize_times([0.0, 100.0], edges), [0, 3])
    assert bins.dtype == np.int64


def test_make_time_bins_errors() -> None:
    with pytest.raises(ValueError, match="use fewer bins"):
        make_time_bins([5.0] * 6, [1] * 6, n_bins=4)
    with pytest.raises(ValueError, match="no uncensored"):
        make_time_bins([1.0, 2.0], [0, 0])
    with pytest.raises(ValueError, match="events must be 0"):
        make_time_bins([1.0, 2.0], [1, 2])
    with pytest.raises(ValueError, match="same length"):
        make_time_bins([1.0, 2.0], [1])
    with pytest.raises(ValueError, match=">= 0"):
        make_time_bins([-1.0, 2.0], [1, 1])
    with pytest.raises(ValueError, match="strictly increasing"):
        discretize_times([1.0], [2.0, 1.0])
