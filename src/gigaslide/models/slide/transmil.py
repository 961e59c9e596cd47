"""TransMIL (Shao et al., NeurIPS 2021): correlated MIL with a two-layer transformer and PPEG.

Pipeline for one bag of n valid tiles:
    1. Linear(in_dim -> dim) + ReLU.
    2. Square the sequence: pad to side*side tokens (side = ceil(sqrt(n))) by repeating tokens from the
       start of the bag, then prepend a learnable CLS token.
    3. Transformer layer (pre-norm, residual) with Nystrom self-attention.
    4. PPEG: the side x side token grid goes through depthwise 7x7, 5x5 and 3x3 convolutions that are
       summed with the identity; the CLS token is passed through untouched.
    5. A second transformer layer, LayerNorm, the CLS token is the slide embedding, Linear classifier.

Attention (``attention="nystrom"``, the default) is implemented here following the Nystromformer
formulation (Xiong et al., AAAI 2021): queries/keys are averaged over ``num_landmarks`` contiguous
segments of the sequence (landmarks), and
``softmax(Q K^T) V ~= softmax(Q K~^T) pinv(softmax(Q~ K~^T)) softmax(Q~ K^T) V`` with the
Moore-Penrose pseudo-inverse from 6 Newton-Schulz-style iterations, plus a depthwise convolution over
the sequence of V as residual (kernel 33, as used by TransMIL).

Two computations are offered. ``attention="official"`` equals the reference code (TransMIL with
the ``nystrom-attention`` package) given the same weights: the sequence is padded AT THE FRONT with
zero tokens to a multiple of ``num_landmarks`` and those tokens take part in the attention (a zero
key gives logit 0, so they draw attention mass), landmarks average ``ceil(n / num_landmarks)``
consecutive tokens (zeros included), the pinv initial scaling takes the maximum norms over all
heads and bags, and the CLS token is initialised with std 1. The default ``attention="nystrom"``
keeps the approximation but not those artefacts: no padding tokens (landmarks are near-equal
segments of the real tokens), per-matrix pinv scaling, exact attention for sequences no longer than
``num_landmarks`` (where the approximation only adds error), CLS init std 0.02. It is the default
because its output for a bag does not depend on how far the bag's length is from a multiple of 256
(in the reference, 257 tiles attend to 255 zero tokens). With the same weights the two differ by
0.8-6.5% of the logits (relative L2) at 100-500 tiles (measured: random paper-size weights, 1024-d
input; issue 12 reports 4-10% on trained weights). Use "official" to reproduce
published numbers or to run reference checkpoints (:meth:`TransMIL.load_official_state_dict`).
``attention="full"`` always uses exact attention.

Padding: bags are processed on their valid tiles only (a loop over bags when the batch is padded),
so padding cannot change any output. TransMIL has no single attention map over tiles, so
``SlideOutput.attention`` is None.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from gigaslide.models.slide.base import SlideModel, SlideOutput, classifier_head
from gigaslide.models.slide.registry import register_slide_model


def iterative_pinv(a: Tensor, n_iter: int = 6, global_scale: bool = False) -> Tensor:
    """Approximate Moore-Penrose pseudo-inverse of square matrices a (..., m, m) by iteration.

    Uses the third-order iteration Z <- Z/4 (13 I - AZ (15 I - AZ (7 I - AZ))) from
    Z_0 = A^T / (||A||_1 ||A||_inf), which converges for the row-stochastic softmax kernels used here.
    The norms are per matrix; ``global_scale=True`` takes each norm's maximum over ALL matrices of the
    batch and heads instead, as the reference ``nystrom-attention`` package does.
    """
    abs_a = a.abs()
    col_norm = abs_a.sum(dim=-2).amax(dim=-1)  # (...,)
    row_norm = abs_a.sum(dim=-1).amax(dim=-1)  # (...,)
    if global_scale:
        col_norm, row_norm = col_norm.max(), row_norm.max()
    z = a.transpose(-1, -2) / (col_norm * row_norm)[..., None, None]
    eye = torch.eye(a.shape[-1], device=a.device, dtype=a.dtype)
    for _ in range(n_iter):
        az = a @ z
        z = 0.25 * z @ (13 * eye - az @ (15 * eye - az @ (7 * eye - az)))
    return z


#: "nystrom" (default), "official" (equal to the reference code) or "full" (exact attention)
ATTENTION_MODES = ("nystrom", "official", "full")


def segment_means(t: Tensor, n_segments: int) -> Tensor:
    """Means of t (B, H, n, d) over n_segments contiguous, near-equal chunks of the n axis -> (B, H, m, d)."""
    n = t.shape[-2]
    seg = torch.arange(n, device=t.device) * n_segments // n  # (n,) segment of each position
    sums = torch.zeros(*t.shape[:-2], n_segments, t.shape[-1], device=t.device, dtype=t.dtype)
    sums = sums.index_add(-2, seg, t)
    counts = torch.bincount(seg, minlength=n_segments).to(t.dtype)  # (m,)
    return sums / counts[:, None]


class NystromAttention(nn.Module):
    """Multi-head self-attention with the Nystrom approximation (or exact, see module docstring)."""

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        num_landmarks: int = 256,
        pinv_iterations: int = 6,
        residual_kernel: int = 33,
        dropout: float = 0.1,
        mode: str = "nystrom",
    ) -> None:
        super().__init__()
        if mode not in ATTENTION_MODES:
            raise ValueError(f"TransMIL attention must be one of {ATTENTION_MODES}, got {mode!r}")
        if dim % heads != 0:
            raise ValueError(f"TransMIL: dim={dim} must be divisible by heads={heads}")
        self.heads, self.head_dim = heads, dim // heads
        self.num_landmarks, self.pinv_iterations, self.mode = num_landmarks, pinv_iterations, mode
        self.to_qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(dropout))
        # depthwise (per head) convolution over the sequence axis of V
        self.residual = nn.Conv2d(
            heads, heads, (residual_kernel, 1), padding=(residual_kernel // 2, 0), groups=heads, bias=False
        )

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "official":
            return self._forward_official(x)
        b, n, dim = x.shape
        qkv = self.to_qkv(x).reshape(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.head_dim**-0.5, qkv[1], qkv[2]  # (B, H, n, d) each
        m = self.num_landmarks
        if self.mode == "full" or n <= m:
            out = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        else:
            q_l, k_l = segment_means(q, m), segment_means(k, m)  # (B, H, m, d)
            kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, n, m)
            kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
            kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, H, m, n)
            out = (kernel_1 @ iterative_pinv(kernel_2, self.pinv_iterations)) @ (kernel_3 @ v)
        out = out + self.residual(v)
        out = out.transpose(1, 2).reshape(b, n, dim)
        return self.to_out(out)

    def _forward_official(self, x: Tensor) -> Tensor:
        """The reference computation: x (B, n, dim) is front-padded with zero tokens to a multiple of
        num_landmarks (they take part in the attention: zero keys give logit 0), landmarks are the
        means of ceil(n / m) consecutive tokens, the pinv uses the global scaling, and the last n
        outputs are returned."""
        b, n, dim = x.shape
        m = self.num_landmarks
        pad = (m - n % m) % m
        x = torch.cat([x.new_zeros(b, pad, dim), x], dim=1)  # (B, N, dim), N = m * ceil(n / m)
        big_n = n + pad
        qkv = self.to_qkv(x).reshape(b, big_n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.head_dim**-0.5, qkv[1], qkv[2]  # (B, H, N, d)
        seg = big_n // m
        q_l = q.reshape(b, self.heads, m, seg, self.head_dim).mean(dim=-2)  # (B, H, m, d)
        k_l = k.reshape(b, self.heads, m, seg, self.head_dim).mean(dim=-2)
        kernel_1 = torch.softmax(q @ k_l.transpose(-1, -2), dim=-1)  # (B, H, N, m)
        kernel_2 = torch.softmax(q_l @ k_l.transpose(-1, -2), dim=-1)  # (B, H, m, m)
        kernel_3 = torch.softmax(q_l @ k.transpose(-1, -2), dim=-1)  # (B, H, m, N)
        pinv = iterative_pinv(kernel_2, self.pinv_iterations, global_scale=True)
        out = (kernel_1 @ pinv) @ (kernel_3 @ v) + self.residual(v)  # (B, H, N, d)
        out = out.transpose(1, 2).reshape(b, big_n, dim)
        return self.to_out(out)[:, -n:]


class TransLayer(nn.Module):
    """Pre-norm residual attention layer: x + attn(LayerNorm(x))."""

    def __init__(self, dim: int, attn: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = attn

    def forward(self, x: Tensor) -> Tensor:
        return x + self.attn(self.norm(x))


class PPEG(nn.Module):
    """Pyramid position encoding generator: depthwise 7/5/3 convolutions on the square token grid."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim) for k in (7, 5, 3))

    def forward(self, x: Tensor, side: int) -> Tensor:
        b, _, dim = x.shape
        cls, tokens = x[:, :1], x[:, 1:]  # (B, 1, C), (B, side*side, C)
        grid = tokens.transpose(1, 2).reshape(b, dim, side, side)
        grid = grid + sum(conv(grid) for conv in self.convs)
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], dim=1)


