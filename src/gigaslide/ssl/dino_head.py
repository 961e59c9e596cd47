"""The DINO projection head (Caron et al., ICCV 2021), with the official parameter names.

``mlp`` is a 3-layer MLP (Linear -> [BN] -> GELU -> ... -> Linear to the bottleneck); its output is
L2-normalised and projected by ``last_layer``, a bias-free weight-normalised linear layer
``W = g * v / ||v||`` (row-wise norm). Checkpoints of the official code (and the public HIPT
``vit256_small_dino.pth``) store it as ``last_layer.weight_g`` (out_dim, 1) and
``last_layer.weight_v`` (out_dim, bottleneck_dim), written by ``torch.nn.utils.weight_norm``.
:class:`WeightNormLinear` keeps exactly those two parameters on every torch version, and also
accepts the newer parametrization keys (``last_layer.parametrizations.weight.original0/1``) that
``torch.nn.utils.parametrizations.weight_norm`` writes. With ``norm_last_layer=True`` the norm ``g``
is fixed at 1 (not trained), as in DINO.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

#: torch.nn.utils.parametrizations.weight_norm key suffixes -> the classic weight_norm names
_PARAMETRIZATION_KEYS = {
    "parametrizations.weight.original0": "weight_g",
    "parametrizations.weight.original1": "weight_v",
}


class WeightNormLinear(nn.Module):
    """Bias-free linear layer with weight normalisation over each output row (``weight_norm(dim=0)``).

    Parameters: ``weight_g`` (out, 1) and ``weight_v`` (out, in); the effective weight is
    ``weight_g * weight_v / ||weight_v||_row``. ``g`` starts at 1 and ``v`` from ``nn.Linear``'s init.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        v = nn.Linear(in_features, out_features, bias=False).weight.detach().clone()  # (out, in)
        self.weight_v = nn.Parameter(v)
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self._register_load_state_dict_pre_hook(_rename_parametrization_keys)

    @property
    def weight(self) -> torch.Tensor:
        """The effective (out, in) weight."""
        return self.weight_g * self.weight_v / self.weight_v.norm(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> (..., out)."""
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias=False"


def _rename_parametrization_keys(state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Accept ``parametrizations.weight.original0/1`` (new torch weight_norm) as ``weight_g/v``."""
    for new, old in _PARAMETRIZATION_KEYS.items():
        if prefix + new in state_dict and prefix + old not in state_dict:
            state_dict[prefix + old] = state_dict.pop(prefix + new)


class DINOHead(nn.Module):
    """DINO's projection head: (B, in_dim) -> (B, out_dim) logits (prototype scores).

    Args:
        in_dim: backbone embedding width.
        out_dim: number of prototypes K (65536 in DINO and HIPT).
        use_bn: BatchNorm1d after each hidden Linear.
        norm_last_layer: fix the last layer's weight norm to 1 (DINO's default for ViTs).
        nlayers: MLP depth (>= 1; 1 means a single Linear to the bottleneck).
        hidden_dim: MLP hidden width.
        bottleneck_dim: width of the normalised bottleneck fed to ``last_layer``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        use_bn: bool = False,
        norm_last_layer: bool = True,
        nlayers: int = 3,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
    ) -> None:
        super().__init__()
        nlayers = max(int(nlayers), 1)
        self.mlp: nn.Module
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim)]
            if use_bn:
                layers.append(nn.BatchNorm1d(hidden_dim))
            layers.append(nn.GELU())
            for _ in range(nlayers - 2):
                layers.append(nn.Linear(hidden_dim, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.last_layer = WeightNormLinear(bottleneck_dim, out_dim)
        if norm_last_layer:
            self.last_layer.weight_g.requires_grad = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_dim) -> (B, out_dim)."""
        x = self.mlp(x)  # (B, bottleneck)
        x = F.normalize(x, dim=-1, p=2)
        return self.last_layer(x)  # (B, out_dim)
