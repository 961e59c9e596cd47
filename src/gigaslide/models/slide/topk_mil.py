"""Instance-level top-k MIL (Campanella et al., Nature Medicine 2019), on tile features.

A tile classifier scores every tile; the tiles are ranked by their probability of not being the
first class (for two classes: the positive-class probability ``p_1``), and the slide prediction is
made from the k top-ranked tiles: ``logits = mean of their tile logits`` (k = 1 in the paper: the
slide is as positive as its most suspicious tile). Training follows the paper's MIL step: each of the
k top tiles is a training instance carrying the slide label, i.e. the loss is the mean over the k
tiles of the tile loss (:meth:`TopKMIL.loss_streams`); tiles outside the top k get no gradient.

Campanella et al. train a ResNet-34 end to end on pixels; here the tile classifier runs on frozen
tile features (a linear layer, or Linear-ReLU-Dropout-Linear with ``hidden_dim``). Their second
stage (an RNN over the top-S tiles) is not part of this model.

``attention`` is the tile score (p(not class 0)) normalised to sum to 1 over the valid tiles, for
heatmaps; the raw scores are ``extras["tile_scores"]`` and the tile logits ``extras["tile_logits"]``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from gigaslide.models.slide.base import SlideModel, SlideOutput, mlp_block
from gigaslide.models.slide.registry import register_slide_model


@register_slide_model(
    "topk_mil",
    description="Instance-level MIL: a tile classifier; the k top-scoring tiles give the slide prediction.",
    paper="Campanella et al., Clinical-grade computational pathology using weakly supervised deep "
    "learning on whole slide images, Nature Medicine 2019",
    produces_attention=True,
)
class TopKMIL(SlideModel):
    """Top-k instance MIL.

    Args:
        in_dim: tile feature dimension D.
        n_classes: number of outputs C (>= 2 for the ranking to be meaningful). With 0 (embedding only)
            one sigmoid tile score still ranks the tiles; the embedding is the mean of the top-k
            projected tiles and logits are (B, 0).
        k: tiles per slide used for the prediction and the loss (default 1, as in the paper).
        hidden_dim: width of a hidden layer in the tile classifier (None = linear classifier).
        dropout: dropout after the hidden layer.
    """

    def __init__(
        self, in_dim: int, n_classes: int, k: int = 1, hidden_dim: int | None = None, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dim, n_classes)
        if k < 1:
            raise ValueError(f"topk_mil: k must be >= 1, got {k}")
        self.k = int(k)
        self.project: nn.Module = (
            nn.Identity() if hidden_dim is None else mlp_block(in_dim, hidden_dim, dropout)
        )
        width = in_dim if hidden_dim is None else hidden_dim
        self.classifier = nn.Linear(width, max(n_classes, 1))  # one ranking score when embedding-only
        self.embed_dim = width

    def tile_scores(self, tile_logits: Tensor) -> Tensor:
        """(B, N) ranking score of each tile: probability of not being class 0."""
        if tile_logits.shape[-1] == 1:
            return torch.sigmoid(tile_logits[..., 0])
        return 1.0 - torch.softmax(tile_logits, dim=-1)[..., 0]

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        h = self.project(x)  # (B, N, E)
        tile_logits = self.classifier(h)  # (B, N, C)
        scores = self.tile_scores(tile_logits).masked_fill(~mask, -1.0)  # (B, N); padding ranks last
        k = min(self.k, x.shape[1])
        top = scores.topk(k, dim=1).indices  # (B, k)
        valid = mask.gather(1, top)  # (B, k): False where a bag has fewer than k tiles
        # a bag with fewer than k tiles repeats its best tile in the empty slots (loss streams only)
        top = torch.where(valid, top, top[:, :1].expand_as(top))
        picked = tile_logits.gather(1, top.unsqueeze(-1).expand(-1, -1, tile_logits.shape[-1]))  # (B, k, C)
        w = valid.to(picked.dtype).unsqueeze(-1)  # (B, k, 1)
        logits = (picked * w).sum(dim=1) / w.sum(dim=1)  # (B, C)
        embedding = (h.gather(1, top.unsqueeze(-1).expand(-1, -1, h.shape[-1])) * w).sum(dim=1) / w.sum(dim=1)
        if self.n_classes == 0:
            logits = logits[:, :0]  # (B, 0): the tile scorer only ranks
        raw = self.tile_scores(tile_logits).masked_fill(~mask, 0.0)  # (B, N)
        attention = raw / raw.sum(dim=1, keepdim=True).clamp_min(1e-12)
        return SlideOutput(
            logits=logits,
            embedding=embedding,
            attention=attention,
            extras={"tile_logits": tile_logits, "tile_scores": raw, "top_tiles": top, "top_logits": picked},
        )

    def loss_streams(self, out: SlideOutput) -> list[tuple[float, Tensor]]:
        """Each of the k top tiles is an instance with the slide label: the mean of their losses."""
        picked = out.extras["top_logits"]  # (B, k, C)
        k = picked.shape[1]
        return [(1.0 / k, picked[:, j]) for j in range(k)]
