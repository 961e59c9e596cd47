"""The DINO recipe on the training engine: student/teacher self-distillation of a registry tile encoder.

:class:`DINOObjective` joins the pieces (Caron et al., ICCV 2021; HIPT stage 1): the student is a
:class:`MultiCropWrapper` (``backbone`` = any registry encoder, ``head`` = :class:`DINOHead`) fed all
crops; the teacher is its copy (without stochastic depth) fed the two global crops and updated by
EMA with a cosine momentum schedule; :class:`DINOLoss` compares them. Per step, as in the official
code: per-parameter gradient clipping, no update of the head's last layer during the first
``freeze_last_layer`` epochs, then the optimizer step, then the teacher EMA.
Defaults are DINO's ViT-S/16 recipe (HIPT ViT_256-16): AdamW, ``lr = 5e-4 * global batch / 256`` with
a 10-epoch linear warm-up then cosine to 1e-6, weight decay cosine 0.04 -> 0.4, momentum 0.996 -> 1,
65536 prototypes, teacher temperature 0.04, clipping 3.0, last layer frozen for 1 epoch.
Warm-ups longer than the run are shortened to the run (logged).
:func:`pretrain_dino` runs it on the tiles of a ``gigaslide tile`` output and returns
``out_dir/checkpoint.pth``, in DINO's layout (``student``, ``teacher``, ``dino_loss``,
``optimizer``, ``epoch``, ...): ``create_encoder(name, weights=<it>)`` loads the teacher backbone.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset, Subset

from gigaslide.ssl.crop_data import MultiCropData, describe_tiles, tiles_from_tiling
from gigaslide.ssl.dino_head import DINOHead
from gigaslide.ssl.dino_loss import DINOLoss
from gigaslide.ssl.ema import cancel_last_layer_grads, clip_gradients_per_param, ema_update, momentum_schedule
from gigaslide.ssl.multicrop import MultiCrop, MultiCropConfig, MultiCropWrapper
from gigaslide.train.engine import (
    Engine,
    EngineConfig,
    Objective,
    OptimConfig,
    StepContext,
    StepOutput,
)
from gigaslide.utils.dist import dist_env

log = logging.getLogger(__name__)


@dataclass
class DINOConfig:
    """DINO hyper-parameters (defaults: the official ViT-S/16 recipe, as used by HIPT stage 1)."""

    out_dim: int = 65536
    head_hidden_dim: int = 2048
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    use_bn_in_head: bool = False
    norm_last_layer: bool = True
    momentum_teacher: float = 0.996
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.04
    warmup_teacher_temp_epochs: int = 30
    student_temp: float = 0.1
    center_momentum: float = 0.9
    freeze_last_layer: int = 1
    clip_grad: float = 3.0
    drop_path_rate: float = 0.1
    lr: float = 5e-4  # per 256 images of global batch (linear scaling rule)
    min_lr: float = 1e-6
    warmup_epochs: int = 10
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    crops: MultiCropConfig = field(default_factory=MultiCropConfig)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (stored in checkpoints)."""
        d = dataclasses.asdict(self)
        d["crops"] = {k: list(v) if isinstance(v, tuple) else v for k, v in d["crops"].items()}
        return d


def _build_backbone(
    encoder: str,
    weights: Any,
    drop_path_rate: float,
    encoder_kwargs: dict[str, Any],
    warn_random: bool = True,
) -> nn.Module:
    from gigaslide.models.encoders import create_encoder

    kw = dict(encoder_kwargs)
    if drop_path_rate > 0:
        kw["drop_path_rate"] = drop_path_rate
    try:
        return create_encoder(encoder, weights=weights, warn_random=warn_random, **kw)
    except TypeError as e:
        if "drop_path_rate" in str(e):
            raise ValueError(
                f"encoder {encoder!r} has no stochastic depth (drop_path_rate); pass --drop-path 0"
            ) from e
        raise


def embed_dim_of(backbone: nn.Module) -> int:
    """The backbone's output width: ``num_features`` (ViTs, timm models) or its ``.meta.embed_dim``."""
    meta = getattr(backbone, "meta", None)
    dim = getattr(backbone, "num_features", None) or getattr(meta, "embed_dim", None)
    if dim is None:
        raise ValueError(f"cannot tell the embedding width of {type(backbone).__name__}")
    return int(dim)


