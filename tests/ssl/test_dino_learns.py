"""Pretraining visibly works: a short DINO run of a tiny ViT beats the same network at random init
on KNN tile-class accuracy.

Measured here (2026-11-30, CPU, one thread; cosine 5-NN of the teacher's CLS on 200 held-out tiles,
trained on the 512 pretraining tiles; 8 epochs of 32 steps of 16; seeds of weights and crops):

| seed | random init | after DINO | gain | loss, first -> last epoch |
|---|---|---|---|---|
| 0 | 0.670 | 0.805 | +0.135 | 5.73 -> 3.04 |
| 1 | 0.690 | 0.860 | +0.170 | 5.77 -> 3.76 |
| 2 | 0.695 | 0.850 | +0.155 | 5.71 -> 3.73 |

The test asserts at seed 0 a gain >= +0.065 (about half the smallest, +0.135) and a last-epoch loss
below ln(256) - 1; seeds 1 and 2 run under ``-m slow``. About 15-20 s per run on an idle core.
The earlier setting (lr 0.005, 2 local crops of scale 0.05-0.4, DINO's colour jitter, grayscale and
solarization) gained +0.045, -0.020, +0.020 at seeds 0-2 and ended at the uniform loss (5.5 = ln 256).
Path from it (seed 0), one change at a time: no colour transforms +0.095 (the classes share their
colours, so colour views only add noise), then 4 local crops +0.110, local scale 0.1-0.4 +0.120,
lr 0.007 +0.135 (the setting below). Tried on the way (seed 0), none better: from the earlier
setting, lr 0.001 +0.050, 0.03 +0.005 (-0.025 with 8 local crops), 8 local crops +0.015, teacher
momentum 0.9 +0.065, teacher temperature 0.07 +0.030, batch 8 +0.025, out_dim 64 +0.040, last layer
never frozen +0.055; without colour transforms, lr 0.002 +0.090, momentum 0.9 +0.090; with 4 local
crops of scale 0.1-0.4 at lr 0.005, 6 local crops +0.105, lr 0.003 +0.060, last layer never frozen
+0.110, global scale 0.25-1 +0.110, momentum 0.9 (scale 0.05-0.4) +0.090.

Synthetic 48 px tiles of 4 classes: two shapes (disc, ring, cross or square outline) of one class
drawn at random positions. The class is what every crop of a tile shares; the positions change
between tiles and between crops. A random network's features follow where things are, so its
nearest neighbours mix classes; DINO's crops teach the network to ignore positions.
(Explored on the way: textures with random colour/brightness per tile, where DINO learns the per-tile
colour instead, since every crop of a tile shares it; and longer runs of the official defaults,
which do not leave the teacher's random init within a few hundred steps: the settings below lower
the teacher momentum to 0.95 and add BatchNorm to the head, both documented DINO options.)
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.encoders import create_encoder
from gigaslide.ssl.dino import DINOConfig, build_dino, run_dino
from gigaslide.ssl.multicrop import MultiCropConfig
from gigaslide.utils.seed import seed_everything

torch.set_num_threads(1)

ENCODER_KW = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "depth": 2, "num_heads": 2}
CFG = DINOConfig(
    out_dim=256, head_hidden_dim=128, head_bottleneck_dim=32, use_bn_in_head=True, norm_last_layer=False,
    momentum_teacher=0.95, drop_path_rate=0.0, lr=0.007, warmup_epochs=1,
    crops=MultiCropConfig(global_size=32, local_size=16, n_local=4, local_scale=(0.1, 0.4), jitter_p=0.0,
                          grayscale_p=0.0, solarize_p=0.0, mean=(0.5,) * 3, std=(0.5,) * 3),
)  # fmt: skip


def shape_tiles(
    n: int, seed: int, size: int = 48, radius: float = 8.0
) -> tuple[list[torch.Tensor], np.ndarray]:
    """``n`` uint8 (3, size, size) tiles, class ``i % 4``: two shapes of the class at random positions."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    fg, bg = np.array([150.0, 60, 160]), np.array([235.0, 180, 215])
    tiles, labels = [], []
    for i in range(n):
        c = i % 4
        mask = np.zeros((size, size), dtype=bool)
        for _ in range(2):
            cy, cx = rng.uniform(radius + 1, size - radius - 1, 2)
            dy, dx = np.abs(yy - cy), np.abs(xx - cx)
            d = np.sqrt(dy**2 + dx**2)
            mask |= [
                d < radius,  # disc
                (d < radius) & (d > radius - 2),  # ring
                ((dy < radius) & (dx < 1.5)) | ((dx < radius) & (dy < 1.5)),  # cross
                (dy < radius) & (dx < radius) & ~((dy < radius - 2) & (dx < radius - 2)),  # square outline
            ][c]
        m = mask.astype(np.float32)[..., None]
        img = m * fg + (1 - m) * bg + rng.normal(0, 10, (size, size, 3))
        tiles.append(torch.from_numpy(np.clip(img, 0, 255).astype(np.uint8)).permute(2, 0, 1).contiguous())
        labels.append(c)
    return tiles, np.array(labels)


