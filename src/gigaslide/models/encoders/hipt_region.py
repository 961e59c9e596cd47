"""The two-stage HIPT region encoder: 4096 px region -> 16x16 ViT_256 tokens -> ViT_4096 region token.

A region image (3, S, S) (normalised as ViT_256 expects, S a multiple of 256) is unrolled into its
(S/256)^2 patches, row-major (patch ``r * cols + c`` is row ``r``, column ``c``, the order of the
official ``unfold`` + ``rearrange``), which ViT_256 encodes in batches of ``batch_size``. The
tokens form a (384, rows, cols) grid for ViT_4096. Unlike the official ``HIPT_4K`` (one region
at a time, patches in minibatches of 256), several regions go through ViT_256 in one batch and
attention runs through PyTorch's fused scaled-dot-product kernels.

:func:`forward_with_cls_attention` is the forward pass that also keeps the last block's attention
of the CLS token (what HIPT's attention maps show), without storing the full (N, N) matrices.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from gigaslide.models.encoders.hipt_vit4k import HIPTViT4K


def unroll_region(image: Tensor, patch_size: int = 256) -> tuple[Tensor, tuple[int, int]]:
    """(C, H, W) or (R, C, H, W) -> ((R *) rows * cols, C, p, p) patches, row-major, and (rows, cols)."""
    x = image.unsqueeze(0) if image.ndim == 3 else image
    if x.ndim != 4 or x.shape[-1] % patch_size or x.shape[-2] % patch_size:
        raise ValueError(
            f"a region must be a (C, H, W) or (R, C, H, W) image with H and W multiples of {patch_size}, "
            f"got {tuple(image.shape)}; pad partial regions with background to a multiple of {patch_size}"
        )
    r, c, h, w = x.shape
    rows, cols = h // patch_size, w // patch_size
    p = x.unfold(2, patch_size, patch_size).unfold(3, patch_size, patch_size)  # (R, C, rows, cols, p, p)
    return p.permute(0, 2, 3, 1, 4, 5).reshape(r * rows * cols, c, patch_size, patch_size), (rows, cols)


def forward_with_cls_attention(
    vit: nn.Module, x: Tensor, mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """CLS token (B, D) and the last block's CLS->token attention (B, heads, N) of a ViT_256 or ViT_4096.

    ``mask`` (B, H, W) bool hides padded patches from ViT_4096's attention (see :class:`HIPTViT4K`).
    """
    key_mask = None
    if isinstance(vit, HIPTViT4K):
        key_mask = vit.key_mask(x, mask)
    elif mask is not None:
        raise ValueError("a patch mask is only supported for ViT_4096")
    t = vit.prepare_tokens(x)
    for blk in vit.blocks[:-1]:
        t = blk(t, key_mask=key_mask) if key_mask is not None else blk(t)
    if key_mask is not None:
        t, attn = vit.blocks[-1](t, return_attention=True, key_mask=key_mask)
    else:
        t, attn = vit.blocks[-1](t, return_attention=True)
    return vit.norm(t)[:, 0], attn[:, :, 0, 1:]  # (B, D), (B, heads, N)


def unique_patches(patches: Tensor) -> tuple[Tensor, Tensor | None]:
    """(P, C, p, p) -> the distinct patches (U, C, p, p) and ``inverse`` (P,) with ``out[inverse] == patches``.

    Exact: patches are grouped by a cheap signature (sums of the values and of their squares per
    channel) and every member is compared element-wise with its group's first patch. ``inverse``
    is None when all patches differ (then the input is returned as it is).
    """
    flat = patches.flatten(2).float()  # (P, C, p*p)
    sig = torch.cat([flat.sum(-1), flat.square().sum(-1)], dim=1).cpu().tolist()  # (P, 2C)
    groups: dict[tuple[float, ...], list[int]] = {}
    reps: list[int] = []
    inverse: list[int] = []
    for i, key in enumerate(map(tuple, sig)):
        cands = groups.setdefault(key, [])
        for u in cands:
            if torch.equal(patches[reps[u]], patches[i]):
                inverse.append(u)
                break
        else:
            cands.append(len(reps))
            inverse.append(len(reps))
            reps.append(i)
    if len(reps) == len(patches):
        return patches, None
    idx = torch.tensor(reps, device=patches.device)
    return patches[idx], torch.tensor(inverse, device=patches.device)


@dataclass
class RegionTokens:
    """Output of :class:`HIPTRegionEncoder` for R regions of rows x cols patches."""

    tokens: Tensor  # (R, rows * cols, 384) ViT_256 CLS tokens, row-major
    grid: tuple[int, int]  # (rows, cols)
    region: Tensor | None = None  # (R, 192) ViT_4096 CLS tokens when a ViT_4096 is attached


class HIPTRegionEncoder(nn.Module):
    """ViT_256 (batched over all patches of all regions) followed by an optional ViT_4096."""

    def __init__(
        self, vit256: nn.Module, vit4k: HIPTViT4K | None = None, batch_size: int = 256, dedup: bool = True
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.vit256, self.vit4k, self.batch_size, self.dedup = vit256, vit4k, int(batch_size), bool(dedup)

    def patch_tokens(self, images: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(R, 3, S, S) regions -> (R, T, D) ViT_256 tokens and the (rows, cols) grid.

        With ``dedup`` (default) identical patches, such as the uniform padding of regions at slide
        edges, are encoded once and their token copied: ViT_256 is deterministic in eval mode, so
        the tokens are those of encoding every patch (to float rounding of the batch shapes). In
        training mode (dropout) every patch is encoded.
        """
        patches, grid = unroll_region(images)  # (R*T, 3, 256, 256)
        todo, inverse = (
            unique_patches(patches) if self.dedup and not self.vit256.training else (patches, None)
        )  # (U, 3, 256, 256), (R*T,)
        out = torch.cat(
            [self.vit256(todo[i : i + self.batch_size]) for i in range(0, len(todo), self.batch_size)]
        )  # (U, D)
        if inverse is not None:
            out = out[inverse]  # (R*T, D)
        return out.reshape(images.shape[0], grid[0] * grid[1], -1), grid

    def forward(self, images: Tensor, patch_mask: Tensor | None = None) -> RegionTokens:
        """(R, 3, S, S) normalised regions [+ (R, T) bool mask of real patches] -> :class:`RegionTokens`."""
        tokens, grid = self.patch_tokens(images)
        region = None
        if self.vit4k is not None:
            r, _, d = tokens.shape
            x = tokens.float().transpose(1, 2).reshape(r, d, *grid)  # (R, 384, rows, cols)
            m = None if patch_mask is None else patch_mask.reshape(r, *grid)
            region = self.vit4k(x, m)
        return RegionTokens(tokens=tokens, grid=grid, region=region)
