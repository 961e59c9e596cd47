"""DINOHead: the official formula, parameter names and checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigaslide.ssl.dino_head import DINOHead

torch.set_num_threads(1)


def test_state_dict_keys_match_the_official_dino_head() -> None:
    head = DINOHead(16, 32, nlayers=3, hidden_dim=24, bottleneck_dim=8)
    assert sorted(head.state_dict()) == sorted(
        [
            "mlp.0.weight", "mlp.0.bias", "mlp.2.weight", "mlp.2.bias", "mlp.4.weight", "mlp.4.bias",
            "last_layer.weight_g", "last_layer.weight_v",
        ]
    )  # fmt: skip
    assert head.state_dict()["last_layer.weight_g"].shape == (32, 1)
    assert head.state_dict()["last_layer.weight_v"].shape == (32, 8)
    bn = DINOHead(16, 32, use_bn=True, nlayers=2, hidden_dim=24, bottleneck_dim=8)
    assert "mlp.1.running_mean" in bn.state_dict() and "mlp.3.weight" in bn.state_dict()
    assert isinstance(DINOHead(16, 32, nlayers=1, bottleneck_dim=8).mlp, torch.nn.Linear)


def test_forward_equals_the_formula() -> None:
    torch.manual_seed(0)
    head = DINOHead(16, 32, nlayers=3, hidden_dim=24, bottleneck_dim=8).eval()
    with torch.no_grad():
        head.last_layer.weight_g.uniform_(0.5, 2.0)
    x = torch.randn(5, 16)
    m = head.mlp
    h = F.gelu(F.linear(x, m[0].weight, m[0].bias))
    h = F.gelu(F.linear(h, m[2].weight, m[2].bias))
    h = F.linear(h, m[4].weight, m[4].bias)
    h = h / h.norm(dim=1, keepdim=True)
    v, g = head.last_layer.weight_v, head.last_layer.weight_g
    w = g * v / v.norm(dim=1, keepdim=True)
    torch.testing.assert_close(head(x), h @ w.T, rtol=1e-5, atol=1e-6)


def test_official_init_and_frozen_norm() -> None:
    torch.manual_seed(0)
    head = DINOHead(256, 64, hidden_dim=512, bottleneck_dim=128)
    for i in (0, 2, 4):
        assert abs(float(head.mlp[i].weight.detach().std()) - 0.02) < 0.001  # trunc_normal_(std=0.02)
    assert float(head.mlp[0].bias.detach().abs().max()) == 0.0
    assert torch.equal(head.last_layer.weight_g, torch.ones(64, 1))
    assert not head.last_layer.weight_g.requires_grad
    assert DINOHead(
        8, 4, norm_last_layer=False, hidden_dim=8, bottleneck_dim=4
    ).last_layer.weight_g.requires_grad


def test_loads_torch_weight_norm_checkpoints_both_layouts() -> None:
    torch.manual_seed(0)
    ref = torch.nn.utils.parametrizations.weight_norm(torch.nn.Linear(8, 32, bias=False))
    head = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    sd = {k: v for k, v in head.state_dict().items() if not k.startswith("last_layer.")}
    new_style = {**sd, **{f"last_layer.{k}": v for k, v in ref.state_dict().items()}}
    assert "last_layer.parametrizations.weight.original1" in new_style
    other = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    other.load_state_dict(new_style, strict=True)
    z = torch.randn(3, 8)
    torch.testing.assert_close(other.last_layer(z), ref(z))
    # the classic layout (weight_g / weight_v: official DINO and HIPT checkpoints) loads strictly too
    classic = {**sd, "last_layer.weight_g": ref.parametrizations.weight.original0.detach(),
               "last_layer.weight_v": ref.parametrizations.weight.original1.detach()}  # fmt: skip
    third = DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8)
    third.load_state_dict(classic, strict=True)
    torch.testing.assert_close(third.last_layer(z), ref(z))
    with pytest.raises(RuntimeError, match=r"last_layer\.weight_v"):
        DINOHead(16, 32, hidden_dim=24, bottleneck_dim=8).load_state_dict(sd, strict=True)