def embed(backbone: torch.nn.Module, tiles: list[torch.Tensor], size: int) -> np.ndarray:
    """(N, D) L2-normalised CLS embeddings of whole tiles resized to ``size`` (mean = std = 0.5)."""
    x = torch.stack(tiles).float() / 255.0
    x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    backbone.eval()
    with torch.no_grad():
        return F.normalize(backbone((x - 0.5) / 0.5), dim=1).numpy()


def knn_accuracy(
    train: np.ndarray, y_train: np.ndarray, test: np.ndarray, y_test: np.ndarray, k: int = 5
) -> float:
    """Cosine k-NN (majority vote) accuracy."""
    nearest = np.argsort(-(test @ train.T), axis=1)[:, :k]
    pred = np.array([np.bincount(y_train[row], minlength=4).argmax() for row in nearest])
    return float((pred == y_test).mean())


def random_vs_dino(
    tmp_path: Path, n_train: int, epochs: int, batch_size: int = 16, seed: int = 0
) -> tuple[float, float, list[float]]:
    """KNN accuracy of the tiny ViT at random init and after DINO (its teacher, loaded from the
    checkpoint), and the per-epoch losses."""
    train, y_train = shape_tiles(n_train, seed=0)
    test, y_test = shape_tiles(200, seed=1)
    size = CFG.crops.global_size
    seed_everything(seed)  # run_dino seeds the same way before building: the same initial weights
    init = build_dino("hipt_vit256", epochs, CFG, encoder_kwargs=ENCODER_KW).teacher.backbone
    acc_init = knn_accuracy(embed(init, train, size), y_train, embed(init, test, size), y_test)
    ckpt = run_dino(train, "hipt_vit256", tmp_path / "dino", epochs=epochs, batch_size=batch_size, cfg=CFG,
                    encoder_kwargs=ENCODER_KW, device="cpu", seed=seed, progress=False)  # fmt: skip
    teacher = create_encoder("hipt_vit256", weights=ckpt, **ENCODER_KW)
    acc_dino = knn_accuracy(embed(teacher, train, size), y_train, embed(teacher, test, size), y_test)
    with open(tmp_path / "dino" / "epochs.csv", newline="") as f:
        losses = [float(row["loss"]) for row in csv.DictReader(f)]
    return acc_init, acc_dino, losses


def test_dino_pretraining_beats_random_init(tmp_path: Path) -> None:
    acc_init, acc_dino, losses = random_vs_dino(tmp_path, n_train=512, epochs=8)
    assert 0.25 <= acc_init < 0.9, acc_init  # the task is neither trivial nor broken at random init
    assert acc_dino >= acc_init + 0.065, (acc_init, acc_dino)
    assert len(losses) == 8 and losses[-1] < math.log(CFG.out_dim) - 1.0, losses  # not uniform outputs (ln K)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_dino_pretraining_beats_random_init_other_seeds(tmp_path: Path, seed: int) -> None:
    acc_init, acc_dino, losses = random_vs_dino(tmp_path, n_train=512, epochs=8, seed=seed)
    assert acc_dino >= acc_init + 0.065, (acc_init, acc_dino)
    assert losses[-1] < math.log(CFG.out_dim) - 1.0, losses
