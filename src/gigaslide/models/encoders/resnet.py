"""Truncated ResNets: the ImageNet ResNet-50 baseline of CLAM/HIPT and the Giga-SSL ResNet-18 tile embedder.

Both keep the first three residual stages of a torchvision ResNet and average-pool the last feature
map. Module names are torchvision's (``conv1``, ``bn1``, ``layer1``..``layer3``), so full
torchvision or timm ResNet checkpoints load strictly once their ``layer4.*`` and ``fc.*`` keys are
dropped, the only keys these models declare as droppable.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from gigaslide.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gigaslide.models.encoders.registry import EncoderMeta, register_encoder

RESNET50_TRUNC_META = EncoderMeta(
    name="resnet50_trunc",
    embed_dim=1024,
    input_size=256,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=0.5,
    paper=(
        "Lu et al., Data-efficient and weakly supervised computational pathology on whole-slide images "
        "(CLAM), Nat. Biomed. Eng. 2021; baseline in HIPT (CVPR 2022)"
    ),
    description=(
        "ResNet-50 truncated after the 3rd residual stage (layer3) + global average pool, 1024-d; "
        "ImageNet weights (torchvision resnet50 checkpoint); 256px tiles at 20x (224 also fine)"
    ),
)

RESNET18_TRUNC_META = EncoderMeta(
    name="resnet18_trunc",
    embed_dim=256,
    input_size=256,
    mean=IMAGENET_MEAN,
    std=IMAGENET_STD,
    mpp=1.0,
    paper="Lazard et al., Giga-SSL: Self-Supervised Learning for Gigapixel Images, CVPR Workshops 2023",
    description=(
        "ResNet-18 cut before its 4th stage (layer3) + global average pool, 256-d: the Giga-SSL tile "
        "embedder (MoCo-pretrained on TCGA 256px tiles at 10x, ~1 um/px); ImageNet normalisation"
    ),
)


class TruncatedResNet(nn.Module):
    """conv1 -> bn1 -> relu -> maxpool -> layer1..layer3 -> global average pool: (B, 3, H, W) -> (B, C)."""

    #: keys of a full ResNet checkpoint that this truncated model does not use
    checkpoint_drop_prefixes = ("layer4.", "fc.")

    def __init__(self, full: nn.Module) -> None:
        super().__init__()
        self.conv1 = full.conv1
        self.bn1 = full.bn1
        self.relu = full.relu
        self.maxpool = full.maxpool
        self.layer1 = full.layer1
        self.layer2 = full.layer2
        self.layer3 = full.layer3
        self.pool = nn.AdaptiveAvgPool2d(1)
        last = self.layer3[-1]
        self.num_features = self.embed_dim = int((getattr(last, "bn3", None) or last.bn2).num_features)

    @property
    def trunk(self) -> nn.Sequential:
        """The convolutional part (B, 3, H, W) -> (B, C, H/16, W/16) sharing this model's modules."""
        return nn.Sequential(
            self.conv1, self.bn1, self.relu, self.maxpool, self.layer1, self.layer2, self.layer3
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C, H/16, W/16) layer3 feature map."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        return self.layer3(self.layer2(self.layer1(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, C) average-pooled layer3 features."""
        return self.pool(self.forward_features(x)).flatten(1)


@register_encoder(RESNET50_TRUNC_META)
def resnet50_trunc(**kw: Any) -> TruncatedResNet:
    """ResNet-50 up to layer3 (1024-d), random init; ``kw`` go to ``torchvision.models.resnet50``."""
    from torchvision.models import resnet50

    return TruncatedResNet(resnet50(weights=None, **kw))


@register_encoder(RESNET18_TRUNC_META)
def resnet18_trunc(**kw: Any) -> TruncatedResNet:
    """ResNet-18 up to layer3 (256-d), random init; ``kw`` go to ``torchvision.models.resnet18``."""
    from torchvision.models import resnet18

    return TruncatedResNet(resnet18(weights=None, **kw))
