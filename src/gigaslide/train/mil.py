"""Training and prediction of slide-level (multiple-instance) models on bags of tile features.

``train_model`` runs :class:`MILObjective` on the generic training engine: bag batch size 1 with
gradient accumulation, AdamW, a per-step cosine schedule with warmup, tile subsampling (via the bag
dataset), validation each epoch, best-checkpoint selection and early stopping. Losses:

* classification: cross-entropy on the slide logits;
* survival ``nll``: discrete-time NLL (``NLLSurvLoss``) over ``n_bins`` bins cut at event-time
  quantiles of the TRAINING fold (HIPT/MCAT); ``cox``: Cox partial likelihood over the bags of
  each accumulation window (so ``accum_steps >= 2``); ``nll+cox`` both. For ``nll`` the output bias
  starts at the logit of the training fold's life-table hazard per bin (:func:`init_survival_baseline`);
* plus ``aux_weight * out.aux_loss`` when the model returns one (CLAM instance clustering).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigaslide.data.bags import Bag, BagBatch, BagDataset
from gigaslide.data.cohort import Sample
from gigaslide.data.image_bags import collate_any
from gigaslide.models.slide import SlideOutput, create_slide_model, slide_inputs
from gigaslide.train.config import TrainConfig
from gigaslide.train.engine import Engine, EngineConfig, OptimConfig, StepContext, StepOutput
from gigaslide.train.engine import Objective as EngineObjective
from gigaslide.train.losses import (
    CoxPHLoss,
    NLLSurvLoss,
    baseline_hazards,
    discretize_times,
    make_time_bins,
    risk_from_hazards,
)
from gigaslide.utils.atomic import atomic_path

log = logging.getLogger(__name__)

# scores a validation set: (samples, logits (N, C)) -> AUC / c-index, NaN when undefined
MetricFn = Callable[[list[Sample], np.ndarray], float]


@dataclass
class TrainResult:
    """Outcome of :func:`train_model`."""

    best_state: dict[str, Tensor]  # CPU copy of the selected weights
    history: list[dict[str, float]]  # one row per epoch: epoch, lr, train_loss, val_loss, val_metric
    best_epoch: int
    best_score: float  # monitored value at best_epoch (loss or metric)
    stopped_early: bool
    time_bins: np.ndarray | None = None  # (n_bins + 1,) survival bin edges of the training fold


@dataclass
class Predictions:
    """Per-bag predictions, slide embeddings and per-slide attention of :func:`predict`."""

    samples: list[Sample]
    logits: np.ndarray  # (n, C); (n, 0) for embedding-only models
    embeddings: np.ndarray | None = None  # (n, E) SlideOutput.embedding of every bag
    probs: np.ndarray | None = None  # (n, C) classification
    risk: np.ndarray | None = None  # (n,) survival, higher = earlier event
    # slide_id -> {"coords": (N, 2) | None, "scores": (N,), "tile_index": (N,)}
    attention: dict[str, dict[str, np.ndarray | None]] = field(default_factory=dict)

    def to_frame(self, class_names: list[str] | None = None) -> pd.DataFrame:
        """One row per bag: ids, target (``y`` index + ``label`` name, or ``time``/``event``) and the
        prediction (``prob_<k>`` per class index + ``pred``, or ``risk``)."""
        rows: dict[str, Any] = {
            "sample_id": [s.sample_id for s in self.samples],
            "case_id": [s.case_id for s in self.samples],
            "slide_ids": [";".join(s.slide_ids) for s in self.samples],
        }
        if self.probs is not None:
            y = np.array([s.label for s in self.samples], dtype=np.int64)
            names = class_names or [str(i) for i in range(self.probs.shape[1])]
            rows["y"] = y
            rows["label"] = [names[i] for i in y]
            for j in range(self.probs.shape[1]):
                rows[f"prob_{j}"] = self.probs[:, j]
            pred = self.probs.argmax(axis=1)
            rows["pred"] = pred
            rows["pred_label"] = [names[i] for i in pred]
        if self.risk is not None:
            rows["time"] = [s.time for s in self.samples]
            rows["event"] = [s.event for s in self.samples]
            rows["risk"] = self.risk
        return pd.DataFrame(rows)


def n_outputs(cfg: TrainConfig, n_classes: int) -> int:
    """Model output size: classes, survival bins (NLL) or a single log-risk (Cox only)."""
    if cfg.task == "classification":
        return int(n_classes)
    return 1 if cfg.survival_loss == "cox" else int(cfg.n_bins)


def survival_risk(logits: Tensor) -> Tensor:
    """(B,) risk: the Cox log-risk for one output, else ``risk_from_hazards`` of K hazard logits."""
    return logits[:, 0] if logits.shape[1] == 1 else risk_from_hazards(logits)


class Objective:
    """Per-bag loss and the windowed Cox term for one task/config.

    With ``model``, the loss follows the model's declared recipe: it is applied to each of
    ``model.loss_streams(out)`` (weighted) and, for classification, is ``model.classification_loss``
    (``"cross_entropy"`` or ``"bce"`` against one-hot targets). DS-MIL thus trains with
    ``0.5 * BCE(bag) + 0.5 * BCE(max instance)`` as its reference code does.
    """

    def __init__(
        self, cfg: TrainConfig, time_bins: np.ndarray | None, model: nn.Module | None = None
    ) -> None:
        self.task = cfg.task
        self.time_bins = time_bins
        self.use_nll = cfg.task == "survival" and cfg.survival_loss in ("nll", "nll+cox")
        self.use_cox = cfg.task == "survival" and cfg.survival_loss in ("cox", "nll+cox")
        self.cox_weight = cfg.cox_weight
        self.nll = NLLSurvLoss(alpha=cfg.nll_alpha)
        self.cox = CoxPHLoss()
        self.model = model
        self.classification_loss = str(getattr(model, "classification_loss", "cross_entropy"))
        if self.classification_loss not in ("cross_entropy", "bce"):
            raise ValueError(
                f"{type(model).__name__}.classification_loss must be 'cross_entropy' or 'bce', "
                f"got {self.classification_loss!r}"
            )

    def _streams(self, out: SlideOutput | Tensor) -> list[tuple[float, Tensor]]:
        if isinstance(out, Tensor):
            return [(1.0, out)]
        if self.model is not None and hasattr(self.model, "loss_streams"):
            return self.model.loss_streams(out)
        return [(1.0, out.logits)]

    def bag_loss(self, out: SlideOutput | Tensor, samples: list[Sample]) -> Tensor:
        """Mean per-bag loss (B bags) of a model output (or bare logits (B, C)); 0 for Cox-only survival."""
        streams = self._streams(out)
        return sum(
            (w * self._task_loss(logits, samples) for w, logits in streams), streams[0][1].new_zeros(())
        )

    def _task_loss(self, logits: Tensor, samples: list[Sample]) -> Tensor:
        logits = logits.float()  # (B, C); fp32 loss under autocast
        dev = logits.device
        if self.task == "classification":
            y = torch.tensor([s.label for s in samples], dtype=torch.long, device=dev)
            if self.classification_loss == "bce":
                target = F.one_hot(y, logits.shape[1]).to(logits.dtype)  # (B, C)
                return F.binary_cross_entropy_with_logits(logits, target)
            return F.cross_entropy(logits, y)
        if not self.use_nll:
            return logits.sum() * 0.0
        bins = discretize_times([s.time for s in samples], self.time_bins)
        ev = torch.tensor([s.event for s in samples], dtype=torch.float32, device=dev)
        return self.nll(logits, torch.from_numpy(bins).to(dev), ev)

    def cox_loss(self, risks: list[Tensor], samples: list[Sample]) -> Tensor:
        r = torch.cat([x.reshape(-1) for x in risks])
        t = torch.tensor([s.time for s in samples], dtype=r.dtype, device=r.device)
        e = torch.tensor([s.event for s in samples], dtype=torch.float32, device=r.device)
        return self.cox_weight * self.cox(r, t, e)


def init_survival_baseline(model: nn.Module, train_bags: BagDataset, time_bins: np.ndarray) -> np.ndarray:
    """Start the model at the training fold's baseline hazards; returns them (K,).

    The output bias becomes ``logit(h_j)`` of the life-table hazard per bin
    (:func:`gigaslide.train.losses.baseline_hazards`). With the default zero bias every hazard starts
    at 0.5, far from the cohort's (e.g. 0.2 in early bins, 0.9 in the open last bin); the first
    updates then fit that baseline through all weights, in proportion to each bag's (all-positive,
    after ReLU) embedding, which correlates the risk with the embedding's norm rather than with the
    slide content. On a cohort where classification reaches AUC 1.0 this left NLL survival at
    c-index 0.48; starting from the baseline, the loss only has to learn how slides differ from it.
    """
    if not hasattr(model, "init_output_bias"):
        raise ValueError(
            f"{type(model).__name__} has no init_output_bias(): derive it from SlideModel, or set "
            "nll_baseline_init=false to train NLL survival from a zero output bias"
        )
    bins = discretize_times(train_bags.times(), time_bins)
    hazards = baseline_hazards(bins, train_bags.events(), len(time_bins) - 1)
    try:
        model.init_output_bias(torch.from_numpy(np.log(hazards / (1.0 - hazards))).float())
    except NotImplementedError as e:
        raise ValueError(
            f"{e}: NLL survival starts the output bias at the baseline hazards; implement "
            "output_layers() for this model, or set nll_baseline_init=false"
        ) from e
    return hazards


def _forward(model: nn.Module, batch: BagBatch, labels: Tensor | None = None) -> SlideOutput:
    """The model on ``batch``, served by its input kind (:func:`~gigaslide.models.slide.slide_inputs`)."""
    return model(**slide_inputs(model, batch, labels))


@torch.no_grad()
def evaluate(
    model: nn.Module,
    bags: BagDataset,
    objective: Objective,
    device: torch.device,
    metric_fn: MetricFn | None = None,
) -> tuple[float, float]:
    """(loss, metric) of ``model`` on every bag (no tile subsampling), in eval mode.

    The metric is NaN without ``metric_fn`` (the evaluation layer supplies it: AUC or c-index).
    """
    model.eval()
    losses, logits = [], []
    for i in range(len(bags)):
        batch = collate_any([bags[i]]).to(device)
        out = _forward(model, batch)
        losses.append(float(objective.bag_loss(out, batch.samples)))
        logits.append(out.logits.float().cpu())
    all_logits = torch.cat(logits)
    loss = float(np.mean(losses))
    if objective.use_cox:
        loss += float(objective.cox_loss([survival_risk(all_logits)], bags.samples))
    metric = metric_fn(bags.samples, all_logits.numpy()) if metric_fn is not None else float("nan")
    return loss, metric


class _BagEpochs:
    """The micro-batches of MIL training: lists of bags in a per-epoch permutation of the training set.

    A micro-batch is one bag, or a whole accumulation window when the loss couples its bags (Cox).
    The order depends only on (seed, epoch), so a resumed run sees the same bags.
    """

    def __init__(self, bags: BagDataset, seed: int, window: int) -> None:
        self.bags, self.seed, self.window = bags, int(seed), int(window)

    def __len__(self) -> int:
        return math.ceil(len(self.bags) / self.window)

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[Bag]]:
        self.bags.set_epoch(epoch)
        order = np.random.default_rng([self.seed, 7, epoch]).permutation(len(self.bags))
        for i in range(start, len(self)):
            yield [self.bags[int(j)] for j in order[i * self.window : (i + 1) * self.window]]


class MILObjective(EngineObjective):
    """Supervised MIL on the engine: bag losses of :class:`Objective`, validation each epoch, best-epoch
    selection and early stopping (``ctx.stop``)."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        losses: Objective,
        val_bags: BagDataset | None,
        device: torch.device,
        metric_fn: MetricFn | None,
    ) -> None:
        self.model, self.cfg, self.losses = model, cfg, losses
        self.val_bags = val_bags if val_bags is not None and len(val_bags) > 0 else None
        self.device, self.metric_fn = device, metric_fn
        self.higher_better = cfg.monitor == "metric"
        self.best_score = -math.inf if self.higher_better else math.inf
        self.best_epoch, self.best_state, self.stale = -1, None, 0

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def train_step(self, batch: list[Bag], ctx: StepContext) -> StepOutput:
        model = ctx.models["model"]
        pending, risks, samples = [], [], []
        for bag in batch:
            bb = collate_any([bag]).to(ctx.device)
            labels = None
            if self.cfg.task == "classification":
                labels = torch.tensor([s.label for s in bb.samples], dtype=torch.long, device=ctx.device)
            with ctx.autocast():
                out = _forward(model, bb, labels=labels)
            loss = self.losses.bag_loss(out, bb.samples)
            if out.aux_loss is not None:
                loss = loss + self.cfg.aux_weight * out.aux_loss
            pending.append(loss)
            risks.append(survival_risk(out.logits.float()))
            samples.extend(bb.samples)
        total = torch.stack(pending).mean()
        if self.losses.use_cox:  # the Cox term couples the bags of the window
            total = total + self.losses.cox_loss(risks, samples)
        return StepOutput(total)

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, float]:
        row: dict[str, float] = {}
        if self.val_bags is not None:
            row["val_loss"], row["val_metric"] = evaluate(
                self.model, self.val_bags, self.losses, self.device, self.metric_fn
            )
            score = row["val_metric"] if self.higher_better else row["val_loss"]
            better = score > self.best_score if self.higher_better else score < self.best_score
            improved = math.isfinite(score) and better
        else:
            score, improved = float(epoch), True  # without validation the last epoch is kept
        if improved or self.best_state is None:
            self.best_score, self.best_epoch, self.stale = score, epoch, 0
            self.best_state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
        else:
            self.stale += 1
        cfg = self.cfg
        if (
            self.val_bags is not None
            and cfg.early_stopping
            and epoch + 1 >= cfg.min_epochs
            and self.stale >= cfg.patience
            and epoch + 1 < cfg.epochs
        ):
            ctx.stop = True
            log.info("early stopping after epoch %d (best epoch %d)", epoch, self.best_epoch)
        return row


