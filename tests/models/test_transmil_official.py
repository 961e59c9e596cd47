"""TransMIL ``attention="official"`` equals the reference computation (issue 12 section 2).

The reference is written here from the published math and the documented behaviour of the
reference code (TransMIL + the nystrom-attention package), on a state dict in the reference's key
layout: zero tokens padded at the FRONT of the sequence to a multiple of the landmark count (they
take part in the attention), landmarks = means of ceil(n / m) consecutive tokens, the pinv's initial
scaling by the maximum norms over all heads, and the last n outputs kept.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.slide import create_slide_model

D_IN, DIM, HEADS, C = 24, 32, 8, 3  # num_landmarks = DIM // 2 = 16


def _reference_state(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape: int, s: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * s

    sd = {"_fc1.0.weight": r(DIM, D_IN), "_fc1.0.bias": r(DIM), "cls_token": r(1, 1, DIM, s=1.0)}
    for layer in ("layer1", "layer2"):
        sd |= {
            f"{layer}.norm.weight": 1 + r(DIM), f"{layer}.norm.bias": r(DIM),
            f"{layer}.attn.to_qkv.weight": r(3 * DIM, DIM), f"{layer}.attn.to_out.0.weight": r(DIM, DIM),
            f"{layer}.attn.to_out.0.bias": r(DIM), f"{layer}.attn.res_conv.weight": r(HEADS, 1, 33, 1),
        }  # fmt: skip
    for name, k in (("proj", 7), ("proj1", 5), ("proj2", 3)):
        sd |= {f"pos_layer.{name}.weight": r(DIM, 1, k, k), f"pos_layer.{name}.bias": r(DIM)}
    sd |= {"norm.weight": 1 + r(DIM), "norm.bias": r(DIM), "_fc2.weight": r(C, DIM), "_fc2.bias": r(C)}
    return {f"model.{k}": v for k, v in sd.items()}  # as saved by the reference's Lightning module


def _pinv(a: torch.Tensor, iters: int = 6) -> torch.Tensor:
    # Z0 = A^T / (max row sum * max column sum), both maxima over every head of the batch
    z = a.transpose(-1, -2) / (a.abs().sum(-1).max() * a.abs().sum(-2).max())
    eye = torch.eye(a.shape[-1])
    for _ in range(iters):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


def _attention(sd: dict, p: str, x: torch.Tensor) -> torch.Tensor:
    n, m, d = x.shape[0], DIM // 2, DIM // HEADS
    x = torch.cat([torch.zeros((-n) % m, DIM), x])  # zero tokens in front, N = m * ceil(n / m)
    big_n = x.shape[0]
    q, k, v = (x @ sd[f"{p}.to_qkv.weight"].T).split(DIM, dim=-1)  # (N, dim) each
    q, k, v = (t.reshape(big_n, HEADS, d).transpose(0, 1) for t in (q, k, v))  # (H, N, d)
    q = q / math.sqrt(d)
    seg = math.ceil(n / m)
    q_l = q.reshape(HEADS, m, seg, d).sum(2) / seg
    k_l = k.reshape(HEADS, m, seg, d).sum(2) / seg
    a1 = torch.softmax(q @ k_l.transpose(1, 2), -1)
    a2 = torch.softmax(q_l @ k_l.transpose(1, 2), -1)
    a3 = torch.softmax(q_l @ k.transpose(1, 2), -1)
    out = a1 @ _pinv(a2) @ (a3 @ v)
    out = out + F.conv2d(v.unsqueeze(0), sd[f"{p}.res_conv.weight"], padding=(16, 0), groups=HEADS)[0]
    out = out.transpose(0, 1).reshape(big_n, DIM) @ sd[f"{p}.to_out.0.weight"].T + sd[f"{p}.to_out.0.bias"]
    return out[-n:]


def _reference_logits(sd: dict, feats: torch.Tensor) -> torch.Tensor:
    """feats (n, D_IN) -> logits (C,), the reference TransMIL forward."""
    sd = {k.removeprefix("model."): v for k, v in sd.items()}
    h = torch.relu(feats @ sd["_fc1.0.weight"].T + sd["_fc1.0.bias"])  # (n, dim)
    n = h.shape[0]
    side = math.ceil(math.sqrt(n))
    h = torch.cat([h, h[: side * side - n]])  # square: repeat the first tokens
    h = torch.cat([sd["cls_token"][0], h])  # (1 + side^2, dim)

    def layer(h: torch.Tensor, name: str) -> torch.Tensor:
        normed = F.layer_norm(h, (DIM,), sd[f"{name}.norm.weight"], sd[f"{name}.norm.bias"])
        return h + _attention(sd, f"{name}.attn", normed)

    h = layer(h, "layer1")
    grid = h[1:].T.reshape(1, DIM, side, side)
    conv = sum(
        F.conv2d(grid, sd[f"pos_layer.{nm}.weight"], sd[f"pos_layer.{nm}.bias"], padding=k // 2, groups=DIM)
        for nm, k in (("proj", 7), ("proj1", 5), ("proj2", 3))
    )
    h = torch.cat([h[:1], (grid + conv).flatten(2)[0].T])
    h = layer(h, "layer2")
    cls = F.layer_norm(h, (DIM,), sd["norm.weight"], sd["norm.bias"])[0]
    return cls @ sd["_fc2.weight"].T + sd["_fc2.bias"]


def _models() -> tuple[torch.nn.Module, torch.nn.Module]:
    sd = _reference_state()
    official = create_slide_model("transmil", D_IN, C, dim=DIM, heads=HEADS, attention="official").eval()
    official.load_official_state_dict(sd)
    default = create_slide_model("transmil", D_IN, C, dim=DIM, heads=HEADS).eval()
    default.load_official_state_dict(sd)
    return official, default


@pytest.mark.parametrize("n", [5, 16, 40, 100, 333])
def test_official_mode_equals_the_reference(n: int) -> None:
    feats = torch.randn(n, D_IN, generator=torch.Generator().manual_seed(n))
    official, default = _models()
    with torch.no_grad():
        ref = _reference_logits(_reference_state(), feats)
        ours = official(feats.unsqueeze(0)).logits[0]
        plain = default(feats.unsqueeze(0)).logits[0]
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    # the default computation (no zero tokens, per-matrix pinv scaling) is a different function
    assert float((plain - ref).abs().max()) > 1e-3 * float(ref.abs().max())


def test_official_cls_token_init_and_padded_batches() -> None:
    torch.manual_seed(0)
    official = create_slide_model("transmil", D_IN, C, dim=256, heads=HEADS, attention="official")
    default = create_slide_model("transmil", D_IN, C, dim=256, heads=HEADS)
    assert (
        0.8 < float(official.cls_token.detach().std()) < 1.2
        and float(default.cls_token.detach().std()) < 0.05
    )
    model, _ = _models()
    x = torch.randn(2, 30, D_IN)
    mask = torch.ones(2, 30, dtype=torch.bool)
    mask[1, 18:] = False
    with torch.no_grad():
        batch = model(x, mask=mask).logits
        torch.testing.assert_close(
            batch[1], _reference_logits(_reference_state(), x[1, :18]), rtol=1e-4, atol=1e-5
        )
