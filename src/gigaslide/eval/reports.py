"""Evaluation reports: results.json, per_fold.csv, predictions.csv, summary.md, roc.png / km.png.

Two different summaries are reported, always side by side and labelled with their method:

* ``metrics`` (``results.json``) / "fold mean ± std" (summary.md): the metric of every fold (or Monte
  Carlo split) summarised by mean and sample std, with a 95% percentile-bootstrap interval of the MEAN
  over folds (folds resampled; none with a single fold).
* ``pooled`` / "pooled test": the metric of all out-of-fold test predictions pooled together, with a
  95% percentile-bootstrap interval over the pooled test slides (or cases), stratified by class/event.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gigaslide.data.splits import Split
from gigaslide.eval.bootstrap import bootstrap_ci
from gigaslide.eval.metrics import (
    UndefinedMetricError,
    classification_metrics,
    roc_auc,
    roc_curve,
    survival_metrics,
)
from gigaslide.eval.survival_plots import plot_km_risk_groups
from gigaslide.utils.atomic import atomic_path, atomic_write_text

log = logging.getLogger(__name__)

FOLD_CI_METHOD = "95% percentile bootstrap of the mean over folds (folds resampled)"
TABLE_HEADER = ("metric", "fold mean ± std", "95% CI over folds", "pooled test", "95% CI pooled")


def pooled_ci_method(unit: str = "slides") -> str:
    """Label of the pooled-prediction interval; ``unit`` is what one prediction row is."""
    return f"95% percentile bootstrap over pooled test {unit} (stratified by class/event)"


def _prob_cols(predictions: pd.DataFrame) -> list[str]:
    cols = [c for c in predictions.columns if c.startswith("prob_")]
    return sorted(cols, key=lambda c: int(c.split("_", 1)[1]))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return None if not math.isfinite(float(obj)) else float(obj)
    if isinstance(obj, np.ndarray):
        return _json_safe(obj.tolist())
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    return str(obj)


def fold_cis(
    per_fold: Sequence[Mapping[str, Any]], metrics: Sequence[str], n_boot: int = 1000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """95% bootstrap CI of the mean over folds per metric (NaN folds dropped; needs >= 2 finite folds)."""
    out: dict[str, dict[str, Any]] = {}
    for m in metrics:
        vals = np.asarray([float(r[m]) for r in per_fold if _finite(r.get(m))], dtype=float)
        if vals.size < 2:
            continue
        ci = bootstrap_ci(np.mean, vals, n_boot=n_boot, seed=seed)
        out[m] = {"low": ci.low, "high": ci.high}
    return out


def pooled_metrics(
    predictions: pd.DataFrame,
    task: str,
    metrics: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    unit: str = "slides",
) -> dict[str, dict[str, Any]]:
    """Each metric on ALL test predictions pooled over folds, with a percentile-bootstrap 95% CI over
    prediction rows (stratified by class / event). Undefined metrics are logged and left out.

    Returns ``{metric: {value, ci_low, ci_high, ci_method, n}}``.
    """
    out: dict[str, dict[str, Any]] = {}
    if task == "classification":
        y = predictions["y"].to_numpy()
        probs = predictions[_prob_cols(predictions)].to_numpy()  # (N, C)
        arrays, strat = [y, probs], y

        def fn(m: str):
            return lambda a, b: classification_metrics(a, b)[m]
    else:
        arrays = [predictions[c].to_numpy() for c in ("time", "event", "risk")]
        strat = arrays[1]

        def fn(m: str):
            return lambda t, e, r: survival_metrics(t, e, r)[m]

    for m in metrics:
        try:
            ci = bootstrap_ci(fn(m), *arrays, n_boot=n_boot, seed=seed, stratify=strat)
        except (UndefinedMetricError, ValueError, KeyError) as e:
            log.warning("pooled %s undefined on %d test predictions: %s", m, len(predictions), e)
            continue
        out[m] = {
            "value": ci.point,
            "ci_low": ci.low,
            "ci_high": ci.high,
            "ci_method": pooled_ci_method(unit),
            "n": len(predictions),
        }
    return out


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def _fmt(v: Any) -> str:
    return "nan" if v is None or not math.isfinite(float(v)) else f"{float(v):.3f}"


def metric_rows(
    metrics: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Mapping[str, Any]]
) -> list[tuple[str, str, str, str, str]]:
    """Cells of the summary table (columns :data:`TABLE_HEADER`), shared by summary.md and the console."""
    rows = []
    for name, r in metrics.items():
        ci = f"[{_fmt(r['ci_low'])}, {_fmt(r['ci_high'])}]" if r.get("ci_low") is not None else "-"
        p = pooled.get(name) or {}
        pv = _fmt(p["value"]) if p.get("value") is not None else "-"
        pci = f"[{_fmt(p['ci_low'])}, {_fmt(p['ci_high'])}]" if p.get("ci_low") is not None else "-"
        rows.append((name, f"{_fmt(r['mean'])} ± {_fmt(r['std'])}", ci, pv, pci))
    return rows


def format_metric_table(
    metrics: Mapping[str, Mapping[str, Any]], pooled: Mapping[str, Mapping[str, Any]]
) -> str:
    """Plain-text aligned table of :func:`metric_rows` (for the console)."""
    rows = [TABLE_HEADER, *metric_rows(metrics, pooled)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(TABLE_HEADER))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def plot_roc(predictions: pd.DataFrame, out_path: str | os.PathLike[str], title: str = "ROC") -> Path:
    """ROC curves per fold (thin) and their mean (bold); one-vs-rest per class for multi-class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = _prob_cols(predictions)
    classes = [1] if len(cols) == 2 else list(range(len(cols)))
    grid = np.linspace(0.0, 1.0, 201)
    fig, ax = plt.subplots(figsize=(5, 5), dpi=120)
    colors = plt.get_cmap("tab10")
    for ci, c in enumerate(classes):
        curves, aucs = [], []
        for _, fold in predictions.groupby("fold"):
            pos = (fold["y"].to_numpy() == c).astype(int)
            score = fold[cols[c]].to_numpy()
            try:
                fpr, tpr = roc_curve(pos, score)
                aucs.append(roc_auc(pos, score))
            except UndefinedMetricError:
                continue
            ax.plot(fpr, tpr, color=colors(ci), alpha=0.25, linewidth=0.8)
            curves.append(np.interp(grid, fpr, tpr))
        if curves:
            mean = np.mean(curves, axis=0)
            mean[0] = 0.0
            name = "" if len(classes) == 1 else f"class {c} vs rest: "
            ax.plot(grid, mean, color=colors(ci), linewidth=2.2, label=f"{name}mean AUC {np.mean(aucs):.3f}")
    ax.plot([0, 1], [0, 1], "--", color="grey", linewidth=0.8)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    with atomic_path(Path(out_path)) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return Path(out_path)


