"""DilatedAttention against dense attention and a brute-force reference built from explicit masks."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.layers import DilatedAttention

torch.set_num_threads(1)


def brute_force(
    attn: DilatedAttention, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """LongNet's definition written densely: one explicit (N, N) mask per pair and head, LSE mixture."""
    b, n, d = x.shape
    h, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(x).view(b, n, h, hd).transpose(1, 2).double()  # (B, H, N, hd)
    k = attn.k_proj(x).view(b, n, h, hd).transpose(1, 2).double()
    v = attn.v_proj(x).view(b, n, h, hd).transpose(1, 2).double()
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)  # (B, H, N, N)
    pos = torch.arange(n)
    valid_key = torch.ones(b, n, dtype=torch.bool) if key_padding_mask is None else ~key_padding_mask
    outs, lses = [], []
    for w, r in attn.pairs:
        s = min(w, n)
        per_group = -(-h // r)
        mask = torch.zeros(b, h, n, n, dtype=torch.bool)
        for head in range(h):
            off = head // per_group
            kept = (pos % s) % r == off  # (N,)
            same_seg = (pos[:, None] // s) == (pos[None, :] // s)
            mask[:, head] = same_seg & kept[:, None] & kept[None, :]
        mask &= valid_key[:, None, None, :]
        sc = scores.masked_fill(~mask, float("-inf"))
        lse = torch.logsumexp(sc, dim=-1, keepdim=True)  # (B, H, N, 1), -inf where nothing is attended
        p = torch.exp(sc - lse.nan_to_num(neginf=0.0)).nan_to_num(0.0)
        outs.append(p @ v)
        lses.append(lse)
    lse_all = torch.stack(lses)  # (P, B, H, N, 1)
    top = lse_all.max(dim=0).values.nan_to_num(neginf=0.0)
    wts = torch.exp(lse_all - top)
    wts = wts / wts.sum(0).clamp_min(1e-300)
    out = (wts * torch.stack(outs)).sum(0)  # (B, H, N, hd)
    out = out.transpose(1, 2).reshape(b, n, d).to(x.dtype)
    if attn.inner_attn_ln is not None:
        out = attn.inner_attn_ln(out)
    return attn.out_proj(out)


def _grads(fn, attn, x):
    x = x.clone().requires_grad_(True)
    attn.zero_grad()
    y = fn(x)
    weights = torch.linspace(-1, 1, y.numel()).view_as(y)
    (y * weights).sum().backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in attn.named_parameters()}


def test_single_full_segment_equals_dense_sdpa():
    torch.manual_seed(0)
    attn = DilatedAttention(32, 4, segment_lengths=[64], dilated_ratios=[1], inner_norm=False).eval()
    x = torch.randn(2, 37, 32)
    y = attn(x)
    q, k, v = (p(x).view(2, 37, 4, 8).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    ref = attn.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 37, 32))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["fused", "math"])
@pytest.mark.parametrize(
    ("n", "heads", "segments", "ratios"),
    [
        (48, 4, (8, 16, 32), (1, 2, 4)),  # lengths multiples of every segment
        (45, 6, (8, 16, 64), (1, 2, 4)),  # odd length, segment longer than N, heads not divisible by 4
        (37, 3, (5, 12), (1, 8)),  # ratio larger than the head count, segments not multiples of r
        (20, 5, (4, 8), (2, 3)),  # no r = 1 pair
    ],
)
def test_matches_brute_force_outputs_and_gradients(backend, n, heads, segments, ratios):
    torch.manual_seed(1)
    attn = DilatedAttention(heads * 4, heads, segments, ratios, backend=backend).double()
    attn.train()
    x = torch.randn(2, n, heads * 4, dtype=torch.float64)
    y, gx, gp = _grads(attn, attn, x)
    y_ref, gx_ref, gp_ref = _grads(lambda t: brute_force(attn, t), attn, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-9)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-6, atol=1e-9, msg=name)


