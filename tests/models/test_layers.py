"""ViT building blocks: attention paths, position-embedding resizing, patch embedding, equivalence with timm."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.layers import (
    Attention,
    Block,
    DropPath,
    PatchEmbed,
    VisionTransformer,
    infer_square_grid,
    resize_pos_embed,
)


def _tiny_vit(img_size: int = 64, **kw) -> VisionTransformer:
    torch.manual_seed(0)
    args = {"patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 4}
    args.update(kw)
    return VisionTransformer(img_size=img_size, **args).eval()


def test_attention_fused_and_explicit_paths_agree() -> None:
    torch.manual_seed(0)
    attn = Attention(32, num_heads=4).eval()
    x = torch.randn(3, 10, 32)
    fused = attn(x)
    explicit, weights = attn(x, return_attention=True)
    assert weights.shape == (3, 4, 10, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 10))
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    # reference: per-head softmax(q k^T / sqrt(d)) v, written out
    q, k, v = attn.qkv(x).chunk(3, dim=-1)
    heads = [
        torch.softmax(q[..., h * 8 : (h + 1) * 8] @ k[..., h * 8 : (h + 1) * 8].transpose(1, 2) / 8**0.5, -1)
        @ v[..., h * 8 : (h + 1) * 8]
        for h in range(4)
    ]
    torch.testing.assert_close(explicit, attn.proj(torch.cat(heads, -1)), atol=1e-5, rtol=1e-5)


def test_attention_rejects_indivisible_heads() -> None:
    with pytest.raises(ValueError, match="not divisible"):
        Attention(30, num_heads=4)


def test_block_returns_attention_of_its_input() -> None:
    torch.manual_seed(0)
    blk = Block(32, num_heads=4).eval()
    x = torch.randn(2, 5, 32)
    y, a = blk(x, return_attention=True)
    torch.testing.assert_close(y, blk(x), atol=1e-5, rtol=1e-5)
    _, expected = blk.attn(blk.norm1(x), return_attention=True)
    torch.testing.assert_close(a, expected)


def test_drop_path_identity_in_eval_and_unbiased_in_train() -> None:
    dp = DropPath(0.5)
    x = torch.ones(4000, 3)
    assert torch.equal(dp.eval()(x), x)
    torch.manual_seed(0)
    y = dp.train()(x)
    rows = y[:, 0]
    assert set(rows.unique().tolist()) <= {0.0, 2.0}
    assert torch.all(y == y[:, :1])  # whole samples are dropped, never single features
    assert abs(rows.mean().item() - 1.0) < 0.1
    with pytest.raises(ValueError):
        DropPath(1.0)


def test_patch_embed_shapes_and_errors() -> None:
    pe = PatchEmbed(patch_size=16, in_chans=3, embed_dim=8)
    x = torch.randn(2, 3, 48, 32)
    assert pe.grid_shape(x) == (3, 2)
    assert pe(x).shape == (2, 6, 8)
    # token order is row-major over the grid: token 1 is patch (row 0, col 1)
    ref = F.conv2d(x[:, :, 0:16, 16:32], pe.proj.weight, pe.proj.bias).flatten(1)
    torch.testing.assert_close(pe(x)[:, 1], ref)
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        pe(torch.randn(1, 3, 50, 48))
    with pytest.raises(ValueError, match="3 input channels"):
        pe(torch.randn(1, 4, 32, 32))


def test_resize_pos_embed_matches_dino_bicubic_and_keeps_cls() -> None:
    torch.manual_seed(0)
    pe = torch.randn(1, 1 + 14 * 14, 8)
    out = resize_pos_embed(pe, (16, 16), num_prefix_tokens=1)
    assert out.shape == (1, 1 + 256, 8)
    torch.testing.assert_close(out[:, 0], pe[:, 0])
    grid = pe[:, 1:].reshape(1, 14, 14, 8).permute(0, 3, 1, 2)
    ref = F.interpolate(grid, scale_factor=(16.1 / 14, 16.1 / 14), mode="bicubic", align_corners=False)
    torch.testing.assert_close(out[:, 1:], ref.permute(0, 2, 3, 1).reshape(1, 256, 8))
    assert resize_pos_embed(pe, (14, 14)) is pe
    # non-square target grid and explicit old grid
    rect = resize_pos_embed(pe, (4, 6))
    assert rect.shape == (1, 1 + 24, 8)
    back = resize_pos_embed(rect, (2, 3), old_grid=(4, 6))
    assert back.shape == (1, 7, 8)


def test_resize_pos_embed_errors() -> None:
    with pytest.raises(ValueError, match="square token grid"):
        resize_pos_embed(torch.zeros(1, 1 + 15, 4), (4, 4))
    with pytest.raises(ValueError, match="does not match"):
        resize_pos_embed(torch.zeros(1, 1 + 16, 4), (4, 4), old_grid=(3, 4))
    with pytest.raises(ValueError, match=r"\(1, N, D\)"):
        resize_pos_embed(torch.zeros(2, 17, 4), (4, 4))
    assert infer_square_grid(196) == 14


def test_vit_matches_timm_reference() -> None:
    timm = pytest.importorskip("timm")
    ours = _tiny_vit(img_size=64)
    ref = timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        img_size=64,
        embed_dim=32,
        depth=2,
        num_heads=4,
    ).eval()
    ref.load_state_dict(ours.state_dict(), strict=True)  # identical parameter names and shapes
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-5, rtol=1e-5)


def test_vit_other_input_size_uses_interpolated_positions() -> None:
    big = _tiny_vit(img_size=64)  # 4x4 grid
    small = _tiny_vit(img_size=48)  # 3x3 grid
    sd = big.state_dict()
    sd["pos_embed"] = resize_pos_embed(sd["pos_embed"], (3, 3))
    small.load_state_dict(sd)
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(big(x), small(x), atol=1e-6, rtol=1e-6)
        # a non-square input works too
        assert big.forward_features(torch.randn(1, 3, 32, 80)).shape == (1, 1 + 2 * 5, 32)


def test_vit_attention_maps_and_intermediate_layers() -> None:
    vit = _tiny_vit(img_size=64)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        attn = vit.get_last_selfattention(x)
        assert attn.shape == (2, 4, 17, 17)
        torch.testing.assert_close(attn.sum(-1), torch.ones(2, 4, 17))
        layers = vit.get_intermediate_layers(x, n=2)
        assert len(layers) == 2 and layers[-1].shape == (2, 17, 32)
        torch.testing.assert_close(layers[-1][:, 0], vit(x), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(layers[0], layers[1])
    with pytest.raises(ValueError):
        vit.get_intermediate_layers(x, n=3)