def train_model(
    model: nn.Module,
    train_bags: BagDataset,
    val_bags: BagDataset | None,
    cfg: TrainConfig,
    device: torch.device | str,
    metric_fn: MetricFn | None = None,
    progress_label: str | None = None,
) -> TrainResult:
    """Train ``model`` on ``train_bags``; select the best epoch on ``val_bags`` (the last one without).

    ``progress_label`` (e.g. ``"fold 3"``) shows the engine's per-epoch progress bar under that label.

    ``metric_fn(samples, logits) -> float`` scores the validation set each epoch (NaN when
    undefined); it is required when ``cfg.monitor == "metric"``. The evaluation layer provides
    one per task (:func:`gigaslide.eval.validation.validation_metric`).

    The loop is the generic :class:`~gigaslide.train.engine.Engine` with :class:`MILObjective`:
    AdamW with weight decay on every parameter (as CLAM), a per-step schedule, ``accum_steps`` bags
    per optimizer step. Randomness (bag order, tile draws, dropout) derives from ``cfg.seed``: the
    same seed, data and initial weights give identical results. Seed the model's initialisation
    before building it.
    """
    device = torch.device(device)
    if len(train_bags) == 0:
        raise ValueError("train_model: the training set is empty")
    objective_bins = None
    if cfg.task == "survival" and cfg.survival_loss in ("nll", "nll+cox"):
        objective_bins = make_time_bins(train_bags.times(), train_bags.events(), cfg.n_bins)
        if cfg.nll_baseline_init:
            init_survival_baseline(model, train_bags, objective_bins)
    losses = Objective(cfg, objective_bins, model)
    if cfg.monitor == "metric" and metric_fn is None:
        raise ValueError(
            "cfg.monitor='metric' needs a metric_fn (e.g. gigaslide.eval.validation.validation_metric)"
        )
    if losses.use_cox and cfg.accum_steps < 2:
        raise ValueError(
            "the Cox loss compares the bags of one accumulation window: set accum_steps >= 2 "
            f"(e.g. --set accum_steps=16), got {cfg.accum_steps}"
        )
    objective = MILObjective(model, cfg, losses, val_bags, device, metric_fn)
    window = cfg.accum_steps if losses.use_cox else 1
    optim = OptimConfig(
        name="adamw", lr=cfg.lr, min_lr=cfg.min_lr, lr_schedule=cfg.lr_schedule, warmup_epochs=cfg.warmup_epochs,
        weight_decay=cfg.weight_decay, no_decay_norm_bias=False, accum_steps=cfg.accum_steps // window,
        grad_clip=cfg.grad_clip,
    )  # fmt: skip
    shown = {"progress": progress_label is not None, "description": progress_label or "train"}
    engine = Engine(objective, optim, EngineConfig(epochs=cfg.epochs, seed=cfg.seed, **shown), device)
    fit = engine.fit(_BagEpochs(train_bags, cfg.seed, window))
    history = [{"train_loss" if k == "loss" else k: v for k, v in row.items()} for row in fit.history]
    if objective.val_bags is not None and not math.isfinite(objective.best_score):
        log.warning(
            "validation %s was undefined at every epoch; keeping epoch %d", cfg.monitor, objective.best_epoch
        )
    assert objective.best_state is not None
    return TrainResult(
        objective.best_state, history, objective.best_epoch, float(objective.best_score), fit.stopped_early,
        objective_bins,
    )  # fmt: skip


