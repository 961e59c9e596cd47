"""DS-MIL: dual-stream MIL (Li, Li & Eliceiri, CVPR 2021).

Stream 1 (max-pooling): an instance classifier scores every tile; per class the highest-scoring tile
is the critical instance and its score is the class's max-instance logit.
Stream 2 (bag): every tile gets a query ``q_k = q(x_k)``; the attention of tile k for class c is
``softmax_k(<q_k, q(x_crit_c)> / sqrt(q_dim))`` (over valid tiles); the bag representation of class c
is ``b_c = sum_k a_kc v(x_k)``, and a Conv1d with kernel D over (C, D) gives the bag logits.

Training and prediction follow the reference code: the loss is ``0.5 * BCE(bag_logits) + 0.5 *
BCE(max_instance_logits)`` with one-hot targets (declared through ``classification_loss = "bce"`` and
:meth:`DSMIL.loss_streams`, which trainers apply), and ``logits`` are the bag stream's. With
``average_streams=True`` the logits are ``(max_instance_logits + bag_logits) / 2`` instead (the
reference's ``--average`` test option).
``embedding`` is the flattened bag representation (B, C * D) and ``attention`` is the mean over
classes of the per-class tile attention (each sums to 1, so the mean does), with per-class maps in
``extras["class_attention"]`` (B, N, C); ``extras["instance_logits"]`` (B, N, C) holds the per-tile
scores (meaningless at padded positions).
"""

from __future__ import annotations

import math

from torch import Tensor, nn

from gigaslide.models.slide.base import SlideModel, SlideOutput, masked_softmax
from gigaslide.models.slide.registry import register_slide_model


@register_slide_model(
    "dsmil",
    description="DS-MIL: max-instance stream + critical-instance attention bag stream; trained on both.",
    paper="Li, Li & Eliceiri, Dual-stream MIL with self-supervised contrastive learning, CVPR 2021",
    produces_attention=True,
)
class DSMIL(SlideModel):
    """DS-MIL aggregator.

    Args:
        in_dim: tile feature dimension D.
        n_classes: number of outputs C. With 0 (embedding only) one critical-instance stream still
            selects the attention, the embedding is its (B, D) bag representation and logits are (B, 0).
        q_dim: query dimension (default 128, as in the reference).
        nonlinear_q: query net Linear-ReLU-Linear-Tanh (default, as in the reference) instead of Linear.
        passing_v: transform values with Dropout-Linear-ReLU instead of passing features through.
        dropout: dropout in the value net (only with ``passing_v``; reference default 0.0).
        average_streams: predict ``(max + bag) / 2`` instead of the bag stream (reference ``--average``).
    """

    classification_loss = "bce"

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        q_dim: int = 128,
        nonlinear_q: bool = True,
        passing_v: bool = False,
        dropout: float = 0.0,
        average_streams: bool = False,
    ) -> None:
        super().__init__(in_dim, n_classes)
        streams = max(n_classes, 1)  # an embedding-only model keeps one stream to find its critical tile
        self.instance_classifier = nn.Linear(in_dim, streams)
        if nonlinear_q:
            self.q: nn.Module = nn.Sequential(
                nn.Linear(in_dim, q_dim), nn.ReLU(), nn.Linear(q_dim, q_dim), nn.Tanh()
            )
        else:
            self.q = nn.Linear(in_dim, q_dim)
        if passing_v:
            self.v: nn.Module = nn.Sequential(nn.Dropout(dropout), nn.Linear(in_dim, in_dim), nn.ReLU())
        else:
            self.v = nn.Identity()
        self.bag_classifier = nn.Conv1d(n_classes, n_classes, kernel_size=in_dim) if n_classes else None
        self.q_dim = q_dim
        self.average_streams = bool(average_streams)
        self.embed_dim = streams * in_dim

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        d = x.shape[-1]
        inst_logits = self.instance_classifier(x)  # (B, N, C)
        masked = inst_logits.masked_fill(~mask.unsqueeze(-1), float("-inf"))
        max_logits, critical = masked.max(dim=1)  # (B, C), (B, C) index of each class's critical tile
        crit_feats = x.gather(1, critical.unsqueeze(-1).expand(-1, -1, d))  # (B, C, D)
        queries = self.q(x)  # (B, N, q)
        q_crit = self.q(crit_feats)  # (B, C, q)
        scores = queries @ q_crit.transpose(1, 2) / math.sqrt(self.q_dim)  # (B, N, C)
        attn = masked_softmax(scores, mask.unsqueeze(-1).expand_as(scores), dim=1)  # (B, N, C)
        bag = attn.transpose(1, 2) @ self.v(x)  # (B, C, D)
        if self.bag_classifier is None:  # embedding only
            return SlideOutput(
                logits=bag.new_zeros(bag.shape[0], 0), embedding=bag.flatten(1), attention=attn[..., 0]
            )
        bag_logits = self.bag_classifier(bag).squeeze(-1)  # (B, C)
        return SlideOutput(
            logits=0.5 * (max_logits + bag_logits) if self.average_streams else bag_logits,
            embedding=bag.flatten(1),
            attention=attn.mean(dim=-1),
            extras={
                "bag_logits": bag_logits,
                "max_instance_logits": max_logits,
                "instance_logits": inst_logits,
                "class_attention": attn,
            },
        )

    def loss_streams(self, out: SlideOutput) -> list[tuple[float, Tensor]]:
        """The reference trains both streams: ``0.5 * loss(bag) + 0.5 * loss(max instance)``."""
        return [(0.5, out.extras["bag_logits"]), (0.5, out.extras["max_instance_logits"])]

    def output_layers(self) -> list[nn.Module]:
        """Both streams produce logits: the bag Conv1d and the instance classifier."""
        return [self.bag_classifier, self.instance_classifier]
