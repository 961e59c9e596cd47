"""Parameter-free pooling baselines: masked mean and feature-wise masked max over tiles, then a linear classifier.

With ``hidden_dim`` set, tiles first go through Linear -> ReLU -> Dropout (a learnable instance
projection); without it the slide embedding is the pooled encoder feature itself, which makes these
models linear probes on pooled features (the "GMP" baseline of HIPT).

``feature_max`` takes the maximum of every feature dimension separately (so the pooled vector mixes
tiles); it is not the instance-level max MIL of Campanella et al. 2019, which selects whole tiles by
their score: that is ``topk_mil``. The old name ``max`` still builds ``feature_max``, with a warning.
"""

from __future__ import annotations

import abc

from torch import Tensor, nn

from gigaslide.models.slide.base import (
    SlideModel,
    SlideOutput,
    classifier_head,
    masked_max,
    masked_mean,
    mlp_block,
)
from gigaslide.models.slide.registry import register_slide_model


class _PoolingMIL(SlideModel):
    """Shared structure of the pooling baselines; subclasses pick the reduction."""

    def __init__(
        self, in_dim: int, n_classes: int, hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dim, n_classes)
        if hidden_dim is None:
            self.project: nn.Module = nn.Identity()
            self.embed_dim = in_dim
        else:
            self.project = mlp_block(in_dim, hidden_dim, dropout)
            self.embed_dim = hidden_dim
        self.classifier = classifier_head(self.embed_dim, n_classes)

    @abc.abstractmethod
    def _pool(self, h: Tensor, mask: Tensor) -> Tensor:
        """Reduce tiles h (B, N, E) over valid positions -> (B, E)."""

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        h = self.project(x)  # (B, N, E)
        embedding = self._pool(h, mask)  # (B, E)
        return SlideOutput(logits=self.classifier(embedding), embedding=embedding)


@register_slide_model(
    "mean",
    description="Masked mean of tile features (optionally projected), then a linear classifier.",
    paper="Global mean pooling baseline (e.g. HIPT ablations, Chen et al. 2022)",
    produces_attention=False,
)
class MeanPoolMIL(_PoolingMIL):
    """Mean pooling over valid tiles."""

    def _pool(self, h: Tensor, mask: Tensor) -> Tensor:
        return masked_mean(h, mask)


@register_slide_model(
    "feature_max",
    description="Feature-wise masked max of tile features (optionally projected), then a linear classifier.",
    paper="Feature-wise max pooling baseline (e.g. Wang et al., Revisiting multiple instance neural "
    "networks, Pattern Recognition 2018); for tile-level max MIL see topk_mil",
    produces_attention=False,
)
class MaxPoolMIL(_PoolingMIL):
    """Feature-wise (element-wise) max pooling over valid tiles."""

    def _pool(self, h: Tensor, mask: Tensor) -> Tensor:
        return masked_max(h, mask)
