"""A plain Vision Transformer with a CLS token (the DINO ViT layout), exposing attention maps.

Parameter names follow the DINO/timm layout (``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.N.{norm1,attn.qkv,attn.proj,norm2,mlp.fc1,mlp.fc2}``, ``norm``), so DINO and timm
checkpoints load without renaming. The position embeddings are resized on the fly when the
input grid differs from the grid the model was built for.
"""

from __future__ import annotations

import torch
from torch import nn

from gigaslide.models.layers.block import block_stack
from gigaslide.models.layers.patch_embed import PatchEmbed
from gigaslide.models.layers.pos_embed import resize_pos_embed


def init_vit_weights(vit: nn.Module) -> None:
    """The DINO/timm ViT init: truncated-normal (std 0.02) ``pos_embed``, ``cls_token`` and linear weights,
    zero biases, unit LayerNorms."""
    nn.init.trunc_normal_(vit.pos_embed, std=0.02)
    nn.init.trunc_normal_(vit.cls_token, std=0.02)
    for m in vit.modules():
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class VisionTransformer(nn.Module):
    """ViT encoder returning the final-normalised CLS token (B, D).

    ``img_size`` fixes the size of the learned position-embedding grid
    (``img_size / patch_size`` per side); other input sizes are handled by interpolation.
    ``patch_embed`` may be replaced by any module with ``forward(x) -> (B, N, D)`` and
    ``grid_shape(x) -> (rows, cols)``; ``grid`` then gives the learned grid explicitly.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        norm_eps: float = 1e-6,
        patch_embed: nn.Module | None = None,
        grid: tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        self.embed_dim = self.num_features = int(embed_dim)
        self.patch_embed = patch_embed or PatchEmbed(patch_size, in_chans, embed_dim)
        if grid is None:
            if img_size % patch_size:
                raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
            grid = (img_size // patch_size, img_size // patch_size)
        self.grid = (int(grid[0]), int(grid[1]))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(drop_rate)
        self.blocks = block_stack(
            depth,
            embed_dim,
            num_heads,
            mlp_ratio,
            qkv_bias,
            drop_rate,
            attn_drop_rate,
            drop_path_rate,
            norm_eps,
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Truncated-normal (std 0.02) init for tokens and linear weights, unit LayerNorms."""
        init_vit_weights(self)

    def interpolate_pos_encoding(self, grid: tuple[int, int]) -> torch.Tensor:
        """Position embeddings (1, 1 + rows*cols, D) for a token grid, resized from the learned grid."""
        return resize_pos_embed(self.pos_embed, grid, self.num_prefix_tokens, old_grid=self.grid)

    def prepare_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Input -> (B, 1 + N, D): patch tokens with the CLS token prepended and positions added."""
        grid = self.patch_embed.grid_shape(x)
        tokens = self.patch_embed(x)  # (B, N, D)
        cls = self.cls_token.expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        tokens = torch.cat([cls, tokens], dim=1)  # (B, 1 + N, D)
        tokens = tokens + self.interpolate_pos_encoding(grid)
        return self.pos_drop(tokens)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 1 + N, D) final-normalised tokens, CLS first."""
        x = self.prepare_tokens(x)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, D) CLS embedding.

        In eval mode the last block computes the CLS row only (:meth:`Block.forward_query`): the
        same embedding (to float rounding) for about 7% fewer multiply-adds in a 12-block ViT-S/16
        at 256 px. Training mode runs every row, so dropout draws stay those of the full forward.
        """
        if self.training or not len(self.blocks):
            return self.forward_features(x)[:, 0]
        t = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            t = blk(t)
        return self.norm(self.blocks[-1].forward_query(t, n_query=1))[:, 0]  # (B, D)

    def get_last_selfattention(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, heads, 1 + N, 1 + N) softmax attention of the last block (CLS first)."""
        x = self.prepare_tokens(x)
        for blk in self.blocks[:-1]:
            x = blk(x)
        _, attn = self.blocks[-1](x, return_attention=True)
        return attn

    def get_intermediate_layers(self, x: torch.Tensor, n: int = 1) -> list[torch.Tensor]:
        """Final-normalised tokens (B, 1 + N, D) of each of the last ``n`` blocks, oldest first."""
        if not 1 <= n <= len(self.blocks):
            raise ValueError(f"n must be in [1, {len(self.blocks)}], got {n}")
        x = self.prepare_tokens(x)
        out: list[torch.Tensor] = []
        for i, blk in enumerate(self.blocks):
            x = blk(x)
            if i >= len(self.blocks) - n:
                out.append(self.norm(x))
        return out
