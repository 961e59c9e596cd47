"""HIPT stage 2: DINO pretraining of ViT_4096-256 on grids of frozen ViT_256 tokens (Chen et al., CVPR 2022).

The recipe of :mod:`gigaslide.ssl.dino` with the region transformer as backbone: the student is
``MultiCropWrapper(HIPTViT4K, DINOHead)`` fed 2 global 14x14 and ``n_local`` local 6x6 views of each
16x16x384 token grid (:mod:`gigaslide.ssl.region_crops`); the teacher, an EMA copy without stochastic
depth, sees the two global views. Defaults are those of HIPT's ``main_dino4k.py``: 65536 prototypes,
teacher temperature 0.04 without warm-up (``warmup_teacher_temp_epochs=0``, where stage 1 uses 30),
momentum 0.996 -> 1, AdamW at ``5e-4 * global batch / 256`` with a 10-epoch warm-up then cosine to 1e-6,
weight decay 0.04 -> 0.4, per-parameter clipping 3.0, last layer frozen for 1 epoch, stochastic depth
0.1, 8 local crops, batch 64, 100 epochs; plus the paper's dropout (p = 0.1) on every view, which the
official script leaves out.

:func:`pretrain_hipt_region` returns ``out_dir/checkpoint.pth`` in the layout of the public
``vit4k_xs_dino.pth`` (``teacher``/``student`` with ``backbone.*`` and ``head.*``, ``dino_loss``,
``optimizer``, ``epoch``): ``create_hipt_vit4k(weights=<it>)`` and ``gigaslide embed --regions
--vit4k-weights <it>`` load its teacher backbone strictly.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import torch

from gigaslide.ssl.crop_data import MultiCropData
from gigaslide.ssl.dino import DINOConfig, DINOObjective, dino_head, dino_loss, fit_dino, teacher_kwargs
from gigaslide.ssl.multicrop import MultiCropWrapper
from gigaslide.ssl.region_crops import RegionCropConfig, RegionCrops, RegionGrids

log = logging.getLogger(__name__)


def stage2_dino_config(**overrides: Any) -> DINOConfig:
    """DINO hyper-parameters of HIPT stage 2 (``main_dino4k.py`` defaults), with ``overrides``."""
    return dataclasses.replace(DINOConfig(warmup_teacher_temp_epochs=0), **overrides)


class HIPTRegionObjective(DINOObjective):
    """DINO over token-grid views; also records the view recipe and the backbone's arguments."""

    def __init__(self, *args: Any, crops: RegionCropConfig, vit4k_kwargs: dict[str, Any], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.crops, self.vit4k_kwargs = crops, dict(vit4k_kwargs)

    def state_dict(self) -> dict[str, Any]:
        d = super().state_dict()
        d["dino_config"].pop("crops", None)  # image crops do not apply; the region views follow
        return {**d, "region_crops": dataclasses.asdict(self.crops), "vit4k_kwargs": self.vit4k_kwargs}


def build_hipt_region(
    epochs: int,
    cfg: DINOConfig | None = None,
    crops: RegionCropConfig | None = None,
    weights: str | os.PathLike[str] | None = None,
    vit4k_kwargs: dict[str, Any] | None = None,
) -> HIPTRegionObjective:
    """Student, teacher (ViT_4096 + DINO head) and loss, ready for the engine.

    ``weights`` initialises the student backbone (a ``vit4k_xs_dino.pth``-layout file, loaded
    strictly); ``None`` starts from random weights (the normal case for pretraining).
    Dropout set in ``vit4k_kwargs`` (``drop_rate``, ``attn_drop_rate``) applies to the student only:
    the teacher runs in training mode (for BatchNorm in the head), and like DINO's teacher it has no
    dropout and no stochastic depth.
    """
    from gigaslide.models.encoders.hipt_vit4k import HIPTViT4K, create_hipt_vit4k

    cfg = cfg or stage2_dino_config()
    crops = crops or RegionCropConfig()
    kw = dict(vit4k_kwargs or {})
    if "drop_path_rate" in kw:
        raise ValueError(
            "set the student's stochastic depth with DINOConfig.drop_path_rate (--drop-path), "
            "not in vit4k_kwargs"
        )
    if weights is None:
        backbone = HIPTViT4K(drop_path_rate=cfg.drop_path_rate, **kw)
    else:
        backbone = create_hipt_vit4k(weights=weights, drop_path_rate=cfg.drop_path_rate, **kw)
    teacher_backbone = HIPTViT4K(**teacher_kwargs(kw))  # no dropout (all rates default to 0)
    student = MultiCropWrapper(backbone, dino_head(backbone.embed_dim, cfg))
    teacher = MultiCropWrapper(teacher_backbone, dino_head(backbone.embed_dim, cfg))
    loss = dino_loss(cfg, crops.n_crops, epochs)
    return HIPTRegionObjective(student, teacher, loss, cfg, crops=crops, vit4k_kwargs=kw)


def pretrain_hipt_region(
    region_features: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    epochs: int = 100,
    batch_size: int = 64,
    cfg: DINOConfig | None = None,
    crops: RegionCropConfig | None = None,
    weights: str | os.PathLike[str] | None = None,
    vit4k_kwargs: dict[str, Any] | None = None,
    num_workers: int = 0,
    device: str | torch.device = "auto",
    precision: str = "fp32",
    seed: int = 0,
    progress: bool = True,
) -> os.PathLike[str]:
    """Stage-2 DINO of ViT_4096 on the regions of ``region_features``; returns ``out_dir/checkpoint.pth``.

    ``region_features``: a ``gigaslide embed --regions`` output folder, a folder of region ``.h5``
    files or one file. Unreadable files are skipped and logged. Reruns resume from the checkpoint.
    ``vit4k_kwargs`` changes the architecture (e.g. ``depth=2`` for tests); the token width
    ``in_dim`` is taken from the files.
    """

    from gigaslide.pipeline.extract import resolve_device
    from gigaslide.utils.dist import dist_env
    from gigaslide.utils.seed import seed_everything

    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    grids = RegionGrids(region_features)
    crops = crops or RegionCropConfig()
    if crops.global_size > grids.grid_size:
        raise ValueError(
            f"{region_features}: regions are {grids.grid_size}x{grids.grid_size} tokens, smaller than the "
            f"{crops.global_size}x{crops.global_size} global crops; lower --global-size"
        )
    kw = {"in_dim": grids.in_dim, **dict(vit4k_kwargs or {})}
    log.info(
        "HIPT stage-2 DINO on %d regions (%dx%d x %d tokens) from %d file(s)%s",
        len(grids), grids.grid_size, grids.grid_size, grids.in_dim, len(grids.files) - len(grids.skipped),
        f", {len(grids.skipped)} skipped" if grids.skipped else "",
    )  # fmt: skip
    env = dist_env()
    dev = resolve_device(device, env.local_rank if env.is_distributed else None)
    seed_everything(seed)
    cfg = cfg or stage2_dino_config()
    objective = build_hipt_region(epochs, cfg, crops, weights=weights, vit4k_kwargs=kw)
    data = MultiCropData(grids, RegionCrops(crops), batch_size, seed=seed, num_workers=num_workers)  # type: ignore[arg-type]
    return fit_dino(objective, data, cfg, batch_size, epochs, out_dir, dev, seed, precision, progress)
