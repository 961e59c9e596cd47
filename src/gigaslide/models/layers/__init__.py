"""Vision-Transformer building blocks shared by the tile encoders and the hierarchical models."""

from gigaslide.models.layers.attention import Attention
from gigaslide.models.layers.block import Block
from gigaslide.models.layers.dilated_attention import DilatedAttention
from gigaslide.models.layers.mlp import DropPath, Mlp
from gigaslide.models.layers.patch_embed import PatchEmbed
from gigaslide.models.layers.pos_embed import infer_square_grid, resize_pos_embed
from gigaslide.models.layers.vit import VisionTransformer

__all__ = [
    "Attention",
    "Block",
    "DilatedAttention",
    "DropPath",
    "Mlp",
    "PatchEmbed",
    "VisionTransformer",
    "infer_square_grid",
    "resize_pos_embed",
]