@register_slide_model(
    "transmil",
    description="TransMIL: squared token sequence + CLS, 2 Nystrom-attention layers with PPEG in between.",
    paper="Shao et al., TransMIL: Transformer based Correlated MIL for WSI Classification, NeurIPS 2021",
    produces_attention=False,
)
class TransMIL(SlideModel):
    """TransMIL aggregator.

    Args:
        in_dim: tile feature dimension D.
        n_classes: number of outputs C; 0 = embedding only.
        dim: transformer width (default 512, as in the paper).
        heads: attention heads (default 8).
        num_landmarks: Nystrom landmarks (default dim // 2 = 256, as in the reference).
        pinv_iterations: pseudo-inverse iterations (default 6).
        dropout: attention output dropout (default 0.1, as in the reference implementation).
        attention: "nystrom" (default), "official" (the reference code's computation, equal to its
            outputs; CLS token initialised with std 1 as there) or "full" (exact softmax attention,
            O(n^2) memory). See the module docstring for the differences.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        dim: int = 512,
        heads: int = 8,
        num_landmarks: int | None = None,
        pinv_iterations: int = 6,
        dropout: float = 0.1,
        attention: str = "nystrom",
    ) -> None:
        super().__init__(in_dim, n_classes)

        def make_attention() -> NystromAttention:
            return NystromAttention(
                dim,
                heads=heads,
                num_landmarks=num_landmarks or max(dim // 2, 1),
                pinv_iterations=pinv_iterations,
                dropout=dropout,
                mode=attention,
            )

        self.fc_in = nn.Sequential(nn.Linear(in_dim, dim), nn.ReLU())
        cls_std = 1.0 if attention == "official" else 0.02  # the reference draws it from N(0, 1)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * cls_std)
        self.layer1 = TransLayer(dim, make_attention())
        self.ppeg = PPEG(dim)
        self.layer2 = TransLayer(dim, make_attention())
        self.norm = nn.LayerNorm(dim)
        self.classifier = classifier_head(dim, n_classes)
        self.embed_dim = dim

    def load_official_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Load, strictly, a state dict in the reference code's layout (``_fc1``, ``pos_layer.proj*``,
        ``attn.res_conv``, ``_fc2``; a Lightning ``model.`` prefix is removed)."""
        self.load_state_dict(official_transmil_keys(state_dict), strict=True)

    def _encode(self, x: Tensor) -> Tensor:
        """Slide embeddings (B, dim) of unpadded bags x (B, n, D) sharing the same length n."""
        h = self.fc_in(x)  # (B, n, dim)
        n = h.shape[1]
        side = math.isqrt(n - 1) + 1  # ceil(sqrt(n)) for n >= 1
        h = h[:, torch.arange(side * side, device=h.device) % n]  # (B, side*side, dim)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)  # (B, 1 + side*side, dim)
        h = self.layer2(self.ppeg(self.layer1(h), side))
        return self.norm(h)[:, 0]

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        if bool(mask.all()):
            embedding = self._encode(x)
        else:  # bags of different lengths: run each on its valid tiles only
            embedding = torch.cat([self._encode(x[b, mask[b]].unsqueeze(0)) for b in range(x.shape[0])])
        return SlideOutput(logits=self.classifier(embedding), embedding=embedding)


#: reference-code key prefix -> gigaslide key prefix
_OFFICIAL_KEYS = (
    ("_fc1.", "fc_in."),
    ("pos_layer.proj1.", "ppeg.convs.1."),
    ("pos_layer.proj2.", "ppeg.convs.2."),
    ("pos_layer.proj.", "ppeg.convs.0."),
    ("_fc2.", "classifier."),
)


def official_transmil_keys(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Rename the keys of a reference TransMIL state dict to this module's names."""
    out = {}
    for key, value in state_dict.items():
        key = key.removeprefix("model.")
        for old, new in _OFFICIAL_KEYS:
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key.replace(".attn.res_conv.", ".attn.residual.")] = value
    return out
