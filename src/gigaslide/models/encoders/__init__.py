"""Tile encoders: ``create_encoder(name, weights=...)`` -> (B, 3, H, W) -> (B, D) modules with metadata.

Registered names: ``hipt_vit256``, ``resnet50_trunc``, ``resnet18_trunc``, ``vit_tiny_d4``; plus ``timm:<architecture>``.
HIPT's region-level ViT_4096 reads token grids, not pixels: ``create_hipt_vit4k`` builds it.
"""

from gigaslide.models.encoders import hipt as _hipt  # noqa: F401  (registers hipt_vit256)
from gigaslide.models.encoders import resnet as _resnet  # noqa: F401  (registers the truncated ResNets)
from gigaslide.models.encoders import small_vit as _small_vit  # noqa: F401  (registers vit_tiny_d4)
from gigaslide.models.encoders.hipt_vit4k import HIPTViT4K, create_hipt_vit4k
from gigaslide.models.encoders.registry import (
    TIMM_PREFIX,
    WEIGHTS_FROM_REGISTRY,
    WEIGHTS_RANDOM,
    EncoderMeta,
    create_encoder,
    get_encoder_meta,
    list_encoders,
    register_encoder,
    resolve_weights,
)

__all__ = [
    "TIMM_PREFIX",
    "WEIGHTS_FROM_REGISTRY",
    "WEIGHTS_RANDOM",
    "EncoderMeta",
    "HIPTViT4K",
    "create_encoder",
    "create_hipt_vit4k",
    "get_encoder_meta",
    "list_encoders",
    "register_encoder",
    "resolve_weights",
]
