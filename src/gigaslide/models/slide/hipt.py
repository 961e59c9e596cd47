"""HIPT slide models over region token grids (Chen et al., CVPR 2022, section 3.3 and supplement).

Input: per slide, M regions of 4096 px, each a grid of T = 16x16 ViT_256 CLS tokens, stored
row-major over the grid (token ``i * 16 + j`` is patch row ``i``, column ``j``)::

    x     (B, M, T, D)  region token grids (D = 384), slides padded to a common M
    mask  (B, M, T)     bool, True = real patch (False: outside the slide or padding);
          (B, M)        or a region mask (every patch of a real region is real); None = all real

``hipt`` (ViT_WSI-4096, the official ``HIPT_LGP_FC``): ViT_4096 turns each region grid into a
192-d token, then ``global_phi`` (Linear + ReLU + Dropout), a 2-layer post-norm transformer over
the regions (3 heads, feed-forward width 192, ReLU, dropout 0.25), gated attention pooling,
``global_rho`` and the classifier. State-dict keys equal the official model's, so its finetuned
checkpoints load strictly (``local_vit.module.`` written by ``nn.DataParallel`` is recognised).
``freeze_4k`` freezes ViT_4096 (the paper's recipe: pretrained and frozen); ``vit4k_weights``
loads ``vit4k_xs_dino.pth`` into it.

``hipt_ap`` (the supplement's "ViT_256 PF, AP-256, AP-4096" ablation, official ``HIPT_None_FC``):
no transformer at all, gated attention pooling over the patches of each region, then over regions.

Padded patches of an edge region are hidden from ViT_4096's attention (``mask_patches=True``; with
``False`` they are read as they are, like the official code reads background patches). Padded
regions are never encoded and get exactly zero attention. ``n_classes=0`` builds an embedding-only
model whose logits are an empty (B, 0) tensor.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from gigaslide.models.encoders.hipt_vit4k import HIPTViT4K
from gigaslide.models.slide.base import SlideModel, SlideOutput, masked_softmax
from gigaslide.models.slide.registry import register_slide_model

HIPT_PAPER = (
    "Chen et al., Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised "
    "Learning (HIPT), CVPR 2022"
)


class GatedAttentionPool(nn.Module):
    """Gated attention scores (CLAM's ``Attn_Net_Gated`` names): h (..., L) -> (...,) unnormalised.

    ``score = attention_c(tanh(attention_a(h)) * sigmoid(attention_b(h)))``, dropout inside both branches.
    """

    def __init__(self, dim: int, hidden: int, dropout: float = 0.25) -> None:
        super().__init__()
        self.attention_a = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Dropout(dropout))
        self.attention_b = nn.Sequential(nn.Linear(dim, hidden), nn.Sigmoid(), nn.Dropout(dropout))
        self.attention_c = nn.Linear(hidden, 1)

    def forward(self, h: Tensor) -> Tensor:
        return self.attention_c(self.attention_a(h) * self.attention_b(h)).squeeze(-1)


def check_region_inputs(x: Tensor, mask: Tensor | None, in_dim: int, name: str) -> tuple[Tensor, Tensor, int]:
    """Validate (B, M, T, D) grids; returns (patch mask (B, M, T), region mask (B, M), grid side)."""
    if x.dim() != 4:
        raise ValueError(
            f"{name}: expected region token grids of shape (B, M, T, D), got {tuple(x.shape)}; "
            "read region features (M, 256, 384) and add a batch axis with x.unsqueeze(0)"
        )
    b, m, t, d = x.shape
    if d != in_dim:
        raise ValueError(f"{name}: tokens have dimension {d} but the model was built with in_dim={in_dim}")
    side = math.isqrt(t)
    if side * side != t or m == 0:
        raise ValueError(f"{name}: need M >= 1 regions of a square token grid, got M={m}, T={t}")
    if mask is None:
        patch = torch.ones(b, m, t, dtype=torch.bool, device=x.device)
    elif tuple(mask.shape) == (b, m):
        patch = mask.to(device=x.device, dtype=torch.bool).unsqueeze(-1).expand(b, m, t)
    elif tuple(mask.shape) == (b, m, t):
        patch = mask.to(device=x.device, dtype=torch.bool)
    else:
        raise ValueError(
            f"{name}: mask must have shape (B, M)={(b, m)} or (B, M, T)={(b, m, t)}, got {tuple(mask.shape)}"
        )
    region = patch.any(dim=-1)  # (B, M)
    empty = (~region.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{name}: slide(s) {empty} have no valid region in mask; a slide needs at least one")
    return patch, region, side


def _embedding_only(n_classes: int, dim: int) -> nn.Linear | None:
    if n_classes < 0:
        raise ValueError(f"n_classes must be >= 0 (0 = embedding only), got {n_classes}")
    return nn.Linear(dim, n_classes) if n_classes > 0 else None


class HIPT(nn.Module):
    """ViT_WSI-4096 over ViT_4096 region tokens (official ``HIPT_LGP_FC``, "small" size)."""

    # survival training sets the classifier bias to the baseline hazards (the harness's NLL init)
    output_layers = SlideModel.output_layers
    init_output_bias = SlideModel.init_output_bias

    def __init__(
        self,
        in_dim: int = 384,
        n_classes: int = 2,
        dropout: float = 0.25,
        freeze_4k: bool = False,
        vit4k_weights: str | os.PathLike[str] | None = None,
        mask_patches: bool = True,
        embed_dim: int = 192,
    ) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.embed_dim = int(in_dim), int(n_classes), int(embed_dim)
        self.freeze_4k, self.mask_patches = bool(freeze_4k), bool(mask_patches)
        self.local_vit = HIPTViT4K(in_dim=in_dim, embed_dim=embed_dim)
        self.vit4k_weights_info: dict[str, object] = {"random_init": True}
        if vit4k_weights is not None:
            from gigaslide.models.weights import load_weights

            self.vit4k_weights_info = {**load_weights(self.local_vit, vit4k_weights), "random_init": False}
        if self.freeze_4k:
            self.local_vit.requires_grad_(False)
        self.global_phi = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        layer = nn.TransformerEncoderLayer(
            d_model=embed_dim,
            nhead=3,
            dim_feedforward=embed_dim,
            dropout=dropout,
            activation="relu",
            batch_first=True,
        )
        self.global_transformer = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.global_attn_pool = GatedAttentionPool(embed_dim, embed_dim, dropout)
        self.global_rho = nn.Sequential(nn.Linear(embed_dim, embed_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = _embedding_only(n_classes, embed_dim)
        #: an embedding-only model drops the classifier of a finetuned checkpoint (reported as dropped)
        self.checkpoint_drop_prefixes = ("classifier.",) if self.classifier is None else ()

    @staticmethod
    def checkpoint_filter(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Official checkpoints trained on GPUs hold ViT_4096 as ``local_vit.module.*`` (DataParallel)."""
        return {k.replace("local_vit.module.", "local_vit.", 1): v for k, v in sd.items()}

    def train(self, mode: bool = True) -> HIPT:
        super().train(mode)
        if self.freeze_4k:
            self.local_vit.eval()  # a frozen ViT_4096 is a fixed feature map (no dropout, no drop path)
        return self

    def encode_regions(self, x: Tensor, patch: Tensor, region: Tensor, side: int) -> Tensor:
        """ViT_4096 tokens (B, M, 192) of the real regions (zero for padded ones)."""
        b, m, _, d = x.shape
        grids = x[region]  # (R, T, D) real regions only
        grids = grids.reshape(-1, side, side, d).permute(0, 3, 1, 2)  # (R, D, side, side), row-major
        pmask = patch[region].reshape(-1, side, side) if self.mask_patches else None  # (R, side, side)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.freeze_4k):
            tokens = self.local_vit(grids, pmask)  # (R, 192)
        out = tokens.new_zeros(b, m, tokens.shape[-1])
        out[region] = tokens
        return out  # (B, M, 192)

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """(B, M, T, D) region grids [+ (B, M, T) or (B, M) mask] -> SlideOutput (attention (B, M)).

        ``extras["region_tokens"]`` holds the (B, M, 192) ViT_4096 tokens (zero for padded regions).
        """
        patch, region, side = check_region_inputs(x, mask, self.in_dim, "HIPT")
        keep = patch if self.mask_patches else region.unsqueeze(-1)
        x = x.masked_fill(~keep.unsqueeze(-1), 0.0)  # padding (even NaN) cannot leak into outputs
        tokens = self.encode_regions(x, patch, region, side)  # (B, M, 192) ViT_4096 region tokens
        h = self.global_phi(tokens)  # (B, M, 192)
        h = self.global_transformer(h, src_key_padding_mask=~region)  # (B, M, 192)
        h = h.masked_fill(~region.unsqueeze(-1), 0.0)
        attn = masked_softmax(self.global_attn_pool(h), region)  # (B, M)
        embedding = self.global_rho((attn.unsqueeze(-1) * h).sum(dim=1))  # (B, 192)
        logits = self.classifier(embedding) if self.classifier is not None else embedding.new_zeros(len(h), 0)
        return SlideOutput(
            logits=logits, embedding=embedding, attention=attn, extras={"region_tokens": tokens}
        )


class HIPTAttentionPooling(nn.Module):
    """Attention pooling only, at patch and region level (official ``HIPT_None_FC``, "small" size)."""

    # survival training sets the classifier bias to the baseline hazards (the harness's NLL init)
    output_layers = SlideModel.output_layers
    init_output_bias = SlideModel.init_output_bias

    def __init__(
        self, in_dim: int = 384, n_classes: int = 2, dropout: float = 0.25, hidden_dim: int = 256
    ) -> None:
        super().__init__()
        self.in_dim, self.n_classes, self.embed_dim = int(in_dim), int(n_classes), int(hidden_dim)
        self.local_phi = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.local_attn_pool = GatedAttentionPool(hidden_dim, hidden_dim, dropout)
        self.global_phi = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.global_attn_pool = GatedAttentionPool(hidden_dim, hidden_dim, dropout)
        self.global_rho = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(), nn.Dropout(dropout))
        self.classifier = _embedding_only(n_classes, hidden_dim)
        self.checkpoint_drop_prefixes = ("classifier.",) if self.classifier is None else ()

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """(B, M, T, D) region grids -> SlideOutput; extras["patch_attention"] is (B, M, T)."""
        patch, region, _ = check_region_inputs(x, mask, self.in_dim, "HIPTAttentionPooling")
        x = x.masked_fill(~patch.unsqueeze(-1), 0.0)
        h = self.local_phi(x)  # (B, M, T, L)
        # padded regions have no valid patch: give them a uniform (unused) softmax instead of NaN
        a256 = masked_softmax(self.local_attn_pool(h), patch | ~region.unsqueeze(-1))  # (B, M, T)
        h = self.global_phi((a256.unsqueeze(-1) * h).sum(dim=2))  # (B, M, L)
        attn = masked_softmax(self.global_attn_pool(h), region)  # (B, M)
        embedding = self.global_rho((attn.unsqueeze(-1) * h).sum(dim=1))  # (B, L)
        logits = self.classifier(embedding) if self.classifier is not None else embedding.new_zeros(len(h), 0)
        a256 = a256.masked_fill(~patch, 0.0)
        return SlideOutput(
            logits=logits, embedding=embedding, attention=attn, extras={"patch_attention": a256}
        )


