"""Evaluation reports: results.json, per_fold.csv, predictions.csv, summary.md, roc.png / km.png.

Confidence intervals: with >= 2 folds, a 95% percentile-bootstrap interval of the MEAN over folds
(folds resampled); with a single fold, a bootstrap over that fold's test predictions.
"""

from __future__ import annotations

import json
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


def metric_cis(
    per_fold: Sequence[Mapping[str, Any]],
    predictions: pd.DataFrame,
    task: str,
    metrics: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """95% CI per metric (see module doc for the method)."""
    out: dict[str, dict[str, Any]] = {}
    if len(per_fold) >= 2:
        for m in metrics:
            vals = np.asarray([float(r[m]) for r in per_fold if m in r], dtype=float)
            vals = vals[np.isfinite(vals)]
            if vals.size < 2:
                continue
            ci = bootstrap_ci(np.mean, vals, n_boot=n_boot, seed=seed)
            out[m] = {"low": ci.low, "high": ci.high, "method": "bootstrap over folds (mean)"}
        return out
    if task == "classification":
        y = predictions["y"].to_numpy()
        probs = predictions[_prob_cols(predictions)].to_numpy()
        for m in metrics:
            try:
                ci = bootstrap_ci(
                    lambda a, b, m=m: classification_metrics(a, b)[m],
                    y,
                    probs,
                    n_boot=n_boot,
                    seed=seed,
                    stratify=y,
                )
            except (UndefinedMetricError, ValueError):
                continue
            out[m] = {"low": ci.low, "high": ci.high, "method": "bootstrap over test slides"}
    else:
        arrays = [predictions[c].to_numpy() for c in ("time", "event", "risk")]
        try:
            ci = bootstrap_ci(
                lambda t, e, r: survival_metrics(t, e, r)["c_index"],
                *arrays,
                n_boot=n_boot,
                seed=seed,
                stratify=arrays[1],
            )
            out["c_index"] = {"low": ci.low, "high": ci.high, "method": "bootstrap over test slides"}
        except (UndefinedMetricError, ValueError):
            pass
    return out


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
    title: str, task: str, results: Mapping[str, Any], n_folds: int, extra: Mapping[str, Any]
) -> str:
    lines = [
        f"# {title}",
        "",
        f"Task: {task}; folds: {n_folds}.",
        "",
        "| metric | mean | std | 95% CI |",
        "|---|---|---|---|",
    ]
    for name, r in results.items():
        ci = f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}]" if r.get("ci_low") is not None else "-"
        mean = "nan" if r["mean"] is None else f"{r['mean']:.3f}"
        std = "nan" if r["std"] is None else f"{r['std']:.3f}"
        lines.append(f"| {name} | {mean} | {std} | {ci} |")
    if "logrank_p" in extra:
        lines += [
            "",
            f"High vs low predicted risk ({extra['risk_split']} split): logrank p = {extra['logrank_p']:.3g}",
        ]
    return "\n".join(lines) + "\n"


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
) -> dict[str, Path]:
    """Write the evaluation report into ``out_dir`` (every file atomically); return name -> path.

    Files: ``results.json`` (mean/std/CI per metric, config, splits), ``per_fold.csv``,
    ``predictions.csv``, ``summary.md``, and ``roc.png`` (classification) or ``km.png`` (survival:
    high vs low predicted risk, split at each fold's median risk, with the log-rank p-value).
    """
    if task not in ("classification", "survival"):
        raise ValueError(f"task must be 'classification' or 'survival', got {task!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cis = metric_cis(per_fold, predictions, task, list(summary), n_boot=n_boot, seed=seed)
    results: dict[str, dict[str, Any]] = {}
    for name, (mean, std) in summary.items():
        ci = cis.get(name, {})
        results[name] = {
            "mean": mean,
            "std": std,
            "ci_low": ci.get("low"),
            "ci_high": ci.get("high"),
            "ci_method": ci.get("method"),
        }
    results = _json_safe(results)
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
        out / "summary.md", _markdown(title, task, results, len(per_fold), extra)
    )
    return paths
