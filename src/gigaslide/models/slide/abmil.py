"""Attention-based MIL (Ilse, Tomczak & Welling, ICML 2018), plain and gated.

Tiles are projected ``h_k = ReLU(W_1 x_k)`` (hidden_dims[0], as in CLAM's "small" configuration:
in_dim -> 512 -> 256), scored, and pooled ``z = sum_k a_k h_k`` with

    plain:  a_k = softmax_k( w^T tanh(V h_k) )
    gated:  a_k = softmax_k( w^T (tanh(V h_k) * sigmoid(U h_k)) )

The softmax runs over the valid tiles of each bag only. The gated variant is the aggregator used by
CLAM and by the end-to-end whole-slide training paper ("GMA").
"""

from __future__ import annotations

from torch import Tensor, nn

from gigaslide.models.slide.base import SlideModel, SlideOutput, classifier_head, masked_softmax, mlp_block
from gigaslide.models.slide.registry import register_slide_model


class AttentionScorer(nn.Module):
    """Ilse's attention network: h (B, N, L) -> unnormalised scores (B, N) = w^T tanh(V h)."""

    def __init__(self, dim: int, attn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, h: Tensor) -> Tensor:
        return self.w(self.V(h)).squeeze(-1)


class GatedAttentionScorer(nn.Module):
    """Gated attention: h (B, N, L) -> scores (B, N) = w^T (tanh(V h) * sigmoid(U h))."""

    def __init__(self, dim: int, attn_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.V = nn.Sequential(nn.Linear(dim, attn_dim), nn.Tanh(), nn.Dropout(dropout))
        self.U = nn.Sequential(nn.Linear(dim, attn_dim), nn.Sigmoid(), nn.Dropout(dropout))
        self.w = nn.Linear(attn_dim, 1, bias=False)  # a bias would cancel in the softmax

    def forward(self, h: Tensor) -> Tensor:
        return self.w(self.V(h) * self.U(h)).squeeze(-1)


class ABMIL(SlideModel):
    """Attention MIL with a tile projection, an attention scorer and a linear classifier.

    Args:
        in_dim: tile feature dimension D.
        n_classes: number of outputs C (classes, or time bins for survival); 0 = embedding only.
        hidden_dims: (L, A) = (projection width, attention width); default (512, 256).
        dropout: dropout after the projection and inside the attention branches (default 0.25).
        gated: use the gated attention scorer.
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims: tuple[int, int] = (512, 256),
        dropout: float = 0.25,
        gated: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        proj_dim, attn_dim = hidden_dims
        self.project = mlp_block(in_dim, proj_dim, dropout)
        scorer = GatedAttentionScorer if gated else AttentionScorer
        self.attention = scorer(proj_dim, attn_dim, dropout)
        self.classifier = classifier_head(proj_dim, n_classes)
        self.embed_dim = proj_dim

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        h = self.project(x)  # (B, N, L)
        attn = masked_softmax(self.attention(h), mask)  # (B, N)
        embedding = (attn.unsqueeze(-1) * h).sum(dim=1)  # (B, L)
        return SlideOutput(logits=self.classifier(embedding), embedding=embedding, attention=attn)


@register_slide_model(
    "abmil",
    description="Attention MIL: a_k = softmax(w^T tanh(V h_k)), attention-weighted mean of projected tiles.",
    paper="Ilse, Tomczak & Welling, Attention-based Deep Multiple Instance Learning, ICML 2018",
    produces_attention=True,
)
def abmil(
    in_dim: int, n_classes: int, hidden_dims: tuple[int, int] = (512, 256), dropout: float = 0.25
) -> ABMIL:
    """Plain attention MIL."""
    return ABMIL(in_dim, n_classes, hidden_dims=hidden_dims, dropout=dropout, gated=False)


@register_slide_model(
    "gated_abmil",
    description="Gated attention MIL: a_k = softmax(w^T (tanh(V h_k) * sigmoid(U h_k))).",
    paper="Ilse, Tomczak & Welling, ICML 2018 (gated variant); aggregator of CLAM and of end-to-end slide training",
    produces_attention=True,
)
def gated_abmil(
    in_dim: int, n_classes: int, hidden_dims: tuple[int, int] = (512, 256), dropout: float = 0.25
) -> ABMIL:
    """Gated attention MIL."""
    return ABMIL(in_dim, n_classes, hidden_dims=hidden_dims, dropout=dropout, gated=True)
