"""HIPT ViT_256-16: the DINO-pretrained ViT-S/16 that embeds 256x256 tiles at 20x (Chen et al., CVPR 2022).

Architecture (HIPT paper and its public code): ViT-Small, patch 16, embedding 384, 12 blocks,
6 heads, MLP ratio 4, qkv bias, LayerNorm eps 1e-6, output = final-normalised CLS token.
The public checkpoint ``vit256_small_dino.pth`` is a DINO training checkpoint: its ``teacher``
entry holds ``backbone.``-prefixed backbone keys plus the DINO projection ``head.`` keys, and its
position embeddings cover a 14x14 grid (the 224 px crops of DINO training). The model keeps that
14x14 table as it is (loading strips the prefix and drops the head, nothing is resampled) and
interpolates it once per forward pass to the input's grid, exactly as the official
``interpolate_pos_encoding`` does (bicubic, ``scale_factor = (n + 0.1) / 14``): 16x16 at 256 px,
the table itself at 224 px, 32x32 at 512 px. Resizing the table at load time and again at forward
time would compound two interpolations and drift from the official features at every size but 256.
Normalisation: HIPT's public evaluation transforms use mean = std = (0.5, 0.5, 0.5).
"""

from __future__ import annotations

from typing import Any

from gigaslide.models.encoders.registry import EncoderMeta, register_encoder
from gigaslide.models.layers.vit import VisionTransformer

HIPT_PAPER = (
    "Chen et al., Scaling Vision Transformers to Gigapixel Images via Hierarchical Self-Supervised "
    "Learning (HIPT), CVPR 2022"
)

HIPT_VIT256_META = EncoderMeta(
    name="hipt_vit256",
    embed_dim=384,
    input_size=256,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    mpp=0.5,
    paper=HIPT_PAPER,
    description=(
        "HIPT ViT_256-16 (ViT-S/16, DINO on 104M TCGA 256px tiles at 20x), CLS token; "
        "normalisation mean=std=0.5 as in HIPT's public code; weights: vit256_small_dino.pth"
    ),
)


class HIPTViT256(VisionTransformer):
    """ViT_256-16 with the checkpoint's 14x14 learned position grid, interpolated to every input size."""

    #: DINO checkpoints carry the projection head next to the backbone; it is not part of the encoder
    checkpoint_drop_prefixes = ("head.",)

    def __init__(self, img_size: int = 224, drop_path_rate: float = 0.0, **kw: Any) -> None:
        params: dict[str, Any] = {
            "patch_size": 16,
            "embed_dim": 384,
            "depth": 12,
            "num_heads": 6,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "norm_eps": 1e-6,
        }
        params.update(kw)
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, **params)


@register_encoder(HIPT_VIT256_META)
def hipt_vit256(**kw: Any) -> HIPTViT256:
    """HIPT ViT_256-16 (random init; weights are loaded by ``create_encoder``)."""
    return HIPTViT256(**kw)