@register_slide_model(
    "hipt",
    description=(
        "HIPT ViT_WSI-4096: ViT_4096 over each region's 16x16 ViT_256 tokens, 2-layer transformer over "
        "regions, gated attention pooling (official HIPT_LGP_FC keys); freeze_4k, vit4k_weights"
    ),
    paper=HIPT_PAPER,
    produces_attention=True,
    input_kind="region_grids",
)
def hipt(
    in_dim: int = 384,
    n_classes: int = 2,
    dropout: float = 0.25,
    freeze_4k: bool = False,
    vit4k_weights: str | None = None,
    mask_patches: bool = True,
) -> HIPT:
    """HIPT_LGP_FC; ``freeze_4k=True`` with ``vit4k_weights`` is the paper's finetuning recipe."""
    return HIPT(in_dim, n_classes, dropout, freeze_4k, vit4k_weights, mask_patches)


@register_slide_model(
    "hipt_ap",
    description=(
        "HIPT ablation AP-256/AP-4096: gated attention pooling over each region's patches, then over "
        "regions, no transformers (official HIPT_None_FC keys)"
    ),
    paper=HIPT_PAPER + " (supplement, Table 4)",
    produces_attention=True,
    input_kind="region_grids",
)
def hipt_ap(
    in_dim: int = 384, n_classes: int = 2, dropout: float = 0.25, hidden_dim: int = 256
) -> HIPTAttentionPooling:
    """HIPT_None_FC ("small": 384 -> 256)."""
    return HIPTAttentionPooling(in_dim, n_classes, dropout, hidden_dim)
