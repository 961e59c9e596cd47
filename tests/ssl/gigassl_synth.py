"""A tiny synthetic Giga-SSL bank for tests: slide identity and class signal under view-level nuisance."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from gigaslide.data.gigassl_bank import BankWriter
from gigaslide.preprocess.tiling_spec import TileSpec

SPEC = TileSpec.create(
    tile_size=256, target_mpp=1.0, slide_mpp=0.5, level_downsamples=[1.0, 4.0], level0_dims=(20000, 20000)
)
IDENTITY = {"crop_w": 1.0, "crop_h": 1.0, "crop_cx": 0.0, "crop_cy": 0.0, "flip_x": False, "flip_y": False,
            "rot90": 0, "jitter_on": False, "gray": False, "blur_on": False}  # fmt: skip


def write_synthetic_bank(
    root: Path, n_slides: int = 48, n_aug: int = 4, n_tiles: int = 24, dim: int = 32, seed: int = 0,
    signal: float = 0.6, nuisance: float = 3.0, tissue: float = 3.0, consistent: int = 8, identity: bool = True,
) -> tuple[Path, pd.DataFrame]:  # fmt: skip
    """Bank of ``n_slides`` slides (augmentation 0 is the identity) and their labels table.

    A tile is ``slide identity + class signal + tile noise + view shift``: the slide identity (N(0, 1)
    per dimension) and the class signal (``+-signal`` along a fixed direction) are shared by all tiles
    and views of a slide; each augmentation adds one large shift (``nuisance``, 0 for the identity) to
    all its tiles, as a shared colour augmentation would. Tiles lie on an 8 x 8 grid.
    """
    rng = np.random.default_rng(seed)
    direction = np.zeros(dim)
    direction[dim - consistent :] = rng.normal(size=consistent)
    direction /= np.linalg.norm(direction)
    labels = np.arange(n_slides) % 2
    grid = np.array([(i, j) for i in range(8) for j in range(8)])
    for s in range(n_slides):
        ident = np.zeros(dim)
        ident[dim - consistent :] = rng.normal(size=consistent)
        base = ident + (2 * labels[s] - 1) * signal * direction
        coords = np.stack(
            [np.rint(grid[rng.choice(64, n_tiles, replace=False)] * SPEC.level0_stride) for _ in range(n_aug)]
        ).astype(np.int64)
        shift = rng.normal(size=(n_aug, 1, dim)) * nuisance
        shift[..., dim - consistent :] = 0.0
        if identity:
            shift[0] = 0.0
        tile_noise = rng.normal(size=(n_aug, n_tiles, dim)) * 0.3
        tile_noise[..., : dim - consistent] *= tissue / 0.3  # tile heterogeneity (tissue types)
        feats = (base + tile_noise + shift).astype(np.float32)
        params = [IDENTITY] * identity + [{**IDENTITY, "jitter_on": True}] * (n_aug - identity)
        attrs = {"slide_id": f"s{s:03d}", "n_aug": n_aug, "n_tiles": n_tiles, "encoder": "synthetic",
                 "augmentations": json.dumps(params)}  # fmt: skip
        with BankWriter(root / "h5_files" / f"s{s:03d}.h5", coords, dim, "fp", features_attrs=attrs,
                        coords_attrs=SPEC.to_attrs()) as w:  # fmt: skip
            w.open()
            for a in range(n_aug):
                w.write(feats[a])
            w.finalize()
    df = pd.DataFrame({"slide_id": [f"s{s:03d}" for s in range(n_slides)],
                       "case_id": [f"c{s:03d}" for s in range(n_slides)], "label": labels})  # fmt: skip
    return root, df
