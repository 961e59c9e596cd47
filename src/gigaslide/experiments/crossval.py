"""Experiment runner: cross-validation of a slide model (k-fold, Monte Carlo or given splits): train, select, test, report.

Output folder::

    config.yaml             the configuration actually used (+ label map, model size under _meta)
    label_map.json          class name -> index (classification)
    splits/                 splits_<k>.csv (CLAM format) + splits.json
    checkpoints/fold<k>.pt  best weights of fold k (selected on its validation set)
    folds/fold<k>.json      metrics, history and test predictions of fold k (written last)
    attention/<id>.h5       per-tile attention of every test slide (coords + scores), for heatmaps
    embeddings/fold<k>.h5   with save_embeddings: slide embeddings of fold k's test bags (data.embeddings)
    embeddings/out_of_fold.h5   every bag's test-fold embedding, when each bag is tested once (k-fold)
    results.json, per_fold.csv, predictions.csv, summary.md, roc.png | km.png   (eval.reports)
    pooled.json             metrics of the pooled test predictions with bootstrap 95% CIs (also in
                            results.json["pooled"], next to the fold mean/std in results.json["metrics"])

A fold whose validation set cannot select a model (empty, a class or an event missing) is
warned about loudly and flagged in its ``val_warning`` column of per_fold.csv.

A fold whose checkpoint and ``folds/fold<k>.json`` both exist is skipped on a rerun, so an
interrupted run resumes. Rerunning into a folder made with a different config or different
splits is refused.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

from gigaslide import __version__
from gigaslide.data.bags import BagDataset
from gigaslide.data.cohort import Cohort, Sample
from gigaslide.data.embeddings import read_embeddings, write_embeddings
from gigaslide.data.split_plan import build_splits, validation_problem
from gigaslide.data.splits import Split, save_splits
from gigaslide.eval.heatmap import write_attention
from gigaslide.eval.metrics import summarize_folds
from gigaslide.eval.reports import pooled_metrics, write_report
from gigaslide.eval.validation import (
    CLASSIFICATION_METRICS,
    SURVIVAL_METRICS,
    fold_metrics,
    validation_metric,
)
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig, replace, save_config
from gigaslide.train.mil import (
    Predictions,
    load_slide_model,
    n_outputs,
    predict,
    save_checkpoint,
    train_model,
)
from gigaslide.utils.atomic import atomic_write_text
from gigaslide.utils.seed import seed_everything

log = logging.getLogger(__name__)


@dataclass
class CVResult:
    """What :func:`run_crossval` produced."""

    summary: dict[str, tuple[float, float]]  # metric -> (mean, std) over folds
    per_fold: list[dict[str, Any]]
    predictions: pd.DataFrame  # pooled test predictions, one row per (fold, bag)
    pooled: dict[str, dict[str, Any]]  # metric -> {value, ci_low, ci_high, ci_method, n}: pooled predictions
    splits: list[Split]
    out_dir: Path
    report: dict[str, Path] = field(default_factory=dict)
    skipped_folds: list[int] = field(default_factory=list)
    embeddings: list[Path] = field(default_factory=list)  # embedding files written (save_embeddings)


def make_splits(
    cohort: Cohort, cfg: TrainConfig, splits_dir: str | os.PathLike[str] | None = None
) -> list[Split]:
    """Case-grouped stratified k-fold or Monte Carlo splits (or CLAM split files), then the training
    budget (:func:`gigaslide.data.split_plan.build_splits`, the same path as ``gigaslide probe``).

    Splits are always lists of SLIDE ids, grouped by case, so case-level bags map onto them exactly.
    """
    return build_splits(
        cohort.table, cfg.task, folds=cfg.folds, monte_carlo=cfg.monte_carlo, test_fraction=cfg.test_fraction,
        val_fraction=cfg.val_fraction, seed=cfg.seed, splits_dir=splits_dir, few_shot_n=cfg.few_shot,
        train_fraction=cfg.train_fraction,
    )  # fmt: skip


def split_description(cfg: TrainConfig, n_splits: int, splits_dir: str | os.PathLike[str] | None) -> str:
    """Human-readable name of the evaluation protocol, e.g. ``5-fold CV``."""
    if splits_dir is not None:
        return f"{n_splits} splits from {splits_dir}"
    if cfg.monte_carlo is not None:
        return f"{n_splits} Monte Carlo splits, {cfg.test_fraction:g} test"
    return f"{n_splits}-fold CV"


def _val_warning(cohort: Cohort, cfg: TrainConfig, split: Split) -> str | None:
    """A loud warning (also returned for per_fold.csv) when the fold's validation set cannot select."""
    problem = validation_problem(split, cohort.table, cfg.task)
    if problem is None:
        return None
    metric = "AUC" if cfg.task == "classification" else "c-index"
    if not split.val:
        effect = "early stopping and best-checkpoint selection are OFF: the LAST epoch is kept"
    elif cfg.monitor == "metric":
        effect = (
            f"the validation {metric} is undefined, so monitor=metric cannot select: the FIRST epoch is "
            "kept (use monitor=loss or a larger val_fraction)"
        )
    else:
        effect = f"the validation {metric} is undefined (NaN); checkpoint selection uses the validation loss"
    msg = f"fold {split.fold}: {problem}; {effect}"
    log.warning("%s", msg)
    return msg