class DINOObjective(Objective):
    """DINO as an engine objective: modules ``student``, ``teacher`` (checkpointed with ``dino_loss``).

    Args:
        student: MultiCropWrapper(backbone, DINOHead) being trained.
        teacher: a copy of it (same parameter names), updated by EMA only.
        loss: the DINOLoss (its ``center`` is checkpointed as ``dino_loss``).
        cfg: the recipe (momentum, clipping, last-layer freezing).
    """

    def __init__(
        self, student: MultiCropWrapper, teacher: MultiCropWrapper, loss: DINOLoss, cfg: DINOConfig
    ) -> None:
        self.student, self.teacher, self.loss, self.cfg = student, teacher, loss, cfg
        self.teacher.load_state_dict(self.student.state_dict(), strict=True)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.student.train()
        self.teacher.train()  # no dropout / stochastic depth in the teacher; mode only matters for BatchNorm

    def modules(self) -> dict[str, nn.Module]:
        return {"student": self.student, "teacher": self.teacher, "dino_loss": self.loss}

    def trainable(self) -> dict[str, nn.Module]:
        return {"student": self.student}

    def sync_batchnorm(self, device: torch.device | str, world_size: int) -> bool:
        """Under torchrun (``world_size > 1``) on CUDA, turn the batch norms of student and teacher into
        SyncBatchNorm, as DINO does, so that their statistics are those of the global batch (the
        checkpoint layout is unchanged). torch has no SyncBatchNorm on the CPU: there each rank
        normalises with its own batch's statistics (warned). Returns True when it converted."""
        if world_size < 2 or not any(
            isinstance(m, nn.modules.batchnorm._BatchNorm) for m in self.student.modules()
        ):
            return False
        if torch.device(device).type != "cuda":
            log.warning(
                "batch norm in the DINO model on %s: each of the %d processes normalises with the statistics "
                "of its own batch (SyncBatchNorm needs CUDA), so results differ from one process on the global "
                "batch",
                device,
                world_size,
            )
            return False
        self.student = nn.SyncBatchNorm.convert_sync_batchnorm(self.student)
        self.teacher = nn.SyncBatchNorm.convert_sync_batchnorm(self.teacher)
        return True

    def schedules(self, total_steps: int, steps_per_epoch: int) -> dict[str, np.ndarray]:
        epochs = max(1, total_steps // max(1, steps_per_epoch))
        return {
            "momentum": momentum_schedule(self.cfg.momentum_teacher, 1.0, epochs, steps_per_epoch)[
                :total_steps
            ]
        }

    def train_step(self, batch: Any, ctx: StepContext) -> StepOutput:
        """``batch``: the crops, ``list`` of (B, 3, h, w), the 2 global crops first."""
        images = [im.to(ctx.device, non_blocking=True) for im in batch]
        with ctx.autocast():
            with torch.no_grad():
                teacher_output = self.teacher(images[:2])  # (2B, K)
            student_output = ctx.models["student"](images)  # (n_crops * B, K)
            loss = self.loss(student_output, teacher_output, ctx.epoch)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"DINO loss is {float(loss)} at step {ctx.step}: lower the learning rate or use --precision fp32"
            )
        logs = {"teacher_temp": float(self.loss.teacher_temp_schedule[ctx.epoch])}
        if "momentum" in ctx.values:
            logs["momentum"] = float(ctx.values["momentum"])
        return StepOutput(loss=loss, logs=logs)

    def after_backward(self, ctx: StepContext) -> None:
        if self.cfg.clip_grad and self.cfg.clip_grad > 0:
            clip_gradients_per_param(self.student, self.cfg.clip_grad)
        cancel_last_layer_grads(self.student, ctx.epoch, self.cfg.freeze_last_layer)

    def after_step(self, ctx: StepContext) -> None:
        ema_update(self.teacher, self.student, float(ctx.values["momentum"]))

    def state_dict(self) -> dict[str, Any]:
        return {"dino_config": self.cfg.to_dict()}

    def load_state_dict(self, d: dict[str, Any]) -> None:  # the config is rebuilt from the arguments
        return None


