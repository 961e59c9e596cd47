"""Kaplan-Meier estimator, two-group log-rank test (both equal to lifelines) and KM risk-group plots."""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple

import numpy as np
from scipy.stats import chi2

from gigaslide.utils.atomic import atomic_path


class LogRankResult(NamedTuple):
    statistic: float  # chi-square, 1 degree of freedom
    p_value: float


def _arrays(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(time, dtype=np.float64).ravel()
    e = np.asarray(event, dtype=np.float64).ravel()
    if t.size != e.size:
        raise ValueError(f"time ({t.size}) and event ({e.size}) differ in length")
    if t.size == 0:
        raise ValueError("survival arrays are empty")
    if not (np.isfinite(t).all() and np.isfinite(e).all()):
        raise ValueError("time/event contain NaN/inf values")
    if not np.isin(e, [0, 1]).all():
        raise ValueError("event must be 0 (censored) or 1 (event observed)")
    return t, e.astype(bool)


def kaplan_meier(time: np.ndarray, event: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Kaplan-Meier survival curve.

    Returns:
        ``timeline`` (T,) = 0 (if not already a duration) followed by every distinct duration (event
        or censoring), and ``survival`` (T,) = S(t) at each, like lifelines'
        ``KaplanMeierFitter().fit(time, event).survival_function_``.
    """
    t, e = _arrays(time, event)
    uniq, inv = np.unique(t, return_inverse=True)
    deaths = np.bincount(inv, weights=e.astype(np.float64), minlength=uniq.size)  # (T,)
    exits = np.bincount(inv, minlength=uniq.size).astype(np.float64)
    at_risk = t.size - np.r_[0.0, np.cumsum(exits)[:-1]]
    surv = np.cumprod(1.0 - deaths / at_risk)
    if uniq[0] > 0:
        uniq, surv = np.r_[0.0, uniq], np.r_[1.0, surv]
    return uniq, surv


def logrank_test(
    time_a: np.ndarray, event_a: np.ndarray, time_b: np.ndarray, event_b: np.ndarray
) -> LogRankResult:
    """Two-sample log-rank test (Mantel-Haenszel variance with ties), as ``lifelines.statistics.logrank_test``."""
    ta, ea = _arrays(time_a, event_a)
    tb, eb = _arrays(time_b, event_b)
    t = np.r_[ta, tb]
    e = np.r_[ea, eb]
    in_a = np.r_[np.ones(ta.size, bool), np.zeros(tb.size, bool)]
    uniq, inv = np.unique(t, return_inverse=True)
    d = np.bincount(inv, weights=e.astype(float), minlength=uniq.size)  # events at each time
    d_a = np.bincount(inv, weights=(e & in_a).astype(float), minlength=uniq.size)
    exits = np.bincount(inv, minlength=uniq.size).astype(float)
    exits_a = np.bincount(inv, weights=in_a.astype(float), minlength=uniq.size)
    n = t.size - np.r_[0.0, np.cumsum(exits)[:-1]]  # at risk just before each time
    n_a = ta.size - np.r_[0.0, np.cumsum(exits_a)[:-1]]
    expected_a = d * n_a / n
    with np.errstate(invalid="ignore", divide="ignore"):
        var = np.where(n > 1, d * (n_a / n) * (1 - n_a / n) * (n - d) / (n - 1), 0.0)
    v = float(var.sum())
    if v <= 0:
        raise ValueError("log-rank test undefined: no events, or one group is empty at every event time")
    stat = float((d_a.sum() - expected_a.sum()) ** 2 / v)
    return LogRankResult(stat, float(chi2.sf(stat, df=1)))


def plot_km_risk_groups(
    time: np.ndarray,
    event: np.ndarray,
    high_risk: np.ndarray,
    out_path: str | os.PathLike[str],
    title: str = "Kaplan-Meier by predicted risk",
) -> LogRankResult:
    """Plot KM curves of the high- vs low-risk groups with the log-rank p-value; write PNG atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t, e = _arrays(time, event)
    hi = np.asarray(high_risk, dtype=bool).ravel()
    if hi.all() or not hi.any():
        raise ValueError("both risk groups must be non-empty to draw KM curves")
    result = logrank_test(t[hi], e[hi], t[~hi], e[~hi])
    fig, ax = plt.subplots(figsize=(5.5, 4.2), dpi=120)
    for mask, name, color in ((~hi, "low risk", "tab:blue"), (hi, "high risk", "tab:red")):
        tl, s = kaplan_meier(t[mask], e[mask])
        ax.step(tl, s, where="post", color=color, label=f"{name} (n={int(mask.sum())})")
        cens = mask & ~e
        if cens.any():  # censoring ticks at the curve height
            idx = np.searchsorted(tl, t[cens], side="right") - 1
            ax.plot(t[cens], s[idx], "|", color=color, markersize=6)
    ax.set_xlabel("time")
    ax.set_ylabel("survival probability")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"{title}\nlog-rank p = {result.p_value:.3g}")
    ax.legend(loc="best")
    fig.tight_layout()
    with atomic_path(Path(out_path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return result
