"""DINO pretraining throughput: multi-crop views built vs. trained per second, side by side in one run.

For each configuration, on synthetic uint8 tiles (the slide reader is benchmarked by bench/tiles.py):

* ``crops/s``: multi-crop augmentation (``MultiCropData.make_batch``, one process) in tiles per second;
* ``train/s``: tiles per second through the DINO step on the engine (teacher forward on the 2 global
  crops, student forward + backward on all crops, per-parameter clipping, AdamW step, teacher EMA),
  fed precomputed batches, so the model alone is timed;
* ``end-to-end/s``: the same engine run fed by the augmentation in this process (``--workers 0``);
* the ratio crops/s : train/s, i.e. how many loader processes keep the model fed.

Configurations: ``tiny`` = vit_tiny_d4, 96/48 px crops, 2 local crops, 1024 prototypes (the demo);
``vits16`` = hipt_vit256 (ViT-S/16), 224/96 px crops, 8 local crops, 65536 prototypes (DINO / HIPT stage 1).

    .venv/bin/python bench/dino.py                       # both configs on CPU
    .venv/bin/python bench/dino.py --device cuda --precision bf16 --batch-size 64
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from typing import Any

import torch

from gigaslide.ssl.crop_data import MultiCropData
from gigaslide.ssl.dino import DINOConfig, build_dino, dino_optim
from gigaslide.ssl.multicrop import MultiCrop, MultiCropConfig
from gigaslide.train.engine import Engine, EngineConfig
from gigaslide.utils.machine import describe_machine

CONFIGS: dict[str, dict[str, Any]] = {
    "tiny": {
        "encoder": "vit_tiny_d4",
        "tile": 256,
        "cfg": DINOConfig(
            out_dim=1024,
            head_hidden_dim=512,
            head_bottleneck_dim=128,
            drop_path_rate=0.0,
            crops=MultiCropConfig(global_size=96, local_size=48, n_local=2),
        ),
    },
    "vits16": {
        "encoder": "hipt_vit256",
        "tile": 256,
        "cfg": DINOConfig(crops=MultiCropConfig(global_size=224, local_size=96, n_local=8)),
    },
}


class _Repeat:
    """EpochData yielding one precomputed batch ``n`` times (times the model alone)."""

    def __init__(self, batch: list[torch.Tensor], n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def batches(self, epoch: int, start: int = 0) -> Iterator[list[torch.Tensor]]:
        for _ in range(start, self.n):
            yield self.batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _fit_rate(
    name: str, spec: dict[str, Any], data: Any, args: argparse.Namespace, device: torch.device
) -> float:
    """Tiles/s of an engine run over ``data`` (the first step, a warm-up, excluded)."""
    cfg: DINOConfig = spec["cfg"]
    objective = build_dino(spec["encoder"], 1, cfg)
    steps: list[float] = []
    orig = objective.after_step

    def timed_after_step(ctx: Any) -> None:
        orig(ctx)
        _sync(device)
        steps.append(time.perf_counter())

    objective.after_step = timed_after_step  # type: ignore[method-assign]
    engine = Engine(objective, dino_optim(cfg, args.batch_size, 1),
                    EngineConfig(epochs=1, out_dir=None, progress=False, precision=args.precision), device)  # fmt: skip
    engine.fit(data)
    n = len(steps) - 1
    return n * args.batch_size / (steps[-1] - steps[0])


def bench(name: str, args: argparse.Namespace, device: torch.device) -> dict[str, float]:
    spec = CONFIGS[name]
    cfg: DINOConfig = spec["cfg"]
    g = torch.Generator().manual_seed(0)
    n_tiles = args.batch_size * (args.steps + 1)
    tiles = [
        torch.randint(0, 256, (3, spec["tile"], spec["tile"]), dtype=torch.uint8, generator=g)
        for _ in range(n_tiles)
    ]
    data = MultiCropData(tiles, MultiCrop(cfg.crops), args.batch_size, seed=0)
    t0 = time.perf_counter()
    batch = data.make_batch(0, 0)
    for b in range(1, len(data)):
        data.make_batch(0, b)
    crops_rate = n_tiles / (time.perf_counter() - t0)
    train_rate = _fit_rate(name, spec, _Repeat(batch, args.steps + 1), args, device)
    e2e_rate = _fit_rate(name, spec, data, args, device)
    return {"crops": crops_rate, "train": train_rate, "e2e": e2e_rate}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default="tiny,vits16")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=4, help="timed optimizer steps (after 1 warm-up step)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"machine: {describe_machine()}; torch threads {torch.get_num_threads()}; device {device}, {args.precision}"
    )
    print(f"batch {args.batch_size} tiles, {args.steps} timed steps; load average {os.getloadavg()[0]:.1f}")
    print("| config | crops/s (1 process) | train/s (model only) | end-to-end/s | crops : train |")
    print("|---|---|---|---|---|")
    for name in args.configs.split(","):
        r = bench(name, args, device)
        print(f"| {name} | {r['crops']:.1f} | {r['train']:.2f} | {r['e2e']:.2f} | {r['crops'] / r['train']:.1f} |",
              flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
