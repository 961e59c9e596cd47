"""SparseConvMIL (Lerousseau et al. 2021) as the Giga-SSL aggregator (Lazard et al. 2023).

Tile embeddings (B, N, D) are placed on a sparse 2-D map at their coordinates divided by
``grid_unit`` (relative to each bag's top-left tile, so the map does not depend on where the slide
lies); tiles falling on the same cell are averaged. The map goes through the fourth stage of a
ResNet-18 as sparse convolutions: two basic blocks D -> 512, the first with a 3x3 stride-2
convolution and a stride-2 1x1 shortcut, then 3x3 submanifold convolutions, batch norm and ReLU;
global average pooling over the active sites gives the 512-d slide embedding.

Module names are torchvision's (``layer4.0.conv1``, ``layer4.0.downsample.0``, ...), so the stage is
initialised from a ResNet-18 checkpoint's ``layer4.*`` as it is (``layer4_weights=``), and on a
fully active map it computes exactly ``torchvision.models.resnet18().layer4``.

``n_classes=0`` builds the embedding-only aggregator of Giga-SSL pretraining: ``logits`` is an empty
(B, 0) tensor. Otherwise a linear head maps the embedding to ``n_classes`` logits.

Coordinates: ``coords`` (B, N, 2) are (x, y) in any unit; ``grid_unit`` is the size of one map cell in
that unit. The Giga-SSL data views give coordinates in tile-grid units (one tile, one cell, the
default ``grid_unit=1``); with level-0 coordinates from a feature file pass the tile stride in level-0
pixels (``spec.level0_stride``), or ``224 * spec.scale`` for the paper's d = 224 at the tiling resolution.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from gigaslide.models.layers.sparse_conv import (
    SparseBatchNorm,
    SparseConv2d,
    SparseMap,
    SparseReLU,
    sparse_add,
    sparse_global_avg_pool,
)
from gigaslide.models.slide.base import SlideModel, SlideOutput
from gigaslide.models.slide.registry import register_slide_model

#: keys of a full ResNet-18 checkpoint that the sparse stage does not use
RESNET_NON_LAYER4 = ("conv1.", "bn1.", "layer1.", "layer2.", "layer3.", "fc.")


class SparseBasicBlock(nn.Module):
    """ResNet basic block on a sparse map: conv3x3(stride) -> BN -> ReLU -> conv3x3 -> BN, + shortcut, ReLU."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = SparseConv2d(in_channels, channels, 3, stride, 1)
        self.bn1 = SparseBatchNorm(channels)
        self.relu = SparseReLU()
        self.conv2 = SparseConv2d(channels, channels, 3, 1, 1)
        self.bn2 = SparseBatchNorm(channels)
        self.downsample: nn.Sequential | None = None
        if stride != 1 or in_channels != channels:
            self.downsample = nn.Sequential(
                SparseConv2d(in_channels, channels, 1, stride, 0), SparseBatchNorm(channels)
            )

    def forward(self, x: SparseMap) -> SparseMap:
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(sparse_add(out, identity))


