"""Survival losses and time discretisation for slide-level models.

Conventions used throughout:
    * ``events[i] = 1`` means the event (death / progression) was observed at ``times[i]``;
      ``events[i] = 0`` means the patient was censored then. The censorship indicator of HIPT / MCAT
      code is ``c = 1 - event``.
    * Discrete-time models predict K hazard logits per slide (``SlideOutput.logits`` with
      ``n_classes = K``): ``h_j = sigmoid(logit_j)`` is the probability of the event in bin j given
      survival up to it, and ``S_j = prod_{i<=j} (1 - h_i)`` is the survival past bin j.
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike
from torch import Tensor, nn


def _as_1d(values: ArrayLike, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or infinite values; clean the labels table first")
    return arr


def make_time_bins(times: ArrayLike, events: ArrayLike, n_bins: int = 4, eps: float = 1e-6) -> np.ndarray:
    """Bin edges (n_bins + 1,) from quantiles of the UNCENSORED event times, as HIPT / MCAT do.

    Interior edges are the 1/n_bins, ..., (n_bins-1)/n_bins quantiles of the times with ``event == 1``
    (so each bin holds about the same number of observed events); the outer edges are widened to cover
    all times (censored included): ``edges[0] = min(times) - eps`` and ``edges[-1] = max(times) + eps``.

    Raises:
        ValueError: on mismatched lengths, negative or non-finite times, events outside {0, 1}, or when
            there are too few distinct event times for ``n_bins`` distinct edges.
    """
    t, e = _as_1d(times, "times"), _as_1d(events, "events")
    if t.shape != e.shape:
        raise ValueError(f"times and events must have the same length, got {t.size} and {e.size}")
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    if np.any(t < 0):
        raise ValueError("times must be >= 0 (time from diagnosis to event or censoring)")
    if not np.all(np.isin(e, (0.0, 1.0))):
        raise ValueError("events must be 0 (censored) or 1 (event observed)")
    observed = t[e == 1]
    if observed.size == 0:
        raise ValueError("no uncensored event times: survival bins need at least one observed event")
    edges = np.quantile(observed, np.linspace(0.0, 1.0, n_bins + 1))
    edges[0] = min(t.min(), edges[0]) - eps
    edges[-1] = max(t.max(), edges[-1]) + eps
    if np.any(np.diff(edges) <= 0):
        raise ValueError(
            f"time bins are not distinct ({edges.tolist()}): too many tied event times for n_bins={n_bins}; "
            "use fewer bins"
        )
    return edges


def discretize_times(times: ArrayLike, edges: ArrayLike) -> np.ndarray:
    """Bin index (int64) of each time: bin j holds ``edges[j] <= t < edges[j+1]``.

    Times outside the edges (e.g. a test set whose follow-up exceeds the training range) are clipped
    into the first / last bin.
    """
    t = _as_1d(times, "times")
    e = _as_1d(edges, "edges")
    if e.size < 2 or np.any(np.diff(e) <= 0):
        raise ValueError(f"edges must be strictly increasing with at least 2 entries, got {e.tolist()}")
    idx = np.searchsorted(e, t, side="right") - 1
    return np.clip(idx, 0, e.size - 2).astype(np.int64)


def baseline_hazards(bins: ArrayLike, events: ArrayLike, n_bins: int, clip: float = 0.01) -> np.ndarray:
    """Life-table hazard of each bin (n_bins,): events in bin j / slides still at risk in bin j.

    ``bins`` are the bin indices of the training slides (:func:`discretize_times`); a slide is at risk
    in every bin up to its own. This is the discrete Kaplan-Meier hazard of the cohort, the hazard a
    model without any slide information should predict; values are clipped to ``[clip, 1 - clip]``
    (a bin without events or without survivors would otherwise give an infinite logit).
    """
    b = np.asarray(bins, dtype=np.int64).reshape(-1)
    e = _as_1d(events, "events")
    if b.shape != e.shape:
        raise ValueError(f"bins and events must have the same length, got {b.size} and {e.size}")
    if b.size and (b.min() < 0 or b.max() >= n_bins):
        raise ValueError(f"bin indices must lie in [0, {n_bins - 1}], got {sorted(set(b.tolist()))}")
    at_risk = np.array([(b >= j).sum() for j in range(n_bins)], dtype=np.float64)
    died = np.array([((b == j) & (e == 1)).sum() for j in range(n_bins)], dtype=np.float64)
    h = np.divide(died, at_risk, out=np.full(n_bins, 0.5), where=at_risk > 0)
    return np.clip(h, clip, 1.0 - clip)


def _check_batch(logits: Tensor, *others: Tensor) -> None:
    b = logits.shape[0]
    for other in others:
        if other.reshape(-1).shape[0] != b:
            raise ValueError(f"survival loss: batch sizes differ ({b} predictions vs {other.numel()} labels)")


class NLLSurvLoss(nn.Module):
    """Discrete-time survival negative log-likelihood (Zadeh & Schmid 2020; as used by MCAT and HIPT).

    For a slide with bin y and hazards h (from ``sigmoid(logits)``), with ``S_{-1} = 1``:
        uncensored (event=1):  L_unc = -log S_{y-1} - log h_y     (survived to bin y, died in it)
        censored   (event=0):  L_cen = -log S_y                   (survived past bin y)
    and the per-slide loss is ``(1 - alpha) * (L_unc + L_cen) + alpha * L_unc`` (one of the two terms is
    zero), averaged over the batch. Probabilities are clamped at ``eps`` before the log.

    ``alpha`` up-weights uncensored slides; the default 0.0 is what HIPT and MCAT train with
    (their ``--alpha_surv`` default), giving the plain likelihood.
    """

    def __init__(self, alpha: float = 0.0, eps: float = 1e-7, reduction: str = "mean") -> None:
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.alpha, self.eps, self.reduction = float(alpha), float(eps), reduction

    def forward(self, logits: Tensor, bins: Tensor, events: Tensor) -> Tensor:
        """logits (B, K) hazard logits, bins (B,) long in [0, K), events (B,) 1 = observed, 0 = censored."""
        _check_batch(logits, bins, events)
        k = logits.shape[1]
        y = bins.reshape(-1, 1).to(device=logits.device, dtype=torch.long)  # (B, 1)
        if y.min() < 0 or y.max() >= k:
            raise ValueError(f"NLLSurvLoss: bin indices must lie in [0, {k - 1}], got {bins.tolist()}")
        event = events.reshape(-1, 1).to(device=logits.device, dtype=logits.dtype)  # (B, 1)
        hazards = torch.sigmoid(logits)  # (B, K)
        surv = torch.cumprod(1.0 - hazards, dim=1)  # (B, K)
        surv_padded = torch.cat([torch.ones_like(surv[:, :1]), surv], dim=1)  # (B, K+1): S_{-1}=1, S_0..
        s_before = surv_padded.gather(1, y).clamp_min(self.eps)  # S_{y-1}
        s_after = surv_padded.gather(1, y + 1).clamp_min(self.eps)  # S_y
        h_y = hazards.gather(1, y).clamp_min(self.eps)
        uncensored = -event * (torch.log(s_before) + torch.log(h_y))
        censored = -(1.0 - event) * torch.log(s_after)
        loss = ((1.0 - self.alpha) * (uncensored + censored) + self.alpha * uncensored).squeeze(1)  # (B,)
        if self.reduction == "mean":
            return loss.mean()
        if self.reduction == "sum":
            return loss.sum()
        return loss


def risk_from_hazards(logits: Tensor) -> Tensor:
    """Risk score (B,) = -sum_j S_j from hazard logits (B, K), as in MCAT; higher = earlier event.

    Use it with a concordance index: higher risk should pair with shorter survival.
    """
    surv = torch.cumprod(1.0 - torch.sigmoid(logits), dim=1)
    return -surv.sum(dim=1)


class CoxPHLoss(nn.Module):
    """Negative Cox partial log-likelihood of a batch, Breslow handling of tied times.

    For predicted log-risks r (B,), the loss is
        -(1 / n_events) * sum_{i: event_i = 1} [ r_i - log sum_{j: t_j >= t_i} exp(r_j) ]
    where every tied event shares the full risk set (Breslow). A batch without any event carries no
    partial-likelihood information and returns 0 (still attached to the graph).

    Scale: the sum runs over the events and is divided by their number, i.e. the mean over events
    (DeepSurv, pycox). MCAT's ``CoxSurvLoss`` multiplies each term by the event indicator and takes the
    mean over the whole batch, i.e. divides by the batch size B: this loss is ``B / n_events`` times
    MCAT's (1.25x at 80% events), which acts as a larger learning rate for the Cox term.
    """

    def forward(self, risk: Tensor, times: Tensor, events: Tensor) -> Tensor:
        """risk (B,) or (B, 1) log-risk, times (B,), events (B,) 1 = observed, 0 = censored."""
        _check_batch(risk, times, events)
        r = risk.reshape(-1)  # (B,)
        t = times.reshape(-1).to(device=r.device, dtype=r.dtype)
        e = events.reshape(-1).to(device=r.device).bool()
        if not bool(e.any()):
            return r.sum() * 0.0
        at_risk = t.unsqueeze(0) >= t.unsqueeze(1)  # (B, B): row i = risk set of subject i
        log_denom = torch.logsumexp(r.unsqueeze(0).masked_fill(~at_risk, float("-inf")), dim=1)  # (B,)
        return -(r - log_denom)[e].sum() / e.sum()