def _markdown(
    title: str,
    task: str,
    results: Mapping[str, Any],
    pooled: Mapping[str, Any],
    n_folds: int,
    n_predictions: int,
    unit: str,
    extra: Mapping[str, Any],
    features: Mapping[str, Any] | None = None,
) -> str:
    lines = [f"# {title}", ""]
    lines += _features_lines(features)
    lines += [
        f"Task: {task}; {n_folds} train/test split(s) (folds); {n_predictions} pooled test predictions.",
        "",
        "| " + " | ".join(TABLE_HEADER) + " |",
        "|" + "---|" * len(TABLE_HEADER),
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in metric_rows(results, pooled)]
    lines += [
        "",
        f"- *fold mean ± std*, *95% CI over folds*: per-fold test metrics; {FOLD_CI_METHOD}.",
        f"- *pooled test*, *95% CI pooled*: the metric on all {n_predictions} out-of-fold test predictions "
        f"pooled together; {pooled_ci_method(unit)}.",
    ]
    if "logrank_p" in extra:
        lines += [
            "",
            f"High vs low predicted risk ({extra['risk_split']} split): logrank p = {extra['logrank_p']:.3g}",
        ]
    return "\n".join(lines) + "\n"


def _features_lines(features: Mapping[str, Any] | None) -> list[str]:
    """summary.md lines on the encoder behind the features, with the loud warnings first."""
    if not features:
        return []
    lines = []
    if features.get("random_init"):
        lines += [
            "**WARNING: the features come from a RANDOM-INIT encoder (no pretrained weights): these "
            "results only test the pipeline and say nothing about the data.**",
            "",
        ]
    if features.get("mixed"):
        lines += [
            f"**WARNING: the features mix {len(features.get('sources', []))} encoders/weights "
            "(allowed explicitly): the results are not those of one encoder.**",
            "",
        ]
    if features.get("encoder"):
        sha = str(features.get("weights_sha256") or "")[:12]
        weights = "RANDOM-INIT" if features.get("random_init") else features.get("weights")
        lines += [f"Features: encoder {features['encoder']}, weights {weights} (sha256 {sha}).", ""]
    elif features.get("n_files"):
        lines += ["Features: the feature files record no encoder or weights (written by another tool).", ""]
    return lines