SMALL_VALIDATION = 10  # slides; fewer make checkpoint selection and early stopping noisy


def small_validation_warning(splits: list[Split]) -> str | None:
    """A warning naming the folds whose (non-empty) validation set has fewer than ``SMALL_VALIDATION``
    slides, or None. Empty validation sets are :func:`_val_warning`'s."""
    small = {s.fold: len(s.val) for s in splits if 0 < len(s.val) < SMALL_VALIDATION}
    if not small:
        return None
    sizes = sorted(set(small.values()))
    size = f"{sizes[0]}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
    return (
        f"validation sets of {len(small)} of {len(splits)} folds hold only {size} slide(s) (folds "
        f"{sorted(small)[:20]}): checkpoint selection and early stopping on them are noisy; raise "
        "--val-fraction or add slides"
    )


def check_model_config(cfg: TrainConfig, cohort: Cohort) -> None:
    """Build the configured model once, so that a typo in ``model`` or ``model_kwargs`` is reported
    before anything is written into the output folder (a half-written run would block the rerun)."""
    try:
        create_slide_model(cfg.model, cohort.dim, n_outputs(cfg, cohort.n_classes), **cfg.model_kwargs)
    except (KeyError, TypeError, ValueError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ValueError(f"model {cfg.model!r} with model_kwargs {cfg.model_kwargs}: {msg}") from e


def _select(samples: list[Sample], slide_ids: list[str]) -> list[Sample]:
    """Samples having at least one slide in ``slide_ids`` (whole cases for case-level bags)."""
    wanted = set(slide_ids)
    return [s for s in samples if wanted.intersection(s.slide_ids)]


def _check_resume(out: Path, cfg_dict: dict[str, Any], splits: list[Split]) -> None:
    """Refuse to continue a run made with another configuration or other splits."""
    cfg_path, splits_path = out / "config.yaml", out / "splits" / "splits.json"
    if cfg_path.exists():
        old = yaml.safe_load(cfg_path.read_text()) or {}
        old.pop("_meta", None)
        defaults = TrainConfig().to_dict()  # keys added since the old run was made hold their defaults
        diff = sorted(k for k in set(old) | set(cfg_dict) if old.get(k, defaults.get(k)) != cfg_dict.get(k))
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
    cohort: Cohort,
    cfg: TrainConfig,
    split: Split,
    samples: list[Sample],
    out: Path,
    device: torch.device,
    progress: bool = False,
    save_embeddings: bool = False,
) -> dict[str, Any]:
    k = split.fold
    train_s, val_s, test_s = (_select(samples, getattr(split, n)) for n in ("train", "val", "test"))
    if not train_s or not test_s:
        raise ValueError(f"fold {k}: empty training ({len(train_s)}) or test ({len(test_s)}) set")
    val_warning = _val_warning(cohort, cfg, split)
    fold_cfg = replace(cfg, seed=cfg.seed + k)
    seed_everything(fold_cfg.seed)
    n_out = n_outputs(cfg, cohort.n_classes)
    model = create_slide_model(cfg.model, cohort.dim, n_out, **cfg.model_kwargs)
    train_ds = BagDataset(cohort, train_s, max_tiles=cfg.max_tiles, train=True, seed=fold_cfg.seed)
    val_ds = BagDataset(cohort, val_s) if val_s else None
    label = f"fold {k}" if progress else None  # the engine's per-epoch bar (loss, rate)
    result = train_model(model, train_ds, val_ds, fold_cfg, device, validation_metric(fold_cfg.task), label)
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
        "val_warning": val_warning,
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
    if save_embeddings:
        _write_fold_embeddings(cohort, cfg, k, pred, out)
    doc = {"row": row, "history": result.history, "predictions": frame.to_dict(orient="list")}
    atomic_write_text(out / "folds" / f"fold{k}.json", json.dumps(doc, default=_jsonable))
    return doc


