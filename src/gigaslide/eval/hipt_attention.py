"""HIPT attention maps: ViT_256 on a patch, ViT_4096 on a region, and the hierarchical factorised map.

What is drawn (HIPT paper, supplement figures): the attention of the last block's CLS token over
the tokens of each level, per head.

* patch level: ViT_256's CLS attention over the 16x16 tokens of each 256 px patch (one token = 16 px);
* region level: ViT_4096's CLS attention over the 16x16 patches of a 4096 px region (one token = 256 px);
* factorised: the product of both, at the patch-token resolution (a 256x256 map over a 4096
  region): a pixel is hot when its patch matters to the region and the pixel matters to its patch.

Each map is converted to percentiles (rank / n, as in CLAM/HIPT heatmaps) before multiplying and
drawing, so maps of different heads and levels share one scale. Padded patches (outside the
slide) get 0. The slide-level map (HIPT's attention over regions) is drawn by
:func:`gigaslide.eval.heatmap.render_heatmap` with the regions' coordinates and level-0 size.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn

from gigaslide.eval.heatmap import percentile_scores
from gigaslide.models.encoders.hipt_region import forward_with_cls_attention, unique_patches, unroll_region
from gigaslide.models.encoders.hipt_vit4k import HIPTViT4K
from gigaslide.utils.atomic import atomic_path


@dataclass
class HierarchicalAttention:
    """CLS attention of both levels over one region of rows x cols patches."""

    patch: np.ndarray  # (rows * cols, heads256, 16, 16) ViT_256 CLS attention inside each patch
    region: np.ndarray | None  # (heads4k, rows, cols) ViT_4096 CLS attention over patches
    grid: tuple[int, int]  # (rows, cols)
    patch_mask: np.ndarray  # (rows, cols) bool, True = real patch


def percentile_map(a: np.ndarray, valid: np.ndarray | None = None) -> np.ndarray:
    """Scores -> percentiles in (0, 1] over ``valid`` entries (others 0); same shape as ``a``."""
    out = np.zeros(a.shape, dtype=np.float64)
    keep = np.ones(a.shape, dtype=bool) if valid is None else np.broadcast_to(valid, a.shape)
    if keep.any():
        out[keep] = percentile_scores(a[keep])
    return out


@torch.no_grad()
def hierarchical_attention(
    vit256: nn.Module,
    vit4k: HIPTViT4K | None,
    image: Tensor,
    patch_mask: Tensor | None = None,
    batch_size: int = 64,
) -> HierarchicalAttention:
    """Attention of both levels over one normalised region image (3, S, S), S a multiple of 256.

    ``patch_mask`` (rows, cols) bool marks real patches (False: background padding outside the
    slide); ViT_4096 ignores the others. ``vit4k=None`` gives the patch level only. Identical patches
    (the uniform padding) go through ViT_256 once; their maps and tokens are copies.
    """
    patches, (rows, cols) = unroll_region(image)  # (T, 3, 256, 256)
    distinct, inverse = unique_patches(patches)  # the white padding beyond the slide: one patch
    tokens, maps = [], []
    for i in range(0, len(distinct), batch_size):
        cls, attn = forward_with_cls_attention(vit256, distinct[i : i + batch_size])  # (b, D), (b, h, N)
        side = math.isqrt(attn.shape[-1])
        tokens.append(cls)
        maps.append(attn.reshape(attn.shape[0], attn.shape[1], side, side).float().cpu())
    if inverse is not None:  # back to every patch: (T, D), (T, h, side, side)
        tokens, maps = [torch.cat(tokens)[inverse]], [torch.cat(maps)[inverse.cpu()]]
    mask = (
        torch.ones(rows, cols, dtype=torch.bool)
        if patch_mask is None
        else patch_mask.reshape(rows, cols).bool()
    )
    region = None
    if vit4k is not None:
        grid = torch.cat(tokens).float().transpose(0, 1).reshape(1, -1, rows, cols)  # (1, 384, rows, cols)
        _, a4k = forward_with_cls_attention(
            vit4k, grid, mask.unsqueeze(0).to(grid.device)
        )  # (1, h, rows*cols)
        region = a4k[0].reshape(-1, rows, cols).float().cpu().numpy()
    return HierarchicalAttention(torch.cat(maps).numpy(), region, (rows, cols), mask.cpu().numpy())


def patch_level_map(att: HierarchicalAttention, head: int | None = None) -> np.ndarray:
    """ViT_256 map over the whole region, (rows * 16, cols * 16) percentiles within each patch."""
    rows, cols = att.grid
    a = att.patch.mean(axis=1) if head is None else att.patch[:, head]  # (T, 16, 16)
    side = a.shape[-1]
    pct = np.stack([percentile_map(p) for p in a])  # per-patch percentiles, (T, s, s)
    pct[~att.patch_mask.reshape(-1)] = 0.0
    return pct.reshape(rows, cols, side, side).transpose(0, 2, 1, 3).reshape(rows * side, cols * side)


def region_level_map(att: HierarchicalAttention, head: int | None = None) -> np.ndarray:
    """ViT_4096 map (rows, cols) in percentiles over the real patches."""
    if att.region is None:
        raise ValueError("no ViT_4096 attention: compute hierarchical_attention with a vit4k")
    a = att.region.mean(axis=0) if head is None else att.region[head]
    return percentile_map(a, att.patch_mask)


def factorised_map(
    att: HierarchicalAttention, head256: int | None = None, head4k: int | None = None
) -> np.ndarray:
    """Region-level x patch-level map, (rows * 16, cols * 16), values in [0, 1]."""
    fine = patch_level_map(att, head256)
    coarse = region_level_map(att, head4k)
    k = fine.shape[0] // att.grid[0]
    return fine * np.kron(coarse, np.ones((k, k)))


def overlay(image: np.ndarray, score: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """Blend a [0, 1] score map (h, w) over an (H, W, 3) uint8 image (nearest upsampling) -> uint8."""
    import matplotlib

    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) RGB image, got shape {image.shape}")
    h, w = image.shape[:2]
    ys = (np.arange(h) * score.shape[0]) // h
    xs = (np.arange(w) * score.shape[1]) // w
    big = score[ys[:, None], xs[None, :]]
    colours = matplotlib.colormaps[cmap](big)[..., :3] * 255.0
    out = (1.0 - alpha) * image.astype(np.float64) + alpha * colours
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def save_png(array: np.ndarray, path: str | os.PathLike[str]) -> Path:
    """Write an (H, W, 3) uint8 array as a PNG, atomically."""
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return Path(path)


def write_attention_pngs(
    image: np.ndarray,
    att: HierarchicalAttention,
    out_dir: str | os.PathLike[str],
    prefix: str,
    alpha: float = 0.5,
) -> list[Path]:
    """PNGs over ``image`` (the region, uint8 (H, W, 3)): one per ViT_256 head, per ViT_4096 head, factorised.

    Files: ``<prefix>_vit256_head<i>.png``, ``<prefix>_vit4k_head<j>.png`` and ``<prefix>_factorised.png``
    (heads averaged), written atomically into ``out_dir`` (created).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [
        save_png(overlay(image, patch_level_map(att, i), alpha), out / f"{prefix}_vit256_head{i}.png")
        for i in range(att.patch.shape[1])
    ]
    if att.region is not None:
        paths += [
            save_png(overlay(image, region_level_map(att, j), alpha), out / f"{prefix}_vit4k_head{j}.png")
            for j in range(att.region.shape[0])
        ]
        paths.append(save_png(overlay(image, factorised_map(att), alpha), out / f"{prefix}_factorised.png"))
    return paths