@torch.no_grad()
def predict(model: nn.Module, bags: BagDataset, device: torch.device | str) -> Predictions:
    """Predictions (probabilities or risks), slide embeddings (n, E) for every bag, and attention
    scores split per slide. An embedding-only model (``n_classes=0``) gets embeddings only."""
    device = torch.device(device)
    model.to(device)
    model.eval()
    logits, embeddings, attention = [], [], {}
    for i in range(len(bags)):
        bag = bags[i]
        out = _forward(model, collate_any([bag]).to(device))
        logits.append(out.logits.float().cpu())
        embeddings.append(out.embedding.float().cpu())
        if out.attention is None:
            continue
        att = out.attention[0, : bag.features.shape[0]].float().cpu().numpy()  # (N,)
        s_idx = bag.slide_index.numpy()
        for k, sid in enumerate(bag.sample.slide_ids):
            sel = s_idx == k
            attention[sid] = {
                "coords": bag.coords.numpy()[sel] if bag.coords is not None else None,
                "scores": att[sel],
                "tile_index": bag.tile_index.numpy()[sel],
            }
    all_logits = torch.cat(logits) if logits else torch.zeros(0, 1)
    all_emb = torch.cat(embeddings).numpy() if embeddings else None
    pred = Predictions(list(bags.samples), all_logits.numpy(), embeddings=all_emb, attention=attention)
    if all_logits.shape[1] == 0:  # embedding-only model: nothing to turn into probabilities or risks
        return pred
    if bags.task == "classification":
        # models trained with per-class BCE (DS-MIL) predict per-class sigmoids, as their official code does
        bce = getattr(model, "classification_loss", "ce") == "bce"
        pred.probs = (torch.sigmoid(all_logits) if bce else torch.softmax(all_logits, dim=1)).numpy()
    else:
        pred.risk = survival_risk(all_logits).numpy()
    return pred


