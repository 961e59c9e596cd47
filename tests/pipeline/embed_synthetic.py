"""Synthetic tiling folders and a tiny seeded tile encoder for the embedding-pipeline tests."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.manifest import Manifest
from gigaslide.utils.seed import seed_everything

TILE, TARGET_MPP = 32, 2.0  # 32 px tiles at 2 um/px: 128 level-0 px on a 0.5 um/px slide


def _grid(spec: TileSpec) -> np.ndarray:
    nx, ny = spec.grid_shape()
    return np.array(
        [
            (round(i * spec.level0_stride), round(j * spec.level0_stride))
            for j in range(ny)
            for i in range(nx)
        ],
        dtype=np.int64,
    )


def make_tiling_dir(root: Path, sizes: dict[str, tuple[int, int]], tile=TILE, seed=0) -> Path:
    """A `gigaslide tile`-style output: manifest.csv + patches/<id>.h5 over synthetic slides (full grid)."""
    from gigaslide.io import open_slide
    from gigaslide.synth import write_synthetic_slide

    manifest = Manifest(root / "manifest.csv")
    for i, (sid, (w, h)) in enumerate(sizes.items()):
        path = write_synthetic_slide(root / "slides" / f"{sid}.tiff", width=w, height=h, seed=seed + i)
        with open_slide(path) as s:
            spec = TileSpec.create(
                tile_size=tile, target_mpp=TARGET_MPP, slide_mpp=s.require_mpp(),
                level_downsamples=s.level_downsamples, level0_dims=s.dimensions, min_tissue=0.0,
            )  # fmt: skip
        coords = _grid(spec)
        write_coords(root / "patches" / f"{sid}.h5", coords, spec)
        manifest.update(sid, {"path": str(path), "mpp": 0.5, "status": "done", "n_tiles": len(coords),
                              "coords_file": f"patches/{sid}.h5"})  # fmt: skip
    return root


def tiny_encoder(seed: int = 0) -> torch.nn.Module:
    """resnet18_trunc (random, seeded) told to take 32 px input: fully convolutional, so valid and fast."""
    from gigaslide.models.encoders import create_encoder

    seed_everything(seed)
    enc = create_encoder("resnet18_trunc", weights="random")
    enc.meta = dataclasses.replace(enc.meta, input_size=TILE)
    return enc
