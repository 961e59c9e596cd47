"""Slide heatmaps for LongViT: gradient x input relevance of every 32 x 32 patch, drawn on the thumbnail.

Dilated attention has no single attention matrix to roll out (each token mixes several sparse
attention patterns with data-dependent weights), so relevance is gradient-based: for the target
output ``s`` (a class logit, or the embedding norm of an embedding-only model) the relevance of patch
``i`` is ``sum_d e_id * ds/de_id`` over its input token ``e_i`` (patch embedding + position), the
first-order share of ``s`` carried by that patch. One forward and one backward pass, memory of a
training step.

    rel = longvit_relevance(model, x, mask=token_mask)             # (H/32, W/32) float array
    scores = relevance_tile_scores(slide_image, rel)               # TileScores in level-0 coordinates
    render_heatmap(slide, scores.coords, scores.scores, scores.tile_size_level0, "heatmap.png")
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from gigaslide.eval.heatmap import TileScores
from gigaslide.preprocess.slide_image import SlideImage


def longvit_relevance(
    model: torch.nn.Module,
    x: Tensor,
    mask: Tensor | None = None,
    target: int | None = None,
    absolute: bool = False,
) -> np.ndarray:
    """Gradient x input relevance per patch token of one image: x (1, 3, H, W) -> (H/p, W/p) float64.

    ``target``: class whose logit is explained (default: the predicted class; embedding-only models
    explain the embedding's L2 norm). Masked tokens (``mask`` (1, H/p, W/p) False) get 0.
    ``absolute`` returns magnitudes instead of signed relevance.
    """
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"longvit_relevance explains one image (1, 3, H, W), got {tuple(x.shape)}")
    was_training = model.training
    model.eval()
    try:
        grid = model.token_grid(x)
        with torch.enable_grad():
            tokens = model.tokens(x).detach().requires_grad_(True)  # (1, N, D)
            valid = None if mask is None else model._flat_mask(x, mask)
            enc = model.encoder(tokens, key_padding_mask=None if valid is None else ~valid)
            emb = model.pool(enc, valid)
            if model.head is not None:
                logits = model.head(emb)
                cls = int(logits.argmax(dim=-1)) if target is None else int(target)
                if not 0 <= cls < logits.shape[-1]:
                    raise ValueError(f"target class {cls} out of range for {logits.shape[-1]} classes")
                score = logits[0, cls]
            else:
                score = emb.norm()
            (grad,) = torch.autograd.grad(score, tokens)
        rel = (grad * tokens).sum(-1)[0]  # (N,)
        if valid is not None:
            rel = rel.masked_fill(~valid[0], 0.0)
        if absolute:
            rel = rel.abs()
        return rel.detach().double().cpu().numpy().reshape(grid)
    finally:
        model.train(was_training)


def relevance_tile_scores(image: SlideImage, relevance: np.ndarray, only_tissue: bool = False) -> TileScores:
    """Patch relevance (H/p, W/p) of a rendered slide image -> per-patch scores at level-0 coordinates.

    Patches in the white padding are left out (and patches outside the token mask when ``only_tissue``).
    The footprint is the larger side of a patch in level-0 pixels (patches of a squashed image are not
    square; :func:`render_heatmap` averages where footprints overlap).
    """
    gh, gw = image.grid
    if relevance.shape != (gh, gw):
        raise ValueError(
            f"relevance of shape {relevance.shape} does not match the image's token grid {(gh, gw)}"
        )
    p = image.patch_size
    cw, ch = image.content_size
    x0, y0, x1, y1 = image.box
    sx, sy = (x1 - x0) / cw, (y1 - y0) / ch  # level-0 pixels per image pixel
    rows, cols = np.mgrid[0:gh, 0:gw]
    keep = (rows * p < ch) & (cols * p < cw)
    if only_tissue and image.token_mask is not None:
        keep &= image.token_mask
    coords = np.stack([x0 + cols[keep] * p * sx, y0 + rows[keep] * p * sy], axis=1).round().astype(np.int64)
    return TileScores(
        coords=coords,
        scores=relevance[keep].astype(np.float32),
        tile_size_level0=round(p * max(sx, sy)),
        attrs={"kind": "longvit_relevance", "patch_size": p},
    )