def write_report(
    out_dir: str | os.PathLike[str],
    summary: Mapping[str, tuple[float, float]],
    per_fold: Sequence[Mapping[str, Any]],
    predictions: pd.DataFrame,
    task: str,
    splits: Sequence[Split] | None = None,
    title: str = "gigaslide evaluation",
    config: Mapping[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    pooled: Mapping[str, Mapping[str, Any]] | None = None,
    unit: str = "slides",
    features: Mapping[str, Any] | None = None,
) -> dict[str, Path]:
    """Write the evaluation report into ``out_dir`` (every file atomically); return name -> path.

    ``features`` is the provenance of the features (:class:`gigaslide.data.provenance.FeatureProvenance`
    as a dict): stored as ``results.json["features"]`` (with ``random_init`` at the top level too) and
    stated at the top of ``summary.md``, with a loud warning for a random-init or mixed encoder.

    ``pooled`` are the metrics of the pooled test predictions as returned by :func:`pooled_metrics`
    (computed here when None). Files: ``results.json`` (``metrics``: fold mean/std/CI over folds;
    ``pooled``: pooled value and its CI over test ``unit``; each with ``ci_method``; config, splits),
    ``per_fold.csv``, ``predictions.csv``, ``summary.md`` (both, as separate labelled columns), and
    ``roc.png`` (classification) or ``km.png`` (survival: high vs low predicted risk, split at each
    fold's median risk, with the log-rank p-value).
    """
    if task not in ("classification", "survival"):
        raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if pooled is None:
        pooled = pooled_metrics(predictions, task, list(summary), n_boot=n_boot, seed=seed, unit=unit)
    bad = [m for m, v in pooled.items() if not {"value", "ci_low", "ci_high"} <= set(v)]
    if bad:
        raise ValueError(f"pooled metrics {bad} need value, ci_low, ci_high (see reports.pooled_metrics)")
    cis = fold_cis(per_fold, list(summary), n_boot=n_boot, seed=seed)
    results: dict[str, dict[str, Any]] = {}
    for name, (mean, std) in summary.items():
        ci = cis.get(name, {})
        results[name] = {
            "mean": mean,
            "std": std,
            "ci_low": ci.get("low"),
            "ci_high": ci.get("high"),
            "ci_method": FOLD_CI_METHOD if ci else "none: fewer than 2 folds with a finite value",
            "n_folds": sum(_finite(r.get(name)) for r in per_fold),  # folds where it is defined
        }
    results = _json_safe(results)
    pooled_doc = _json_safe({m: dict(v) for m, v in pooled.items()})
    paths: dict[str, Path] = {}
    extra: dict[str, Any] = {}
    if task == "classification":
        paths["roc"] = plot_roc(predictions, out / "roc.png", title=title)
    else:
        med = predictions.groupby("fold")["risk"].transform("median")
        high = (predictions["risk"] > med).to_numpy()
        if high.any() and not high.all():
            lr = plot_km_risk_groups(
                predictions["time"], predictions["event"], high, out / "km.png", title=title
            )
            paths["km"] = out / "km.png"
            extra = {
                "logrank_statistic": lr.statistic,
                "logrank_p": lr.p_value,
                "risk_split": "per-fold median",
            }
    doc = {
        "title": title,
        "task": task,
        "n_folds": len(per_fold),
        "metrics": results,
        "pooled": pooled_doc,
        "n_predictions": len(predictions),
        "random_init_features": bool(features.get("random_init")) if features else None,
        "features": _json_safe(dict(features)) if features else None,
        **_json_safe(extra),
        "config": _json_safe(dict(config or {})),
        "splits": [_json_safe(s.to_dict()) for s in splits] if splits is not None else None,
    }
    paths["results"] = atomic_write_text(out / "results.json", json.dumps(doc, indent=2))
    for name, frame in (("per_fold", pd.DataFrame(list(per_fold))), ("predictions", predictions)):
        with atomic_path(out / f"{name}.csv") as tmp:
            frame.to_csv(tmp, index=False)
        paths[name] = out / f"{name}.csv"
    paths["summary"] = atomic_write_text(
        out / "summary.md",
        _markdown(title, task, results, pooled_doc, len(per_fold), len(predictions), unit, extra, features),
    )
    return paths