def _feature_provenance(cohort: Cohort) -> dict[str, Any]:
    """Tile encoder, its weights' sha256 and random-init flag, from the first feature file's attributes."""
    attrs = cohort.load(cohort.slide_ids[0]).attrs
    return {
        "feature_encoder": str(attrs.get("encoder", "")) or None,
        "feature_weights_sha256": str(attrs.get("weights_sha256", "")) or None,
        "random_init": bool(attrs.get("random_init", False)),
    }


def _write_fold_embeddings(cohort: Cohort, cfg: TrainConfig, k: int, pred: Predictions, out: Path) -> Path:
    """``embeddings/fold<k>.h5``: the test bags' slide embeddings with the fold checkpoint's provenance."""
    assert pred.embeddings is not None
    return write_embeddings(
        out / "embeddings" / f"fold{k}.h5",
        [s.sample_id for s in pred.samples],
        pred.embeddings,
        model=cfg.model,
        checkpoint=out / "checkpoints" / f"fold{k}.pt",
        **_feature_provenance(cohort),
        extra={"fold": k, "split": "test", "task": cfg.task, "unit": "case" if cfg.case_level else "slide",
               "features_dir": str(cohort.features_dir)},
    )  # fmt: skip


def _out_of_fold_embeddings(cohort: Cohort, cfg: TrainConfig, folds: list[Path], out: Path) -> Path | None:
    """``embeddings/out_of_fold.h5``: each bag's embedding from the fold that tested it (None when a bag
    was tested in several splits, as in Monte Carlo CV)."""
    parts = [read_embeddings(p) for p in folds]
    ids = [i for e in parts for i in e.ids]
    if len(set(ids)) != len(ids):
        log.info("bags are tested in several splits: no out-of-fold embedding file (per-fold files only)")
        return None
    return write_embeddings(
        out / "embeddings" / "out_of_fold.h5",
        ids,
        np.concatenate([e.vectors for e in parts]),
        model=cfg.model,
        checkpoint=out / "checkpoints",
        **_feature_provenance(cohort),
        extra={"folds": [int(e.attrs["fold"]) for e in parts], "split": "test (out of fold)", "task": cfg.task,
               "unit": "case" if cfg.case_level else "slide", "features_dir": str(cohort.features_dir),
               "checkpoints_sha256": [str(e.attrs["checkpoint_sha256"]) for e in parts]},
    )  # fmt: skip