def slide_region_attention(
    slide_path: str | os.PathLike[str],
    x: int,
    y: int,
    out_dir: str | os.PathLike[str],
    *,
    weights: str | os.PathLike[str] | None = None,
    vit4k_weights: str | os.PathLike[str] | None = None,
    region_size: int = 4096,
    target_mpp: float = 0.5,
    slide_mpp: float | None = None,
    scale: int = 4,
    device: str = "cpu",
) -> list[Path]:
    """Attention PNGs of the region at level-0 ``(x, y)`` of a slide (``region_size`` px at ``target_mpp``).

    ``weights``: ViT_256 checkpoint (``None``: the weights registry, else random with a warning;
    ``"random"``). ``vit4k_weights``: ``vit4k_xs_dino.pth`` or ``"random"`` for the region level and the
    factorised map; ``None`` draws the patch level only. Parts of the region outside the slide are
    white and masked. PNGs are ``region_size / scale`` px wide, named ``<slide stem>_x<x>_y<y>_*.png``.
    """
    from gigaslide.data.region_features import region_patch_mask
    from gigaslide.data.tile_dataset import TileDataset
    from gigaslide.io import open_slide
    from gigaslide.models.encoders import create_encoder, create_hipt_vit4k
    from gigaslide.preprocess.tiling import make_spec

    if scale < 1 or region_size % 256 or (region_size // scale) < 16:
        raise ValueError(
            f"need a region size that is a multiple of 256 and 1 <= scale <= size/16, got {region_size}, {scale}"
        )
    with open_slide(slide_path, mpp=slide_mpp) as slide:
        spec = make_spec(slide, target_mpp, region_size)
    coords = np.array([[int(x), int(y)]], dtype=np.int64)
    w, h = spec.level0_dims
    if not (0 <= x < w and 0 <= y < h):
        raise ValueError(f"region corner ({x}, {y}) lies outside {slide_path} (level-0 size {w} x {h})")
    dataset = TileDataset(slide_path, coords, spec, mpp=slide_mpp)
    try:
        rgb = dataset.read_tile(0)  # (S, S, 3) uint8, white beyond the slide
    finally:
        dataset.close()
    k = region_size // 256
    mask = torch.from_numpy(region_patch_mask(coords, spec)[0].reshape(k, k))
    dev = torch.device(device)
    vit256 = create_encoder("hipt_vit256", weights=weights).to(dev)
    vit4k = (
        None
        if vit4k_weights is None
        else create_hipt_vit4k(None if str(vit4k_weights) == "random" else vit4k_weights)
    )
    if vit4k is not None:
        vit4k = vit4k.eval().to(dev)
    image = (torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0).to(dev)
    mean = torch.tensor(vit256.meta.mean, device=dev).view(3, 1, 1)
    std = torch.tensor(vit256.meta.std, device=dev).view(3, 1, 1)
    att = hierarchical_attention(vit256, vit4k, (image - mean) / std, patch_mask=mask)
    small = np.asarray(Image.fromarray(rgb).resize((region_size // scale,) * 2, Image.Resampling.BILINEAR))
    return write_attention_pngs(small, att, out_dir, f"{Path(slide_path).stem}_x{int(x)}_y{int(y)}")
