"""K-fold cross-validation of a slide model: splits, training, best checkpoint, test, report.

Output folder::

    config.yaml             the configuration actually used (+ label map, model size under _meta)
    label_map.json          class name -> index (classification)
    splits/                 splits_<k>.csv (CLAM format) + splits.json
    checkpoints/fold<k>.pt  best weights of fold k (selected on its validation set)
    folds/fold<k>.json      metrics, history and test predictions of fold k (written last)
    attention/<id>.h5       per-tile attention of every test slide (coords + scores), for heatmaps
    results.json, per_fold.csv, predictions.csv, summary.md, roc.png | km.png   (eval.reports)
    pooled.json             metrics of the pooled test predictions with bootstrap 95% CIs

A fold whose checkpoint and ``folds/fold<k>.json`` both exist is skipped on a rerun, so an
interrupted run resumes. Rerunning into a folder made with a different config or different
splits is refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from gigaslide import __version__
from gigaslide.data.bags import BagDataset
from gigaslide.data.cohort import Cohort, Sample
from gigaslide.data.splits import (
    Split,
    assert_no_case_leakage,
    few_shot,
    kfold_splits,
    load_split_csvs,
    save_splits,
    subsample_train,
)
from gigaslide.eval.bootstrap import bootstrap_ci
from gigaslide.eval.heatmap import write_attention
from gigaslide.eval.metrics import (
    UndefinedMetricError,
    classification_metrics,
    concordance_index,
    summarize_folds,
    survival_metrics,
)
from gigaslide.eval.reports import write_report
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig, replace, save_config
from gigaslide.train.mil import (
    MetricFn,
    Predictions,
    n_outputs,
    predict,
    save_checkpoint,
    survival_risk,
    train_model,
)
from gigaslide.utils.atomic import atomic_write_text
from gigaslide.utils.seed import seed_everything

log = logging.getLogger(__name__)


def validation_metric(task: str) -> MetricFn:
    """The per-epoch validation score for ``train_model``: AUC (classification) or c-index (survival).

    Returns NaN when the metric is undefined on the set (one class, no comparable pairs).
    """

    def score(samples: list[Sample], logits: np.ndarray) -> float:
        try:
            if task == "classification":
                probs = torch.softmax(torch.from_numpy(logits), dim=1).numpy()
                y = np.array([s.label for s in samples])
                return float(classification_metrics(y, probs, undefined="nan")["auc"])
            risk = survival_risk(torch.from_numpy(logits)).numpy()
            return float(concordance_index([s.time for s in samples], [s.event for s in samples], risk))
        except (UndefinedMetricError, ValueError):
            return float("nan")

    return score


CLASSIFICATION_METRICS = ("auc", "balanced_accuracy", "accuracy", "f1")
SURVIVAL_METRICS = ("c_index",)


@dataclass
class CVResult:
    """What :func:`run_crossval` produced."""

    summary: dict[str, tuple[float, float]]  # metric -> (mean, std) over folds
    per_fold: list[dict[str, Any]]
    predictions: pd.DataFrame  # pooled test predictions, one row per (fold, bag)
    pooled: dict[str, dict[str, float]]  # metric -> {value, low, high} on pooled predictions
    splits: list[Split]
    out_dir: Path
    report: dict[str, Path] = field(default_factory=dict)
    skipped_folds: list[int] = field(default_factory=list)


def make_splits(
    cohort: Cohort, cfg: TrainConfig, splits_dir: str | os.PathLike[str] | None = None
) -> list[Split]:
    """Case-grouped stratified k-fold splits (or CLAM split files), then the training-data budget.

    Splits are always lists of SLIDE ids, grouped by case, so case-level bags map onto them exactly.
    """
    table = cohort.table
    if splits_dir is not None:
        splits = load_split_csvs(splits_dir, df=table)
    else:
        if cfg.folds < 2:
            raise ValueError(f"cross-validation needs folds >= 2 (got {cfg.folds}); or pass --splits DIR")
        splits = kfold_splits(
            table, n_folds=cfg.folds, val_fraction=cfg.val_fraction, seed=cfg.seed, task=cfg.task
        )
    if cfg.few_shot is not None:
        if cfg.task != "classification":
            raise ValueError("few_shot (N training slides per class) applies to classification only")
        splits = [few_shot(s, table, cfg.few_shot, seed=cfg.seed) for s in splits]
    elif cfg.train_fraction < 1.0:
        splits = [subsample_train(s, table, cfg.train_fraction, seed=cfg.seed, task=cfg.task) for s in splits]
    assert_no_case_leakage(splits, table)
    return splits


def _select(samples: list[Sample], slide_ids: list[str]) -> list[Sample]:
    """Samples having at least one slide in ``slide_ids`` (whole cases for case-level bags)."""
    wanted = set(slide_ids)
    return [s for s in samples if wanted.intersection(s.slide_ids)]


def fold_metrics(task: str, pred: Predictions) -> dict[str, float]:
    """Test metrics of one fold; undefined values (e.g. one class in a tiny fold) become NaN."""
    if task == "classification":
        y = np.array([s.label for s in pred.samples])
        m = classification_metrics(y, pred.probs, undefined="nan")
        return {k: m[k] for k in CLASSIFICATION_METRICS}
    try:
        return survival_metrics([s.time for s in pred.samples], [s.event for s in pred.samples], pred.risk)
    except UndefinedMetricError:
        return {"c_index": float("nan")}


def pooled_metrics(task: str, frame: pd.DataFrame, n_boot: int, seed: int) -> dict[str, dict[str, float]]:
    """Metrics of all test predictions pooled over folds with percentile-bootstrap 95% CIs."""
    out: dict[str, dict[str, float]] = {}
    if task == "classification":
        y = frame["y"].to_numpy()
        probs = frame[
            sorted((c for c in frame if c.startswith("prob_")), key=lambda c: int(c[5:]))
        ].to_numpy()
        for m in CLASSIFICATION_METRICS:
            try:
                ci = bootstrap_ci(
                    lambda a, b, m=m: classification_metrics(a, b)[m],
                    y,
                    probs,
                    n_boot=n_boot,
                    seed=seed,
                    stratify=y,
                )
            except (UndefinedMetricError, ValueError) as e:
                log.warning("pooled %s undefined: %s", m, e)
                continue
            out[m] = {"value": ci.point, "low": ci.low, "high": ci.high}
        return out
    arrays = [frame[c].to_numpy() for c in ("time", "event", "risk")]
    try:
        ci = bootstrap_ci(
            lambda t, e, r: survival_metrics(t, e, r)["c_index"],
            *arrays,
            n_boot=n_boot,
            seed=seed,
            stratify=arrays[1],
        )
        out["c_index"] = {"value": ci.point, "low": ci.low, "high": ci.high}
    except (UndefinedMetricError, ValueError) as e:
        log.warning("pooled c_index undefined: %s", e)
    return out


def _check_resume(out: Path, cfg_dict: dict[str, Any], splits: list[Split]) -> None:
    """Refuse to continue a run made with another configuration or other splits."""
    cfg_path, splits_path = out / "config.yaml", out / "splits" / "splits.json"
    if cfg_path.exists():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        old.pop("_meta", None)
        diff = sorted(k for k in set(old) | set(cfg_dict) if old.get(k) != cfg_dict.get(k))
        if diff:
            raise ValueError(
                f"{out} holds a run with a different configuration (keys {diff}); use a new --out folder "
                "or delete the old one to start over"
            )
    if splits_path.exists():
        old_splits = json.loads(splits_path.read_text())
        if old_splits != [s.to_dict() for s in splits]:
            raise ValueError(
                f"{out} holds a run with different splits ({splits_path}); use a new --out folder"
            )


def _run_fold(
    cohort: Cohort, cfg: TrainConfig, split: Split, samples: list[Sample], out: Path, device: torch.device
) -> dict[str, Any]:
    k = split.fold
    train_s, val_s, test_s = (_select(samples, getattr(split, n)) for n in ("train", "val", "test"))
    if not train_s or not test_s:
        raise ValueError(f"fold {k}: empty training ({len(train_s)}) or test ({len(test_s)}) set")
    fold_cfg = replace(cfg, seed=cfg.seed + k)
    seed_everything(fold_cfg.seed)
    n_out = n_outputs(cfg, cohort.n_classes)
    model = create_slide_model(cfg.model, cohort.dim, n_out, **cfg.model_kwargs)
    train_ds = BagDataset(cohort, train_s, max_tiles=cfg.max_tiles, train=True, seed=fold_cfg.seed)
    val_ds = BagDataset(cohort, val_s) if val_s else None
    result = train_model(model, train_ds, val_ds, fold_cfg, device, validation_metric(fold_cfg.task))
    model.load_state_dict(result.best_state)
    pred = predict(model, BagDataset(cohort, test_s), device)
    frame = pred.to_frame(cohort.class_names)
    frame.insert(0, "fold", k)
    for sid, att in pred.attention.items():
        if att["coords"] is None:
            log.warning("slide %s: feature file has no coords, attention file not written", sid)
            continue
        write_attention(
            out / "attention" / f"{sid}.h5",
            att["coords"],
            att["scores"],
            spec=cohort.load(sid).spec,
            meta={"slide_id": sid, "fold": k, "model": cfg.model, "kind": "attention"},
        )
    row = {
        "fold": k,
        "n_train": len(train_s),
        "n_val": len(val_s),
        "n_test": len(test_s),
        **fold_metrics(cfg.task, pred),
        "best_epoch": result.best_epoch,
        "epochs_run": len(result.history),
        "stopped_early": result.stopped_early,
    }
    save_checkpoint(
        out / "checkpoints" / f"fold{k}.pt",
        result.best_state,
        {
            "model": cfg.model,
            "model_kwargs": cfg.model_kwargs,
            "in_dim": cohort.dim,
            "n_outputs": n_out,
            "task": cfg.task,
            "fold": k,
            "class_names": cohort.class_names,
            "survival_loss": cfg.survival_loss,
            "time_bins": None if result.time_bins is None else result.time_bins.tolist(),
            "best_epoch": result.best_epoch,
            "config": cfg.to_dict(),
            "gigaslide_version": __version__,
        },
    )
    doc = {"row": row, "history": result.history, "predictions": frame.to_dict(orient="list")}
    atomic_write_text(out / "folds" / f"fold{k}.json", json.dumps(doc, default=_jsonable))
    return doc


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def run_crossval(
    cohort: Cohort,
    model_name: str,
    task: str,
    cfg: TrainConfig,
    out_dir: str | os.PathLike[str],
    device: torch.device | str = "cpu",
    splits_dir: str | os.PathLike[str] | None = None,
) -> CVResult:
    """Cross-validate ``model_name`` on ``cohort``: train every fold (skipping finished ones), test,
    and write the report into ``out_dir`` (see the module docstring for the files)."""
    if task != cohort.task:
        raise ValueError(f"task {task!r} differs from the cohort's task {cohort.task!r}")
    cfg = replace(cfg, model=model_name, task=task)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    splits = make_splits(cohort, cfg, splits_dir)
    _check_resume(out, cfg.to_dict(), splits)
    meta = {
        "label_map": cohort.label_map(),
        "in_dim": cohort.dim,
        "n_outputs": n_outputs(cfg, cohort.n_classes),
        "labels_csv": str(cohort.labels_path),
        "features_dir": str(cohort.features_dir),
        "splits_dir": str(splits_dir) if splits_dir else None,
        "gigaslide_version": __version__,
    }
    save_config(cfg, out / "config.yaml", meta=meta)
    if task == "classification":
        atomic_write_text(out / "label_map.json", json.dumps(cohort.label_map(), indent=1))
    save_splits(splits, out / "splits")
    samples = cohort.samples(cfg.case_level)
    docs, skipped = [], []
    for split in splits:
        k = split.fold
        fold_json, ckpt = out / "folds" / f"fold{k}.json", out / "checkpoints" / f"fold{k}.pt"
        if fold_json.exists() and ckpt.exists():
            log.info("fold %d already done (%s), skipping", k, fold_json)
            docs.append(json.loads(fold_json.read_text()))
            skipped.append(k)
            continue
        log.info("fold %d: training %s", k, cfg.model)
        docs.append(_run_fold(cohort, cfg, split, samples, out, device))
        log.info("fold %d: %s", k, {m: v for m, v in docs[-1]["row"].items() if isinstance(v, float)})
    per_fold = [d["row"] for d in docs]
    predictions = pd.concat([pd.DataFrame(d["predictions"]) for d in docs], ignore_index=True)
    metric_names = CLASSIFICATION_METRICS if task == "classification" else SURVIVAL_METRICS
    summary = summarize_folds([{m: r[m] for m in metric_names} for r in per_fold])
    pooled = pooled_metrics(task, predictions, cfg.bootstrap, cfg.seed)
    atomic_write_text(out / "pooled.json", json.dumps(pooled, indent=1))
    report = write_report(
        out,
        summary,
        per_fold,
        predictions,
        task,
        splits=splits,
        title=f"{cfg.model} {task} ({len(splits)}-fold CV)",
        config={**cfg.to_dict(), "pooled_test": pooled, **meta},
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
    )
    return CVResult(summary, per_fold, predictions, pooled, splits, out, report, skipped)
