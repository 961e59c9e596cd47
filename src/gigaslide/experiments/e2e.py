"""`run_e2e`: end-to-end full-slide training from slides and a label CSV, in one call.

Output folder::

    tiles/               the tiling of the slides (when no tiling folder was given)
    checkpoint.pth       the engine's resumable checkpoint (encoder, aggregator, optimizer, RNG ...)
    steps.jsonl, epochs.csv   per-step and per-epoch logs (loss, validation AUC)
    encoder.pth          the trained tile encoder's weights: `gigaslide embed --encoder NAME --weights`
    aggregator.pt        the trained slide model, a training checkpoint `gigaslide heatmap --model` reads
    split.json           training and validation slides
    results.json         configuration, per-epoch history, best validation AUC, what the run rests on

Single process (``naive`` or ``cached``), or N + 1 processes under torchrun (``distributed``). A
rerun into the same folder resumes; a finished run is not retrained.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide import __version__
from gigaslide.data.cohort import _map_labels, read_label_table
from gigaslide.data.slide_tiles import SlideTileEpochs, SlideTiles, TileAugment
from gigaslide.data.split_plan import build_splits
from gigaslide.eval.metrics import UndefinedMetricError, classification_metrics
from gigaslide.models.encoders import create_encoder, get_encoder_meta
from gigaslide.models.slide import create_slide_model
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.train.e2e import MODES, E2EObjective, freeze_batchnorm
from gigaslide.train.engine import Engine, EngineConfig, OptimConfig, StepContext
from gigaslide.train.mil import save_checkpoint
from gigaslide.utils.atomic import atomic_path, atomic_write_text
from gigaslide.utils.dist import barrier, init_distributed
from gigaslide.utils.seed import seed_everything

log = logging.getLogger(__name__)


@dataclass
class E2EConfig:
    """Everything `gigaslide e2e` needs (defaults follow the paper where it says: AdamW, lr 5e-5)."""

    labels_csv: Path
    out_dir: Path
    slides: str | Path | None = None  # slide file/folder/CSV; tiled into out/tiles without ``tiles``
    tiles: Path | None = None  # a `gigaslide tile` output folder
    encoder: str = "resnet18_trunc"
    weights: str | None = None
    model: str = "gated_abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    tiles_per_slide: int = 64
    mode: str = "naive"
    chunk_size: int | None = 32  # tiles per encoder pass (cached mode, and encoder ranks if set)
    epochs: int = 10
    optimizer: str = "adamw"  # "adamw" (the paper's), "adam" or "sgd"
    lr: float = 5e-5
    weight_decay: float = 1e-2
    warmup_epochs: float = 0.0
    slide_fraction: float = 1.0  # slides per epoch (the paper samples 50%)
    val_fraction: float = 0.2
    seed: int = 0
    deterministic: bool = False
    precision: str = "fp32"
    device: str = "cpu"
    target_mpp: float | None = None  # default: the encoder's
    tile_size: int | None = None  # default: the encoder's input size
    input_size: int | None = None  # encoder input side; default: the encoder's
    min_tissue: float = 0.25
    freeze_bn: bool = False
    augment: bool = True
    classes: list[str] | None = None
    slide_mpp: float | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode must be one of {MODES}, got {self.mode!r}")
        if self.tiles_per_slide < 1 or self.epochs < 1:
            raise ValueError("--tiles-per-slide and --epochs must be >= 1")
        if self.mode == "cached" and not self.chunk_size:
            raise ValueError("--mode cached needs --chunk-size >= 1")
        if self.slides is None and self.tiles is None:
            raise ValueError("give the slides (--slides DIR_OR_CSV) or a tiling folder (--tiles DIR)")


@dataclass
class E2EResult:
    out_dir: Path
    history: list[dict[str, float]]
    best_val_auc: float | None
    n_train: int
    n_val: int
    random_init: bool


class _Validated(E2EObjective):
    """E2E training plus the validation AUC at the end of every epoch (on rank 0)."""

    def __init__(self, *args: Any, val: SlideTileEpochs | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.val = val

    def on_epoch_end(self, epoch: int, ctx: StepContext) -> dict[str, float]:
        if self.val is None or len(self.val) == 0:
            return {}
        probs, y = [], []
        for batch in self.val.batches(0):  # the same K tiles of each slide every epoch
            logits = self.predict(batch, ctx)
            if logits is not None:
                probs.append(torch.softmax(logits, dim=1)[0].cpu().numpy())
                y.append(int(batch.target))
        if ctx.rank != 0:
            return {}
        try:
            auc = float(classification_metrics(np.array(y), np.stack(probs), undefined="nan")["auc"])
        except (UndefinedMetricError, ValueError):
            auc = float("nan")
        return {"val_auc": auc}


def _slide_sources(cfg: E2EConfig, rank: int) -> tuple[list[SlideTiles], Path, list[str]]:
    from gigaslide.pipeline.embed_inputs import discover_jobs
    from gigaslide.pipeline.inputs import collect_slides
    from gigaslide.pipeline.tile_job import run_tiling

    tiles = cfg.tiles
    if tiles is None:
        tiles = cfg.out_dir / "tiles"
        if rank == 0:
            meta = get_encoder_meta(cfg.encoder)
            summary = run_tiling(
                collect_slides(cfg.slides, slide_mpp=cfg.slide_mpp), tiles,
                target_mpp=cfg.target_mpp or meta.mpp, tile_size=cfg.tile_size or meta.input_size,
                min_tissue=cfg.min_tissue, progress=False,
            )  # fmt: skip
            for sid, err in summary.failed.items():
                log.warning("slide %s not tiled, left out of training: %s", sid, err)
        barrier()
    jobs = discover_jobs(tiles, slides=cfg.slides if cfg.tiles is not None else None, slide_mpp=cfg.slide_mpp)
    table = read_label_table(cfg.labels_csv, "classification")
    targets, names = _map_labels(table["label"], table["slide_id"], cfg.classes, Path(cfg.labels_csv))
    if len(names) < 2:
        raise ValueError(
            f"{cfg.labels_csv}: only one class ({names[0]!r}); end-to-end training needs two or more"
        )
    label_of = dict(zip(table["slide_id"], targets))
    by_id = {j.slide_id: j for j in jobs}
    missing = sorted(set(label_of) - {j.slide_id for j in jobs if not j.error})
    if missing:
        reasons = {s: (by_id[s].error if s in by_id else "not in the tiling") for s in missing[:5]}
        raise ValueError(
            f"{cfg.labels_csv}: {len(missing)} labelled slide(s) have no usable tiles: {reasons}; "
            "tile them, or drop them from the CSV"
        )
    sources = []
    for sid in sorted(label_of):
        job = by_id[sid]
        cf = read_coords(job.coords_path, slide_mpp=job.mpp)
        sources.append(SlideTiles(sid, Path(job.slide_path), cf.coords, cf.spec, int(label_of[sid]), job.mpp))
    return sources, Path(tiles), names


def run_e2e(cfg: E2EConfig) -> E2EResult:
    """Train an encoder and an aggregator end to end (see the module docstring for the outputs)."""
    info = init_distributed()
    rank, world = info.rank, info.world_size
    if cfg.mode == "distributed" and world < 2:
        raise ValueError("--mode distributed runs under torchrun with N + 1 processes (rank 0 = aggregator)")
    if cfg.mode != "distributed" and world > 1:
        raise ValueError(f"--mode {cfg.mode} runs in one process; under torchrun use --mode distributed")
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", info.local_rank)
    seed_everything(cfg.seed)
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    sources, tiles_dir, names = _slide_sources(cfg, rank)
    table = read_label_table(cfg.labels_csv, "classification")
    table = table[table["slide_id"].isin([s.slide_id for s in sources])].reset_index(drop=True)
    train_ids, val_ids = [s.slide_id for s in sources], []
    if cfg.val_fraction > 0:
        split = build_splits(table, "classification", monte_carlo=1, test_fraction=cfg.val_fraction,
                             val_fraction=0.0, seed=cfg.seed)[0]  # fmt: skip
        train_ids, val_ids = sorted(split.train), sorted(split.test)
    torch.manual_seed(cfg.seed)
    encoder = create_encoder(cfg.encoder, weights=cfg.weights, warn_random=info.is_main)  # warned once
    meta = encoder.meta
    random_init = bool(encoder.weights_info.get("random_init"))
    encoder.train()
    if cfg.freeze_bn:
        freeze_batchnorm(encoder)
    n_classes = len(names)
    aggregator = create_slide_model(cfg.model, meta.embed_dim, n_classes, **cfg.model_kwargs)
    shares, share_index, read = 1, 0, True
    if cfg.mode == "distributed":
        shares, share_index, read = world - 1, max(rank - 1, 0), rank > 0
    common = dict(k=cfg.tiles_per_slide, input_size=cfg.input_size or meta.input_size, mean=meta.mean,
                  std=meta.std, seed=cfg.seed, shares=shares, share_index=share_index, read=read)  # fmt: skip
    pick = {s.slide_id: s for s in sources}
    train = SlideTileEpochs([pick[i] for i in train_ids], fraction=cfg.slide_fraction,
                            augment=TileAugment() if cfg.augment else None, **common)  # fmt: skip
    val = SlideTileEpochs([pick[i] for i in val_ids], shuffle=False, **common) if val_ids else None
    objective = _Validated(encoder, aggregator, mode=cfg.mode, chunk_size=cfg.chunk_size,
                           feature_dim=meta.embed_dim, val=val)  # fmt: skip
    optim = OptimConfig(
        name="adamw", lr=cfg.lr, weight_decay=cfg.weight_decay, warmup_epochs=cfg.warmup_epochs
    )
    engine = Engine(objective, optim, EngineConfig(epochs=cfg.epochs, seed=cfg.seed, precision=cfg.precision,
                                                   out_dir=out, description="e2e"), device)  # fmt: skip
    fit = engine.fit(train)
    objective.before_save(engine._ctx)
    aucs = [r["val_auc"] for r in fit.history if "val_auc" in r and np.isfinite(r["val_auc"])]
    result = E2EResult(
        out, fit.history, max(aucs) if aucs else None, len(train_ids), len(val_ids), random_init
    )
    if rank == 0:
        _write_outputs(cfg, out, encoder, aggregator, n_classes, names, result, train_ids, val_ids, tiles_dir)
    barrier()
    train.close()
    if val is not None:
        val.close()
    return result


def _write_outputs(
    cfg: E2EConfig,
    out: Path,
    encoder: torch.nn.Module,
    aggregator: torch.nn.Module,
    n_classes: int,
    names: list[str],
    result: E2EResult,
    train_ids: list[str],
    val_ids: list[str],
    tiles_dir: Path,
) -> None:
    with atomic_path(out / "encoder.pth") as tmp:
        torch.save({k: v.detach().cpu() for k, v in encoder.state_dict().items()}, tmp)
    save_checkpoint(
        out / "aggregator.pt",
        {k: v.detach().cpu() for k, v in aggregator.state_dict().items()},
        {"model": cfg.model, "model_kwargs": cfg.model_kwargs, "in_dim": encoder.meta.embed_dim,
         "n_outputs": n_classes, "task": "classification", "class_names": names, "encoder": cfg.encoder,
         "encoder_weights": str(out / "encoder.pth"), "gigaslide_version": __version__},
    )  # fmt: skip
    atomic_write_text(out / "split.json", json.dumps({"train": train_ids, "val": val_ids}, indent=1))
    doc = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()},
        "history": result.history,
        "best_val_auc": result.best_val_auc,
        "n_train": result.n_train,
        "n_val": result.n_val,
        "encoder_init": "random (no pretrained weights)"
        if result.random_init
        else str(cfg.weights or "registry"),
        "tiles": str(tiles_dir),
        "gigaslide_version": __version__,
    }
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1, default=float))
