"""Feature-extraction throughput: end-to-end pipeline vs. the model alone, same machine, one run.

End-to-end = `run_embedding` on a synthetic slide, once per loader: ``threads`` (a TileLoader
thread pool reads + decodes uint8 tiles in the main process, normalisation on the device) and
``processes`` (DataLoader worker processes read, decode and normalise tiles); the encoder runs,
rows stream into the h5 file. ``--workers`` is the thread count for the first and the process
count for the second. Model-only = the same encoder on random tensors already on the device,
same batch size and precision. The feed ratio (end-to-end / model-only tiles/s) says how well
the data pipeline keeps the model busy (target >= 0.9 on a GPU).

    .venv/bin/python bench/embed.py --device cpu --workers 2 --batch-size 32
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gigaslide.io import open_slide
from gigaslide.models.encoders import create_encoder
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.pipeline.extract import encode_batch, prepare_encoder
from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.synth import write_synthetic_slide
from gigaslide.utils.device import resolve_device
from gigaslide.utils.machine import describe_machine
from gigaslide.utils.manifest import Manifest
from gigaslide.utils.seed import seed_everything


def make_tiling(root: Path, width: int, height: int, tile: int, mpp: float) -> int:
    """A tiling output over a synthetic slide: the full grid of ``tile`` px tiles at the slide's mpp."""
    path = write_synthetic_slide(root / "slides" / "bench.tiff", width=width, height=height, mpp=mpp)
    with open_slide(path) as s:
        spec = TileSpec.create(
            tile_size=tile,
            target_mpp=mpp,
            slide_mpp=s.require_mpp(),
            level_downsamples=s.level_downsamples,
            level0_dims=s.dimensions,
            min_tissue=0.0,
        )
    nx, ny = spec.grid_shape()
    coords = np.array(
        [
            (round(i * spec.level0_stride), round(j * spec.level0_stride))
            for j in range(ny)
            for i in range(nx)
        ],
        dtype=np.int64,
    )  # (N, 2)
    write_coords(root / "patches" / "bench.h5", coords, spec)
    Manifest(root / "manifest.csv").update(
        "bench",
        {"path": str(path), "status": "done", "n_tiles": len(coords), "coords_file": "patches/bench.h5"},
    )
    return len(coords)


def model_only(
    encoder: torch.nn.Module, args: argparse.Namespace, device: torch.device, n_batches: int
) -> float:
    """Tiles/s of the encoder alone on random input resident on the device."""
    size = encoder.meta.input_size
    x = torch.randn(args.batch_size, 3, size, size)
    if device.type == "cuda":
        x = x.pin_memory()
    channels_last = prepare_encoder(encoder, device)
    for _ in range(2):  # warm-up (cuDNN autotune, allocator)
        encode_batch(encoder, x, device, args.precision, channels_last)
    t0 = time.perf_counter()
    for _ in range(n_batches):
        encode_batch(encoder, x, device, args.precision, channels_last)  # includes the copy back to host
    return n_batches * args.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--encoders", nargs="+", default=["resnet18_trunc", "hipt_vit256"])
    p.add_argument("--device", default="auto")
    p.add_argument("--precision", default="fp32", choices=["fp32", "fp16", "bf16"])
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--width", type=int, default=4096, help="synthetic slide width (level-0 px)")
    p.add_argument("--height", type=int, default=2048)
    p.add_argument("--model-batches", type=int, default=8, help="batches timed for the model-only figure")
    p.add_argument("--loaders", nargs="+", choices=["threads", "processes"], default=["threads", "processes"])
    args = p.parse_args()
    device = resolve_device(args.device)
    print(f"machine: {describe_machine()}")
    print(f"device={device} precision={args.precision} batch={args.batch_size} workers={args.workers}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for name in args.encoders:
            seed_everything(0)
            enc = create_encoder(name, weights="random")
            size = enc.meta.input_size
            tiling = root / f"tiling_{size}"
            n = make_tiling(tiling, args.width, args.height, size, 0.5) if not tiling.exists() else None
            n = n or int(Manifest(tiling / "manifest.csv").rows["bench"]["n_tiles"])
            mo = model_only(enc, args, device, args.model_batches)
            for loader in args.loaders:
                t0 = time.perf_counter()
                s = run_embedding(
                    tiling, enc, root / f"out_{name}_{loader}", batch_size=args.batch_size,
                    num_workers=args.workers, loader=loader, precision=args.precision, device=device,
                    progress=False,
                )  # fmt: skip
                e2e = n / (time.perf_counter() - t0)
                assert s.n_done == 1, s.describe()
                rows.append((name, n, size, loader, e2e, mo, e2e / mo))
    print("\n| encoder | tiles | tile px | loader | end-to-end tiles/s | model-only tiles/s | feed ratio |")
    print("|---|---:|---:|---|---:|---:|---:|")
    for name, n, size, loader, e2e, mo, ratio in rows:
        print(f"| {name} | {n} | {size} | {loader} | {e2e:.1f} | {mo:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