#: encoder arguments that add randomness to a forward pass in training mode; the teacher gets them at 0
STOCHASTIC_KWARGS = (
    "drop_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "drop_path_rate", "dropout",
)  # fmt: skip


def teacher_kwargs(encoder_kwargs: dict[str, Any]) -> dict[str, Any]:
    """The student's encoder arguments with dropout and stochastic depth off (the teacher's).

    The teacher runs in training mode (so that BatchNorm in its head uses batch statistics, as in
    DINO), so dropout in its backbone would be live; DINO's teacher has none.
    """
    return {k: (0.0 if k in STOCHASTIC_KWARGS else v) for k, v in encoder_kwargs.items()}


def build_dino(
    encoder: str,
    epochs: int,
    cfg: DINOConfig | None = None,
    weights: str | os.PathLike[str] | None = "random",
    encoder_kwargs: dict[str, Any] | None = None,
) -> DINOObjective:
    """Student, teacher and loss for ``encoder`` (a registry name), ready for the engine."""

    cfg = cfg or DINOConfig()
    kw = dict(encoder_kwargs or {})
    # the random-weights warning once per job (rank 0), and no notice for the teacher's initialisation:
    # DINOObjective replaces it with the student's weights
    backbone = _build_backbone(encoder, weights, cfg.drop_path_rate, kw, warn_random=dist_env().is_main)
    registry_log = logging.getLogger("gigaslide.models.encoders.registry")
    level = registry_log.level
    registry_log.setLevel(max(logging.WARNING, registry_log.getEffectiveLevel()))
    try:
        teacher_backbone = _build_backbone(encoder, "random", 0.0, teacher_kwargs(kw), warn_random=False)
    finally:
        registry_log.setLevel(level)
    dim = embed_dim_of(backbone)
    student = MultiCropWrapper(backbone, dino_head(dim, cfg))
    teacher = MultiCropWrapper(teacher_backbone, dino_head(dim, cfg))
    return DINOObjective(student, teacher, dino_loss(cfg, cfg.crops.n_crops, epochs), cfg)


def dino_head(dim: int, cfg: DINOConfig) -> DINOHead:
    """The projection head of ``cfg`` over ``dim``-d backbone outputs (student and teacher get one each)."""
    return DINOHead(dim, cfg.out_dim, use_bn=cfg.use_bn_in_head, norm_last_layer=cfg.norm_last_layer,
                    nlayers=cfg.head_nlayers, hidden_dim=cfg.head_hidden_dim,
                    bottleneck_dim=cfg.head_bottleneck_dim)  # fmt: skip


def dino_loss(cfg: DINOConfig, n_crops: int, epochs: int) -> DINOLoss:
    """DINOLoss of ``cfg`` for ``n_crops`` views, the teacher-temperature warm-up capped at the run."""
    warm_t = min(cfg.warmup_teacher_temp_epochs, epochs)
    if warm_t < cfg.warmup_teacher_temp_epochs:
        log.info("teacher temperature warm-up shortened to the run: %d epochs", warm_t)
    return DINOLoss(cfg.out_dim, n_crops, cfg.warmup_teacher_temp, cfg.teacher_temp, warm_t, epochs,
                    student_temp=cfg.student_temp, center_momentum=cfg.center_momentum)  # fmt: skip


def fit_dino(
    objective: DINOObjective,
    data: MultiCropData,
    cfg: DINOConfig,
    batch_size: int,
    epochs: int,
    out_dir: str | os.PathLike[str],
    device: torch.device,
    seed: int = 0,
    precision: str = "fp32",
    progress: bool = True,
) -> Path:
    """Train a DINO objective on the engine (SyncBatchNorm under torchrun on CUDA, DINO's optimiser for
    the global batch); returns ``out_dir/checkpoint.pth``."""
    world = dist_env().world_size
    objective.sync_batchnorm(device, world)
    out = Path(out_dir)
    engine = Engine(
        objective,
        optim=dino_optim(cfg, batch_size * world, epochs),
        cfg=EngineConfig(epochs=epochs, seed=seed, precision=precision, out_dir=out, progress=progress),
        device=device,
    )
    engine.fit(data)
    return out / "checkpoint.pth"


