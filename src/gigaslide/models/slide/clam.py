"""CLAM-SB: single-branch clustering-constrained attention MIL (Lu et al., Nature BME 2021).

Bag branch: gated attention MIL (projection in_dim -> 512, attention width 256, one attention branch).
Instance branch: one binary instance classifier per class. In training, for a bag of class y the
``k`` most attended tiles are pseudo-positives and the ``k`` least attended pseudo-negatives for the
classifier of class y ("in-the-class" clustering). With ``subtyping=True`` (mutually exclusive classes)
the ``k`` most attended tiles are also pseudo-negatives for every other class's classifier. Instance
losses use cross-entropy (CLAM's alternative SmoothTop1SVM is not implemented).

Loss weighting: CLAM trains ``c1 * bag_loss + (1 - c1) * instance_loss`` with ``c1 = bag_weight = 0.7``.
This model returns ``aux_loss = (1 - c1) / c1 * instance_loss`` so that ``bag_loss + aux_loss`` is that
objective divided by c1 (same minimiser, same gradient direction). The raw instance loss is in
``extras["instance_loss"]``. Bags with fewer than 2 valid tiles have no pseudo-labels and contribute
nothing; ``k`` shrinks to ``n_valid // 2`` for bags smaller than ``2k``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from gigaslide.models.slide.abmil import GatedAttentionScorer
from gigaslide.models.slide.base import SlideModel, SlideOutput, classifier_head, masked_softmax, mlp_block
from gigaslide.models.slide.registry import register_slide_model


@register_slide_model(
    "clam_sb",
    description="CLAM single-branch: gated attention MIL plus top-k/bottom-k instance clustering loss.",
    paper="Lu et al., Data-efficient and weakly supervised computational pathology on WSIs, Nat. BME 2021",
    produces_attention=True,
)
class CLAMSB(SlideModel):
    """CLAM-SB aggregator.

    Args:
        in_dim: tile feature dimension D.
        n_classes: number of classes C; 0 = embedding only (no instance classifiers, labels refused).
        hidden_dims: (projection width, attention width); CLAM "small" = (512, 256), "big" = (512, 384).
        dropout: dropout after the projection and in the attention branches (CLAM default 0.25).
        k_sample: number of top / bottom attended tiles used as instance pseudo-labels (default 8).
        bag_weight: CLAM's c1 (default 0.7); see the module docstring for how aux_loss uses it.
        subtyping: also apply the out-of-the-class constraint (mutually exclusive classes).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        hidden_dims: tuple[int, int] = (512, 256),
        dropout: float = 0.25,
        k_sample: int = 8,
        bag_weight: float = 0.7,
        subtyping: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if k_sample < 1:
            raise ValueError(f"CLAMSB: k_sample must be >= 1, got {k_sample}")
        if not 0.0 < bag_weight <= 1.0:
            raise ValueError(f"CLAMSB: bag_weight (CLAM's c1) must be in (0, 1], got {bag_weight}")
        proj_dim, attn_dim = hidden_dims
        self.project = mlp_block(in_dim, proj_dim, dropout)
        self.attention = GatedAttentionScorer(proj_dim, attn_dim, dropout)
        self.classifier = classifier_head(proj_dim, n_classes)
        self.instance_classifiers = nn.ModuleList(nn.Linear(proj_dim, 2) for _ in range(n_classes))
        self.k_sample = int(k_sample)
        self.bag_weight = float(bag_weight)
        self.subtyping = bool(subtyping)
        self.embed_dim = proj_dim

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        h = self.project(x)  # (B, N, L)
        scores = self.attention(h)  # (B, N)
        attn = masked_softmax(scores, mask)  # (B, N)
        embedding = (attn.unsqueeze(-1) * h).sum(dim=1)  # (B, L)
        out = SlideOutput(logits=self.classifier(embedding), embedding=embedding, attention=attn)
        if labels is not None:
            if self.n_classes == 0:
                raise ValueError(
                    "CLAMSB with n_classes=0 is embedding-only and has no instance classifiers; pass labels=None"
                )
            inst_loss = self.instance_loss(h, scores, mask, labels)
            out.extras["instance_loss"] = inst_loss
            out.aux_loss = (1.0 - self.bag_weight) / self.bag_weight * inst_loss
        return out

    def instance_loss(self, h: Tensor, scores: Tensor, mask: Tensor, labels: Tensor) -> Tensor:
        """Mean over bags of CLAM's instance clustering loss.

        h (B, N, L) projected tiles, scores (B, N) attention logits, mask (B, N), labels (B,) long.
        """
        if labels.min() < 0 or labels.max() >= self.n_classes:
            raise ValueError(f"CLAMSB: labels must lie in [0, {self.n_classes - 1}], got {labels.tolist()}")
        per_bag: list[Tensor] = []
        for b in range(h.shape[0]):
            valid = mask[b].nonzero().flatten()
            k = min(self.k_sample, valid.numel() // 2)
            if k == 0:
                continue
            hb, sb = h[b, valid], scores[b, valid]  # (n, L), (n,)
            order = torch.argsort(sb, descending=True, stable=True)
            top, bottom = hb[order[:k]], hb[order[-k:]]  # (k, L) each
            y = int(labels[b])
            loss = self._ce(self.instance_classifiers[y], top, bottom)
            if self.subtyping:
                for c in range(self.n_classes):
                    if c != y:
                        neg = torch.zeros(k, dtype=torch.long, device=h.device)
                        loss = loss + F.cross_entropy(self.instance_classifiers[c](top), neg)
                loss = loss / self.n_classes
            per_bag.append(loss)
        if not per_bag:
            return h.sum() * 0.0  # no bag had 2 tiles: a zero that keeps the graph connected
        return torch.stack(per_bag).mean()

    @staticmethod
    def _ce(classifier: nn.Module, positives: Tensor, negatives: Tensor) -> Tensor:
        """Cross-entropy of a binary instance classifier on pseudo-positive and pseudo-negative tiles."""
        inputs = torch.cat([positives, negatives], dim=0)  # (2k, L)
        targets = torch.cat(
            [
                torch.ones(positives.shape[0], dtype=torch.long, device=inputs.device),
                torch.zeros(negatives.shape[0], dtype=torch.long, device=inputs.device),
            ]
        )
        return F.cross_entropy(classifier(inputs), targets)