def fold_progress(doc: dict[str, Any]) -> str:
    """One fold's summary for the progress bar: epochs run, last training loss, best validation
    metric and the test metrics, e.g. ``fold 2: 20 ep, loss 0.41, val 0.83, test auc 0.80``."""
    row, history = doc["row"], doc.get("history") or []
    parts = [f"fold {row['fold']}: {row.get('epochs_run', len(history))} ep"]
    if history:
        parts.append(f"loss {history[-1]['train_loss']:.3g}")
        vals = [h["val_metric"] for h in history if np.isfinite(h.get("val_metric", float("nan")))]
        if vals:
            parts.append(f"val {max(vals):.3g}")
    tests = [f"{m} {row[m]:.3g}" for m in (*CLASSIFICATION_METRICS, *SURVIVAL_METRICS) if m in row][:2]
    return ", ".join(parts + ([f"test {', '.join(tests)}"] if tests else []))


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
    progress: bool = False,
    save_embeddings: bool = False,
) -> CVResult:
    """Cross-validate ``model_name`` on ``cohort``: train every fold (skipping finished ones), test,
    and write the report into ``out_dir`` (see the module docstring for the files).

    ``progress`` shows a bar over the folds on stderr with the last fold's epochs, training loss,
    validation metric and test metrics. ``save_embeddings`` also writes the slide embeddings of each
    fold's test bags (and their out-of-fold union), readable by ``gigaslide probe --embeddings``.
    """
    if task != cohort.task:
        raise ValueError(f"task {task!r} differs from the cohort's task {cohort.task!r}")
    cfg = replace(cfg, model=model_name, task=task)
    out = Path(out_dir)
    device = torch.device(device)
    check_model_config(cfg, cohort)  # before anything is written
    splits = make_splits(cohort, cfg, splits_dir)
    _check_resume(out, cfg.to_dict(), splits)
    small = small_validation_warning(splits)
    if small:
        log.warning("%s", small)
    out.mkdir(parents=True, exist_ok=True)
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
    provenance = getattr(cohort, "provenance", None)
    warning = provenance.warning() if provenance is not None else None
    if warning:
        log.warning("%s (%s)", warning, cohort.features_dir)
    docs, skipped = [], []
    bar = tqdm(
        total=len(splits), desc=f"{cfg.model} folds", unit="fold", file=sys.stderr, disable=not progress
    )
    for split in splits:
        k = split.fold
        fold_json, ckpt = out / "folds" / f"fold{k}.json", out / "checkpoints" / f"fold{k}.pt"
        if fold_json.exists() and ckpt.exists():
            log.info("fold %d already done (%s), skipping", k, fold_json)
            docs.append(json.loads(fold_json.read_text()))
            skipped.append(k)
            if save_embeddings and not (out / "embeddings" / f"fold{k}.h5").exists():
                model, _ = load_slide_model(ckpt, device)  # a finished fold: embed its test bags again
                test_bags = BagDataset(cohort, _select(samples, split.test))
                _write_fold_embeddings(cohort, cfg, k, predict(model, test_bags, device), out)
            bar.update(1)
            continue
        log.info("fold %d: training %s", k, cfg.model)
        docs.append(_run_fold(cohort, cfg, split, samples, out, device, progress, save_embeddings))
        log.info("fold %d: %s", k, {m: v for m, v in docs[-1]["row"].items() if isinstance(v, float)})
        bar.set_postfix_str(fold_progress(docs[-1]), refresh=False)
        bar.update(1)
    bar.close()
    embeddings: list[Path] = []
    if save_embeddings:
        embeddings = [out / "embeddings" / f"fold{s.fold}.h5" for s in splits]
        oof = _out_of_fold_embeddings(cohort, cfg, embeddings, out)
        embeddings += [oof] if oof is not None else []
    per_fold = [d["row"] for d in docs]
    predictions = pd.concat([pd.DataFrame(d["predictions"]) for d in docs], ignore_index=True)
    metric_names = CLASSIFICATION_METRICS if task == "classification" else SURVIVAL_METRICS
    summary = summarize_folds([{m: r[m] for m in metric_names} for r in per_fold])
    unit = "cases" if cfg.case_level else "slides"
    pooled = pooled_metrics(predictions, task, metric_names, n_boot=cfg.bootstrap, seed=cfg.seed, unit=unit)
    atomic_write_text(out / "pooled.json", json.dumps(pooled, indent=1))
    report = write_report(
        out,
        summary,
        per_fold,
        predictions,
        task,
        splits=splits,
        title=f"{cfg.model} {task} ({split_description(cfg, len(splits), splits_dir)})",
        config={**cfg.to_dict(), **meta},
        n_boot=cfg.bootstrap,
        seed=cfg.seed,
        pooled=pooled,
        unit=unit,
        features=provenance.to_dict() if provenance is not None else None,
    )
    return CVResult(summary, per_fold, predictions, pooled, splits, out, report, skipped, embeddings)