def save_checkpoint(path: str | os.PathLike[str], state: dict[str, Tensor], meta: dict[str, Any]) -> Path:
    """Atomically save weights plus what :func:`load_slide_model` needs to rebuild the model.

    ``meta`` must hold ``model`` (registry name), ``model_kwargs``, ``in_dim`` and ``n_outputs``.
    """
    missing = [k for k in ("model", "model_kwargs", "in_dim", "n_outputs") if k not in meta]
    if missing:
        raise ValueError(f"checkpoint meta lacks {missing}")
    with atomic_path(path) as tmp:
        torch.save({"state_dict": state, **meta}, tmp)
    return Path(path)


def load_slide_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu"
) -> tuple[nn.Module, dict]:
    """Rebuild the slide model of a checkpoint written by :func:`save_checkpoint`; returns (model, meta).

    (Not to be confused with :func:`gigaslide.models.weights.load_checkpoint`, which reads foreign
    weight files into a state dict.)
    """
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)  # never runs pickled code
    except Exception as e:  # torch.load on a foreign file raises anything (IndexError, UnpicklingError ...)
        reason = " ".join(str(e).split())[:300]
        raise ValueError(
            f"{path}: not a readable gigaslide training checkpoint (checkpoints/fold<k>.pt of `gigaslide "
            f"train`): {type(e).__name__}: {reason}"
        ) from e
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in ckpt:
        raise ValueError(f"{path}: not a gigaslide training checkpoint (no 'state_dict'/'model' entries)")
    # initial weights (e.g. a LongViT pretraining checkpoint) are superseded by the saved state
    kwargs = {k: v for k, v in ckpt.get("model_kwargs", {}).items() if k != "weights"}
    model = create_slide_model(ckpt["model"], ckpt["in_dim"], ckpt["n_outputs"], **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    model.to(torch.device(device)).eval()
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    return model, meta
