"""The CLS-only last block and the patch de-duplication of the HIPT region encoder are exact.

Both are inference shortcuts (bench/hipt.py): the last block of a ViT whose output is its CLS
token only needs the CLS row, and identical patches (the white padding of edge regions) need
ViT_256 once. Each must give what the full computation gives.
"""

from __future__ import annotations

import pytest
import torch

from gigaslide.models.encoders import create_encoder, create_hipt_vit4k
from gigaslide.models.encoders.hipt_region import HIPTRegionEncoder, unique_patches, unroll_region
from gigaslide.models.layers import Block, VisionTransformer


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("masked", [False, True])
def test_block_forward_query_equals_full_rows(masked: bool) -> None:
    torch.manual_seed(0)
    blk = Block(32, num_heads=4).eval()
    x = torch.randn(3, 10, 32)
    mask = None
    if masked:
        mask = torch.ones(3, 10, dtype=torch.bool)
        mask[1, 6:] = False
    full = blk(x, key_mask=mask)
    for n in (1, 3):
        part = blk.forward_query(x, n_query=n, key_mask=mask)
        assert part.shape == (3, n, 32)
        assert rel(part, full[:, :n]) < 1e-6
    if masked:  # the mask acts: hiding tokens changes the CLS row
        assert rel(blk.forward_query(x, key_mask=mask), blk.forward_query(x)) > 1e-3


def test_vit_eval_forward_is_the_cls_row_of_all_tokens_and_train_keeps_full_path() -> None:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=3, num_heads=3).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert rel(vit(x), vit.forward_features(x)[:, 0]) < 1e-6
    # gradients of the shortcut equal those of the full forward (float64: no summation-order noise)
    vit, x = vit.double(), x.double()
    vit.zero_grad()
    vit(x).square().sum().backward()
    g_short = [p.grad.clone() for p in vit.parameters() if p.grad is not None]
    vit.zero_grad()
    vit.forward_features(x)[:, 0].square().sum().backward()
    g_full = [p.grad.clone() for p in vit.parameters() if p.grad is not None]
    assert len(g_short) == len(g_full)
    for a, b in zip(g_short, g_full, strict=True):
        assert rel(a, b) < 1e-10
    shallow = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=0, num_heads=3).eval()
    y = x.float()
    assert rel(shallow(y), shallow.forward_features(y)[:, 0]) == 0.0  # no block: the full path
    # training mode: the full forward (dropout draws over all rows), same output without dropout
    vit.train()
    with torch.no_grad():
        assert rel(vit(x), vit.forward_features(x)[:, 0]) < 1e-6


def test_vit4k_eval_forward_with_patch_mask_equals_full() -> None:
    torch.manual_seed(0)
    vit4k = create_hipt_vit4k(depth=2).eval()
    grid = torch.randn(2, 384, 5, 4)
    mask = torch.ones(2, 5, 4, dtype=torch.bool)
    mask[0, 3:, :] = False
    with torch.no_grad():
        assert rel(vit4k(grid, mask), vit4k.forward_features(grid, mask)[:, 0]) < 1e-6


def test_unique_patches_groups_exactly() -> None:
    torch.manual_seed(0)
    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    c = a.clone()
    c[0, 0, 0] += 1e-3  # differs in one value: its own patch
    d = a.flip(-1)  # same sums and sums of squares as a: must still be told apart
    patches = torch.stack([a, b, a, c, d, b, a])
    uniq, inv = unique_patches(patches)
    assert inv is not None
    assert len(uniq) == 4
    assert torch.equal(uniq[inv], patches)
    distinct = torch.rand(5, 3, 8, 8)
    same, none = unique_patches(distinct)
    assert none is None and same is distinct


def test_region_encoder_dedup_equals_encoding_every_patch() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    vit256 = create_encoder("hipt_vit256", weights="random", depth=2).eval()
    vit4k = create_hipt_vit4k(depth=2).eval()
    region = torch.full((2, 3, 768, 768), 1.0)  # white after mean = std = 0.5 normalisation
    region[0, :, :300, :520] = torch.rand(3, 300, 520)  # region 0: 2x3 patches of tissue
    region[1, :, :256, :256] = torch.rand(3, 256, 256)  # region 1: one patch of tissue
    seen: list[int] = []
    hook = vit256.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape[0]))
    with torch.no_grad():
        fast = HIPTRegionEncoder(vit256, vit4k, batch_size=4)(region)
        n_fast = sum(seen)
        seen.clear()
        slow = HIPTRegionEncoder(vit256, vit4k, batch_size=4, dedup=False)(region)
    hook.remove()
    assert n_fast == 6 + 1 + 1  # the distinct tissue patches and one white patch, out of 18
    assert sum(seen) == 18
    assert fast.tokens.shape == slow.tokens.shape == (2, 9, 384)
    assert rel(fast.tokens, slow.tokens) < 1e-5
    assert rel(fast.region, slow.region) < 1e-5
    patches, grid = unroll_region(region)
    assert grid == (3, 3) and len(unique_patches(patches)[0]) == 8