@pytest.mark.parametrize("backend", ["fused", "math"])
def test_key_padding_mask_matches_brute_force_and_ignores_padding(backend):
    torch.manual_seed(2)
    attn = DilatedAttention(16, 4, (4, 8, 16), (1, 2, 4), backend=backend).double()
    x = torch.randn(2, 27, 16, dtype=torch.float64)
    pad = torch.zeros(2, 27, dtype=torch.bool)
    pad[0, 20:] = True
    pad[1, 3:9] = True  # a whole r=1 segment of sample 1 masked except one token
    y, gx, gp = _grads(lambda t: attn(t, key_padding_mask=pad), attn, x)
    y_ref, gx_ref, gp_ref = _grads(lambda t: brute_force(attn, t, pad), attn, x)
    torch.testing.assert_close(y, y_ref, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-9)
    for name in gp:
        torch.testing.assert_close(gp[name], gp_ref[name], rtol=1e-6, atol=1e-9, msg=name)
    # values at padded positions never reach the valid outputs
    x2 = x.clone()
    x2[0, 20:] = 100.0
    y2 = attn(x2, key_padding_mask=pad)
    torch.testing.assert_close(y2[0, :20], y[0, :20])


def test_fused_and_math_agree_in_float32_and_bfloat16_runs():
    torch.manual_seed(3)
    attn = DilatedAttention(64, 16, (16, 32, 64), (1, 2, 4))
    x = torch.randn(1, 100, 64)
    attn.backend = "fused"
    y_fused = attn(x)
    attn.backend = "math"
    y_math = attn(x)
    torch.testing.assert_close(y_fused, y_math, rtol=1e-4, atol=1e-5)
    attn.backend = "fused"
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_bf16 = attn(x)
    assert y_bf16.dtype == torch.bfloat16
    assert (y_bf16.float() - y_fused).abs().max() < 0.1


def test_reference_padding_treats_padding_as_zero_keys():
    torch.manual_seed(4)
    attn = DilatedAttention(8, 2, (8,), (1,), inner_norm=False, reference_padding=True).double()
    x = torch.randn(1, 12, 8, dtype=torch.float64)
    y = attn(x)
    # last segment: 4 real tokens + 4 zero keys/values (after projection) as in the reference
    q, k, v = (p(x).view(1, 12, 2, 4).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
    k = torch.cat([k[:, :, 8:], torch.zeros(1, 2, 4, 4, dtype=k.dtype)], dim=2)
    v = torch.cat([v[:, :, 8:], torch.zeros(1, 2, 4, 4, dtype=v.dtype)], dim=2)
    last = F.scaled_dot_product_attention(q[:, :, 8:], k, v).transpose(1, 2).reshape(1, 4, 8)
    torch.testing.assert_close(y[:, 8:], attn.out_proj(last))


def test_errors_name_the_problem():
    with pytest.raises(ValueError, match="equal length"):
        DilatedAttention(8, 2, (4, 8), (1,))
    with pytest.raises(ValueError, match="divisible"):
        DilatedAttention(10, 4, (4,), (1,))
    attn = DilatedAttention(8, 2, (4,), (1,))
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        attn(torch.randn(1, 5, 8), key_padding_mask=torch.zeros(1, 4, dtype=torch.bool))


def test_deterministic_and_state_dict_names():
    torch.manual_seed(5)
    attn = DilatedAttention(16, 4, (8,), (1,))
    names = set(attn.state_dict())
    assert {"q_proj.weight", "k_proj.bias", "v_proj.weight", "out_proj.bias", "inner_attn_ln.weight"} <= names
    x = torch.randn(1, 30, 16)
    torch.testing.assert_close(attn(x), attn(x), rtol=0, atol=0)


def test_head_offsets_follow_longnet_groups():
    from gigaslide.models.layers.dilated_kernels import head_offsets

    assert head_offsets(16, 4).tolist() == [0] * 4 + [1] * 4 + [2] * 4 + [3] * 4
    assert head_offsets(6, 4).tolist() == [0, 0, 1, 1, 2, 2]  # heads padded to 8, groups of 2
    assert head_offsets(3, 8).tolist() == [0, 1, 2]


def test_cuda_key_bias_is_broadcast_and_aligned():
    from gigaslide.models.layers.dilated_kernels import cuda_key_bias

    q = torch.zeros(2, 3, 5, 4)
    assert cuda_key_bias(None, q) is None
    bias = torch.zeros(2, 3, 1, 5)
    bias[0, 1, 0, 2] = float("-inf")
    full = cuda_key_bias(bias, q)
    assert full.shape == (2, 3, 5, 5) and full.stride(2) == 0 and full.stride(1) == 16
    assert torch.isinf(full[0, 1, :, 2]).all() and torch.isfinite(full[1]).all()
