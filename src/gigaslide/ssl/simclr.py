"""The Giga-SSL SimCLR recipe on the training engine: contrastive pretraining of a slide aggregator.

Lazard et al., CVPR Workshops 2023, section 3: two views of every slide of a minibatch of B slides
(each view: one of the bank's tile augmentations, T random tiles of it, a slide-level augmentation
of their sparse map; :class:`~gigaslide.data.gigassl_views.GigaSSLViews`) go through the aggregator
(``sparseconvmil`` by default, embedding only: ``n_classes=0``) and a projector MLP; NT-Xent with
temperature compares the 2B projections (negatives gathered across ranks under ``torchrun``).
Only the aggregator and projector learn: the tile embeddings are the frozen bank.

Defaults follow the official configuration (``simclr_mil_scm.yaml``): T = 5, temperature 0.05,
B = 256 slides, Adam with weight decay 5e-4 (L2, on every parameter), learning rate 0.03 per 256
slides of global batch, 10 linear warm-up epochs then cosine to 0; projector 512 -> 512 -> 512 -> 256
(Linear, ReLU, BatchNorm twice, then Linear), as the official ``projection_MLP``; 1000 epochs (paper).
Both views go through the model in one call (the official code makes two calls; with one call the
batch-norm statistics are those of all 2B views, and DDP sees one forward per step).

:func:`pretrain_gigassl` returns ``out_dir/checkpoint.pth`` whose ``model`` entry holds
``aggregator.*`` and ``projector.*`` and whose ``engine.objective.gigassl`` entry records how to
rebuild the model (:func:`load_gigassl_model`).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from gigaslide.data.gigassl_views import GigaSSLViews, ViewBatch
from gigaslide.data.slide_augment import SlideAugment
from gigaslide.ssl.ntxent import NTXentLoss
from gigaslide.train.engine import Engine, EngineConfig, Objective, OptimConfig, StepContext, StepOutput

log = logging.getLogger(__name__)

#: aggregators of the paper (sparseconvmil) and of its ablations (mean pooling, attention MIL)
AGGREGATORS = ("sparseconvmil", "mean", "abmil")


@dataclass
class GigaSSLConfig:
    """Giga-SSL SimCLR hyper-parameters (defaults: the official configuration, see the module docstring)."""

    aggregator: str = "sparseconvmil"
    aggregator_kwargs: dict[str, Any] = field(default_factory=dict)
    proj_dim: int = 256
    temperature: float = 0.05
    n_tiles: int = 5
    lr: float = 0.03  # per 256 slides of global batch
    min_lr: float = 0.0
    warmup_epochs: int = 10
    weight_decay: float = 5e-4
    slide_augment: bool = True
    grid_unit: float | None = None  # None: one tile per map cell

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (stored in checkpoints)."""
        return dataclasses.asdict(self)