def dino_optim(cfg: DINOConfig, global_batch: int, epochs: int) -> OptimConfig:
    """AdamW with DINO's linear-scaled learning rate, warm-up, cosine decay and weight-decay schedule."""
    warmup = min(cfg.warmup_epochs, epochs)
    if warmup < cfg.warmup_epochs:
        log.info("learning-rate warm-up shortened to the run: %d epochs", warmup)
    return OptimConfig(
        name="adamw",
        lr=cfg.lr * global_batch / 256.0,
        min_lr=cfg.min_lr,
        lr_schedule="cosine",
        warmup_epochs=float(warmup),
        weight_decay=cfg.weight_decay,
        weight_decay_end=cfg.weight_decay_end,
        no_decay_norm_bias=True,
        grad_clip=None,  # DINO clips each parameter separately (after_backward)
    )


def run_dino(
    tiles: Dataset,
    encoder: str,
    out_dir: str | os.PathLike[str],
    *,
    epochs: int,
    batch_size: int,
    cfg: DINOConfig | None = None,
    weights: str | os.PathLike[str] | None = "random",
    encoder_kwargs: dict[str, Any] | None = None,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """DINO pretraining on any dataset of uint8 (3, S, S) tiles; returns ``out_dir/checkpoint.pth``.

    Reruns resume from ``out_dir/checkpoint.pth`` (the engine's exact resume).
    """
    from gigaslide.models.encoders import get_encoder_meta
    from gigaslide.utils.device import resolve_device
    from gigaslide.utils.seed import seed_everything

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    cfg = cfg or DINOConfig()
    meta = get_encoder_meta(encoder)
    if cfg.crops.mean == MultiCropConfig.mean and cfg.crops.std == MultiCropConfig.std:
        cfg = dataclasses.replace(
            cfg, crops=dataclasses.replace(cfg.crops, mean=tuple(meta.mean), std=tuple(meta.std))
        )
    env = dist_env()
    dev = resolve_device(device, env.local_rank if env.is_distributed else None)
    seed_everything(seed)
    objective = build_dino(encoder, epochs, cfg, weights=weights, encoder_kwargs=encoder_kwargs)
    data = MultiCropData(tiles, MultiCrop(cfg.crops), batch_size, seed=seed, num_workers=num_workers)
    return fit_dino(objective, data, cfg, batch_size, epochs, out_dir, dev, seed, precision, progress)


def pretrain_dino(
    tiling_dir: str | os.PathLike[str],
    encoder: str,
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 100,
    batch_size: int = 64,
    cfg: DINOConfig | None = None,
    weights: str | os.PathLike[str] | None = "random",
    encoder_kwargs: dict[str, Any] | None = None,
    slides: str | os.PathLike[str] | None = None,
    slide_mpp: float | None = None,
    max_tiles: int | None = None,
    num_workers: int = 2,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> Path:
    """DINO pretraining of ``encoder`` on the tiles of a tiling output; returns the checkpoint path.

    Tiles are read from the slides at the tiling's exact resolution; slides that cannot be read
    are skipped and listed in the log. ``weights`` initialises the student backbone (default: random).
    ``max_tiles`` pretrains on a fixed random subset (drawn with ``seed``) of that many tiles.
    """
    tiles = tiles_from_tiling(tiling_dir, slides=slides, slide_mpp=slide_mpp)
    log.info("DINO pretraining of %s on %s", encoder, describe_tiles(tiles, tiling_dir))
    dataset: Dataset = tiles.dataset
    n = len(dataset)  # type: ignore[arg-type]
    if max_tiles is not None and 0 < max_tiles < n:
        keep = np.sort(np.random.default_rng([int(seed), n]).choice(n, size=int(max_tiles), replace=False))
        dataset = Subset(dataset, keep.tolist())
        log.info("using a random subset of %d of the %d tiles (max_tiles)", max_tiles, n)
    return run_dino(dataset, encoder, out_dir, epochs=epochs, batch_size=batch_size, cfg=cfg,
                    weights=weights, encoder_kwargs=encoder_kwargs, num_workers=num_workers, device=device,
                    precision=precision, seed=seed, progress=progress)  # fmt: skip