def sparse_resnet_stage(in_channels: int, channels: int = 512, n_blocks: int = 2) -> nn.Sequential:
    """A ResNet stage of ``n_blocks`` sparse basic blocks, the first one strided: ResNet-18's ``layer4``."""
    blocks = [SparseBasicBlock(in_channels, channels, stride=2)]
    blocks += [SparseBasicBlock(channels, channels) for _ in range(n_blocks - 1)]
    stage = nn.Sequential(*blocks)
    for m in stage.modules():  # torchvision's ResNet initialisation
        if isinstance(m, SparseConv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, SparseBatchNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return stage


def bags_to_sparse_map(x: Tensor, coords: Tensor, mask: Tensor, grid_unit: float) -> SparseMap:
    """Valid tiles of x (B, N, D) at cells ``floor((coords - bag min) / grid_unit)`` -> a SparseMap.

    ``coords`` (B, N, 2) are (x, y); tiles on the same cell are averaged.
    """
    b_idx, n_idx = mask.nonzero(as_tuple=True)
    c = coords.to(torch.float64)
    big = torch.finfo(torch.float64).max
    lo = c.masked_fill(~mask.unsqueeze(-1), big).amin(dim=1)  # (B, 2) top-left corner of each bag
    cells = torch.floor((c[b_idx, n_idx] - lo[b_idx]) / grid_unit).long()  # (P, 2) = (cx, cy)
    points = torch.stack([b_idx, cells[:, 1], cells[:, 0]], dim=1)  # (P, 3) = (batch, y, x)
    return SparseMap.from_points(x[b_idx, n_idx], points, batch_size=x.shape[0])


class SparseConvMIL(SlideModel):
    """Sparse-convolution MIL aggregator; see the module docstring.

    Args:
        in_dim: tile feature dimension D (256 for the Giga-SSL ResNet-18 tile embedder).
        n_classes: number of logits; 0 = embedding only (self-supervised pretraining).
        width: channels of the sparse stage = embedding size (512 in ResNet-18).
        n_blocks: basic blocks in the stage (2 in ResNet-18).
        grid_unit: size of one map cell in the coordinates' unit (see the module docstring).
        layer4_weights: optional ResNet-18 checkpoint whose ``layer4.*`` initialises the stage
            (loaded strictly; needs in_dim=256 and width=512).
    """

    def __init__(
        self,
        in_dim: int,
        n_classes: int,
        width: int = 512,
        n_blocks: int = 2,
        grid_unit: float = 1.0,
        layer4_weights: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(in_dim, n_classes)
        if grid_unit <= 0:
            raise ValueError(f"grid_unit must be positive, got {grid_unit}")
        if n_blocks < 1:
            raise ValueError(f"n_blocks must be >= 1, got {n_blocks}")
        self.grid_unit = float(grid_unit)
        self.layer4 = sparse_resnet_stage(in_dim, width, n_blocks)
        self.embed_dim = int(width)
        self.classifier = nn.Linear(width, n_classes) if n_classes > 0 else None
        self.layer4_info: dict[str, Any] | None = None
        if layer4_weights is not None:
            self.layer4_info = self.load_layer4(layer4_weights)

    def load_layer4(self, path: str | os.PathLike[str]) -> dict[str, Any]:
        """Initialise the sparse stage from a (full or truncated) ResNet checkpoint's ``layer4.*``, strictly."""
        from gigaslide.models.weights import load_weights

        holder = nn.Module()
        holder.layer4 = self.layer4
        holder.checkpoint_drop_prefixes = RESNET_NON_LAYER4  # type: ignore[assignment]
        return load_weights(holder, path, strict=True)

    def sparse_map(self, x: Tensor, coords: Tensor, mask: Tensor) -> SparseMap:
        """The input sparse map of a batch (what the stage convolves)."""
        return bags_to_sparse_map(x, coords, mask, self.grid_unit)

    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        if coords is None:  # input_kind "features_coords": the harness always passes them
            raise ValueError("SparseConvMIL needs tile coordinates: pass coords (B, N, 2)")
        out = self.layer4(self.sparse_map(x, coords, mask))
        embedding = sparse_global_avg_pool(out)  # (B, width)
        if self.classifier is None:
            logits = embedding.new_zeros(embedding.shape[0], 0)
        else:
            logits = self.classifier(embedding)
        return SlideOutput(logits=logits, embedding=embedding)


@register_slide_model(
    "sparseconvmil",
    description=(
        "Tile features on a sparse 2-D map (coords / grid_unit), ResNet-18 layer4 as sparse convolutions, "
        "global average pooling over active sites (512-d); n_classes=0 = embedding only (Giga-SSL)"
    ),
    paper=(
        "Lerousseau et al., SparseConvMIL, MICCAI workshop 2021; Lazard et al., Giga-SSL, CVPR Workshops 2023"
    ),
    produces_attention=False,
    input_kind="features_coords",
)
def sparseconvmil(
    in_dim: int,
    n_classes: int,
    width: int = 512,
    n_blocks: int = 2,
    grid_unit: float = 1.0,
    layer4_weights: str | os.PathLike[str] | None = None,
) -> SparseConvMIL:
    """SparseConvMIL with ResNet-18's fourth stage."""
    return SparseConvMIL(in_dim, n_classes, width, n_blocks, grid_unit, layer4_weights)