class ProjectionMLP(nn.Module):
    """SimCLR projector of Giga-SSL: (Linear -> ReLU -> BatchNorm1d) x 2 -> Linear; (B, E) -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int = 256, hidden_dim: int | None = None) -> None:
        super().__init__()
        hidden = int(hidden_dim or in_dim)
        self.layer1 = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden))
        self.layer2 = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(inplace=True), nn.BatchNorm1d(hidden))
        self.layer3 = nn.Linear(hidden, out_dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer3(self.layer2(self.layer1(x)))


class GigaSSLModel(nn.Module):
    """Aggregator (a registry slide model with ``n_classes=0``) followed by the projector.

    ``embed(features (B, T, D), cells (B, T, 2))`` -> (B, E) slide embeddings (what encoding keeps);
    ``forward`` -> (B, proj_dim) projections (what the loss sees).
    """

    def __init__(self, aggregator: nn.Module, projector: nn.Module, uses_coords: bool, in_dim: int) -> None:
        super().__init__()
        self.in_dim = int(in_dim)
        self.aggregator = aggregator
        self.projector = projector
        self.uses_coords = bool(uses_coords)

    def embed(self, features: Tensor, cells: Tensor) -> Tensor:
        coords = cells.to(features.dtype) if self.uses_coords else None
        return self.aggregator(features, coords=coords).embedding

    def forward(self, features: Tensor, cells: Tensor) -> Tensor:
        return self.projector(self.embed(features, cells))


def build_gigassl_model(in_dim: int, cfg: GigaSSLConfig) -> GigaSSLModel:
    """The aggregator named in ``cfg`` (``n_classes=0``) and its projector, for ``in_dim``-d tile features."""
    from gigaslide.models.slide import create_slide_model, get_slide_model_info

    try:
        info = get_slide_model_info(cfg.aggregator)
    except KeyError as e:
        raise ValueError(f"unknown aggregator {cfg.aggregator!r}; see `gigaslide models` ({e})") from e
    kwargs = dict(cfg.aggregator_kwargs)
    if info.accepts_coords and cfg.aggregator == "sparseconvmil":
        kwargs.setdefault("grid_unit", 1.0)  # the views give map cells
    aggregator = create_slide_model(cfg.aggregator, in_dim, 0, **kwargs)
    embed_dim = getattr(aggregator, "embed_dim", None)
    if embed_dim is None:
        raise ValueError(f"aggregator {cfg.aggregator!r} does not declare its embedding width (embed_dim)")
    return GigaSSLModel(aggregator, ProjectionMLP(int(embed_dim), cfg.proj_dim), info.accepts_coords, in_dim)


class SimCLRObjective(Objective):
    """Giga-SSL SimCLR as an engine objective: one module ``model`` (aggregator + projector)."""

    def __init__(self, model: GigaSSLModel, cfg: GigaSSLConfig, in_dim: int) -> None:
        self.model, self.cfg, self.in_dim = model, cfg, int(in_dim)
        self.loss = NTXentLoss(cfg.temperature)

    def modules(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def trainable(self) -> dict[str, nn.Module]:
        return {"model": self.model}

    def train_step(self, batch: ViewBatch, ctx: StepContext) -> StepOutput:
        """``batch``: two views (2, B, T, D) of B slides; loss = NT-Xent of their projections."""
        v, b, t, d = batch.features.shape
        if v != 2:
            raise ValueError(f"SimCLR needs 2 views per slide, got {v}")
        feats = batch.features.to(ctx.device, non_blocking=True).reshape(v * b, t, d)  # (2B, T, D)
        cells = batch.cells.to(ctx.device, non_blocking=True).reshape(v * b, t, 2)  # (2B, T, 2)
        with ctx.autocast():
            z = ctx.models["model"](feats, cells)  # (2B, P)
        z = z.float()
        loss = self.loss(z[:b], z[b:])
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"NT-Xent loss is {float(loss)} at step {ctx.step}: lower the learning rate or use fp32"
            )
        with torch.no_grad():  # collapse monitor of the official code: std of the normalised outputs
            std = nn.functional.normalize(z[:b].detach(), dim=1).std(dim=0).mean()
        return StepOutput(loss=loss, logs={"output_std": float(std)})

    def state_dict(self) -> dict[str, Any]:
        return {"gigassl": {**self.cfg.to_dict(), "in_dim": self.in_dim}}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # the config is rebuilt from the arguments
        return None


def gigassl_optim(cfg: GigaSSLConfig, global_batch: int, epochs: int) -> OptimConfig:
    """Adam with L2 weight decay on every parameter, the lr scaled by global batch / 256, warm-up + cosine."""
    warmup = min(cfg.warmup_epochs, epochs)
    if warmup < cfg.warmup_epochs:
        log.info("learning-rate warm-up shortened to the run: %d epochs", warmup)
    return OptimConfig(name="adam", lr=cfg.lr * global_batch / 256.0, min_lr=cfg.min_lr, lr_schedule="cosine",
                       warmup_epochs=float(warmup), weight_decay=cfg.weight_decay,
                       no_decay_norm_bias=False)  # fmt: skip


def pretrain_gigassl(
    bank_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 1000,
    batch_size: int = 256,
    cfg: GigaSSLConfig | None = None,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
    checkpoint_every: int = 0,
    progress: bool = True,
) -> Path:
    """SimCLR pretraining of the Giga-SSL aggregator on a bank; returns ``out_dir/checkpoint.pth``.

    ``batch_size`` is B slides per process; under ``torchrun`` each rank takes its B slides of every
    global minibatch and NT-Xent sees the 2 x B x world projections as candidates. Reruns resume
    exactly from ``out_dir/checkpoint.pth``.
    """
    from gigaslide.utils.device import resolve_device
    from gigaslide.utils.dist import dist_env
    from gigaslide.utils.seed import seed_everything

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    cfg = cfg or GigaSSLConfig()
    env = dist_env()
    dev = resolve_device(device, env.local_rank if env.is_distributed else None)
    seed_everything(seed)
    data = GigaSSLViews(bank_dir, batch_size=batch_size, n_tiles=cfg.n_tiles, n_views=2, seed=seed,
                        slide_augment=SlideAugment() if cfg.slide_augment else None, grid_unit=cfg.grid_unit,
                        rank=env.rank, world_size=env.world_size)  # fmt: skip
    if batch_size * env.world_size < 2:
        raise ValueError(
            "SimCLR needs at least 2 slides per global minibatch (a negative): raise --batch-size"
        )
    torch.manual_seed(seed)
    model = build_gigassl_model(data.bank.dim, cfg)
    objective = SimCLRObjective(model, cfg, data.bank.dim)
    log.info("Giga-SSL pretraining of %s on %d slides (%d steps per epoch)", cfg.aggregator, len(data.bank),
             len(data))  # fmt: skip
    out = Path(out_dir)
    engine = Engine(
        objective,
        optim=gigassl_optim(cfg, batch_size * env.world_size, epochs),
        cfg=EngineConfig(
            epochs=epochs,
            seed=seed,
            precision=precision,
            out_dir=out,
            checkpoint_every=checkpoint_every,
            progress=progress,
        ),
        device=dev,
    )
    engine.fit(data)
    return out / "checkpoint.pth"


def load_gigassl_model(checkpoint: str | os.PathLike[str]) -> tuple[GigaSSLModel, GigaSSLConfig]:
    """Rebuild the model of a ``pretrain_gigassl`` checkpoint and load its weights strictly (eval mode)."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} not found (the checkpoint.pth of `gigaslide pretrain gigassl`)"
        )
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    meta = ckpt.get("engine", {}).get("objective", {}).get("gigassl") if isinstance(ckpt, dict) else None
    if meta is None or "model" not in ckpt:
        raise ValueError(
            f"{path}: not a Giga-SSL checkpoint (no 'model' weights and 'engine.objective.gigassl' config); "
            "make one with `gigaslide pretrain gigassl`"
        )
    meta = dict(meta)
    in_dim = int(meta.pop("in_dim"))
    names = {f.name for f in dataclasses.fields(GigaSSLConfig)}
    cfg = GigaSSLConfig(**{k: v for k, v in meta.items() if k in names})
    model = build_gigassl_model(in_dim, cfg)
    model.load_state_dict(ckpt["model"], strict=True)
    return model.eval(), cfg


def save_untrained_checkpoint(
    in_dim: int, out: str | os.PathLike[str], cfg: GigaSSLConfig | None = None, seed: int = 0
) -> Path:
    """A checkpoint of the randomly initialised model (``seed``), in the layout of :func:`pretrain_gigassl`.

    The untrained-aggregator baseline of the evaluation: encode with it exactly as with a trained one.
    """
    from gigaslide.utils.atomic import atomic_path

    cfg = cfg or GigaSSLConfig()
    torch.manual_seed(seed)
    model = build_gigassl_model(in_dim, cfg)
    payload = {"model": model.state_dict(), "engine": {"objective": {"gigassl": {**cfg.to_dict(), "in_dim": in_dim}}},
               "untrained": True}  # fmt: skip
    path = Path(out)
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return path


def untrained_checkpoint_like(
    checkpoint: str | os.PathLike[str], out: str | os.PathLike[str], seed: int = 0
) -> Path:
    """The untrained counterpart (same aggregator, config and input width) of a Giga-SSL checkpoint."""
    model, cfg = load_gigassl_model(checkpoint)
    return save_untrained_checkpoint(model.in_dim, out, cfg, seed)
