"""``vit_tiny_d4``: a small ViT tile encoder for CPU pretraining runs (``gigaslide pretrain dino``) and the demo.

ViT-Tiny widths (Touvron et al., DeiT, 2021: embedding 192, 3 heads, MLP ratio 4, patch 16) with
4 blocks instead of 12, in the DINO/HIPT ViT layout (:class:`~gigaslide.models.layers.vit.VisionTransformer`:
CLS token output, LayerNorm eps 1e-6, position embeddings interpolated for other input sizes, so
DINO's 96 px local crops pass through). No public weights exist: pretrain it with
``gigaslide pretrain dino TILES --encoder vit_tiny_d4`` and load the resulting ``checkpoint.pth``
(its teacher) with ``create_encoder("vit_tiny_d4", weights=...)`` / ``gigaslide embed --weights``.
Input: 128 px tiles (resized from the tiling's size), normalised with mean = std = 0.5 as HIPT's ViT.
"""

from __future__ import annotations

from typing import Any

from gigaslide.models.encoders.registry import EncoderMeta, register_encoder
from gigaslide.models.layers.vit import VisionTransformer

VIT_TINY_D4_META = EncoderMeta(
    name="vit_tiny_d4",
    embed_dim=192,
    input_size=128,
    mean=(0.5, 0.5, 0.5),
    std=(0.5, 0.5, 0.5),
    mpp=1.0,
    paper="Caron et al., Emerging Properties in Self-Supervised Vision Transformers (DINO), ICCV 2021",
    description=(
        "small ViT (patch 16, 192-d, 4 blocks, 3 heads), CLS token; no public weights: pretrain with "
        "`gigaslide pretrain dino` (CPU-sized; the demo's encoder)"
    ),
)


class ViTTinyD4(VisionTransformer):
    """ViT-Tiny/16 widths, 4 blocks, learned 8x8 position grid (128 px); other sizes are interpolated."""

    #: DINO checkpoints carry the projection head next to the backbone; it is not part of the encoder
    checkpoint_drop_prefixes = ("head.",)

    def __init__(self, img_size: int = 128, drop_path_rate: float = 0.0, **kw: Any) -> None:
        params: dict[str, Any] = {
            "patch_size": 16,
            "embed_dim": 192,
            "depth": 4,
            "num_heads": 3,
            "mlp_ratio": 4.0,
            "qkv_bias": True,
            "norm_eps": 1e-6,
        }
        params.update(kw)
        super().__init__(img_size=img_size, drop_path_rate=drop_path_rate, **params)


@register_encoder(VIT_TINY_D4_META)
def vit_tiny_d4(**kw: Any) -> ViTTinyD4:
    """The small ViT (random init; weights are loaded by ``create_encoder``)."""
    return ViTTinyD4(**kw)
