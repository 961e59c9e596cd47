"""Percentile bootstrap confidence intervals for any metric of aligned arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from gigaslide.eval.metrics import UndefinedMetricError


class BootstrapCI(tuple):
    """``(low, high, point)`` that also carries ``n_boot`` (valid resamples) and ``n_invalid``
    (resamples drawn but skipped because the metric was undefined on them)."""

    low: float
    high: float
    point: float
    n_boot: int
    n_invalid: int

    def __new__(cls, low: float, high: float, point: float, n_boot: int, n_invalid: int) -> BootstrapCI:
        obj = super().__new__(cls, (low, high, point))
        obj.low, obj.high, obj.point = low, high, point
        obj.n_boot, obj.n_invalid = n_boot, n_invalid
        return obj

    def to_dict(self) -> dict[str, float | int]:
        return {
            "low": self.low,
            "high": self.high,
            "point": self.point,
            "n_boot": self.n_boot,
            "n_invalid": self.n_invalid,
        }


def _resample_indices(
    rng: np.random.Generator, n: int, strata: list[np.ndarray] | None
) -> np.ndarray:  # (n,) int
    if strata is None:
        return rng.integers(0, n, size=n)
    return np.concatenate([idx[rng.integers(0, idx.size, size=idx.size)] for idx in strata])


def bootstrap_ci(
    metric_fn: Callable[..., float],
    *arrays: np.ndarray | Sequence[object],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    stratify: np.ndarray | Sequence[object] | None = None,
    max_invalid_fraction: float = 0.5,
) -> BootstrapCI:
    """Percentile-bootstrap ``1 - alpha`` confidence interval of ``metric_fn(*arrays)``.

    Rows of all ``arrays`` (same first dimension) are resampled together with replacement; with
    ``stratify`` (N,) each stratum is resampled to its own size (keeps class balance, so AUC stays
    defined). A resample on which ``metric_fn`` raises :class:`UndefinedMetricError` or returns NaN is
    skipped, counted in ``n_invalid`` and redrawn, until ``n_boot`` valid values exist; more than
    ``max_invalid_fraction * n_boot`` invalid draws raise a ``ValueError``. Deterministic for a seed.

    Returns:
        :class:`BootstrapCI` unpacking as ``(low, high, point)``.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    arrs = [np.asarray(a) for a in arrays]
    n = arrs[0].shape[0]
    if any(a.shape[0] != n for a in arrs):
        raise ValueError(f"arrays differ in length: {[a.shape[0] for a in arrs]}")
    if n == 0:
        raise ValueError("bootstrap_ci got empty arrays")
    strata = None
    if stratify is not None:
        s = np.asarray(stratify)
        if s.shape[0] != n:
            raise ValueError(f"stratify has {s.shape[0]} entries for {n} samples")
        strata = [np.nonzero(s == v)[0] for v in np.unique(s)]

    point = float(metric_fn(*arrs))
    rng = np.random.default_rng(seed)
    stats = np.empty(n_boot, dtype=np.float64)
    n_valid = n_invalid = 0
    max_invalid = max(1, int(max_invalid_fraction * n_boot))
    while n_valid < n_boot:
        idx = _resample_indices(rng, n, strata)
        try:
            value = float(metric_fn(*(a[idx] for a in arrs)))
        except UndefinedMetricError:
            value = float("nan")
        if np.isfinite(value):
            stats[n_valid] = value
            n_valid += 1
            continue
        n_invalid += 1
        if n_invalid > max_invalid:
            raise ValueError(
                f"metric undefined on {n_invalid} of {n_valid + n_invalid} bootstrap resamples; "
                "pass stratify=<labels> so every resample keeps all classes/events"
            )
    low, high = np.quantile(stats, [alpha / 2.0, 1.0 - alpha / 2.0])
    return BootstrapCI(float(low), float(high), point, n_boot, n_invalid)
