"""LongViT (Wang et al. 2023): a ViT over a whole slide image with LongNet dilated attention.

The slide image (B, 3, H, W) is cut into 32 x 32 patches, linearly embedded (``patch_embed.proj``, a
stride-32 convolution), given learned position embeddings (interpolated in 2-D when the token grid
differs from the one the model was built for), encoded by a LongNet encoder (ViT-S layout: 12 layers,
384-d, FFN 1,536, 16 heads) and mean-pooled::

    model = create_slide_model("longvit", in_dim=3, n_classes=2, img_size=4096)
    out = model(image)                        # image (B, 3, 4096, 4096) -> SlideOutput
    out = model(image, mask=tissue_tokens)    # optional (B, 128, 128) bool, True = token used

Parameter names follow the reference finetuning model without its ``model.`` prefix
(``patch_embed.proj``, ``pos_embed``, ``encoder.layers.{i}...``, ``fc_norm``, ``head``), so
:func:`gigaslide.models.slide.longvit_weights.longvit_checkpoint_filter` loads public checkpoints.

A token mask is our addition (LongViT attends to every patch): masked tokens are never attended to
and are left out of the mean. ``n_classes=0`` builds an embedding-only model (logits of shape (B, 0)).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from gigaslide.models.layers.longnet import LongNetEncoder
from gigaslide.models.layers.longnet_schedule import longvit_schedule
from gigaslide.models.layers.pos_embed import resize_pos_embed
from gigaslide.models.slide.base import SlideOutput, masked_mean
from gigaslide.models.slide.registry import register_slide_model
from gigaslide.utils.collectives import all_gather_with_grad

POOLING_NORMS = ("fc_norm", "norm")


@register_slide_model(
    "longvit",
    description="ViT-S over the whole slide image with LongNet dilated attention, mean pooling",
    paper="Wang et al. 2023 (LongViT, arXiv:2312.03558)",
    produces_attention=False,
    input_kind="image",
)
class LongViT(nn.Module):
    """LongViT encoder + classifier. ``forward(x (B, 3, H, W), mask=None) -> SlideOutput``.

    Args:
        in_dim: image channels (3).
        n_classes: classifier outputs; 0 = embedding only (``logits`` is an empty (B, 0) tensor).
        img_size: side of the square image the position embeddings are laid out for; also picks the
            Table 7 segment lengths unless ``segment_lengths`` is given.
        patch_size, embed_dim, depth, num_heads, mlp_ratio: ViT-S defaults (32, 384, 12, 16, 4).
        segment_lengths / dilated_ratios: override the schedule.
        drop_path_rate, dropout: regularisation (paper: drop path 0.1).
        checkpoint_activations: recompute each layer in the backward pass (memory for time).
        pooling_norm: ``fc_norm`` (finetuning layout: LayerNorm after the mean) or ``norm``
            (pretraining backbone: LayerNorm eps 1e-6 on every token before the mean).
    """

    num_prefix_tokens = 0

    def __init__(
        self,
        in_dim: int = 3,
        n_classes: int = 0,
        img_size: int = 1024,
        patch_size: int = 32,
        embed_dim: int = 384,
        depth: int = 12,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        segment_lengths: Sequence[int] | None = None,
        dilated_ratios: Sequence[int] | None = None,
        drop_path_rate: float = 0.0,
        dropout: float = 0.0,
        checkpoint_activations: bool = False,
        pooling_norm: str = "fc_norm",
    ) -> None:
        super().__init__()
        if n_classes < 0 or in_dim < 1:
            raise ValueError(f"LongViT needs in_dim >= 1 and n_classes >= 0, got {in_dim}, {n_classes}")
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        if pooling_norm not in POOLING_NORMS:
            raise ValueError(f"pooling_norm must be one of {POOLING_NORMS}, got {pooling_norm!r}")
        self.in_dim, self.n_classes, self.embed_dim = int(in_dim), int(n_classes), int(embed_dim)
        self.patch_size, self.img_size = int(patch_size), int(img_size)
        self.grid = (img_size // patch_size, img_size // patch_size)
        seg_default, rat_default = longvit_schedule(img_size)
        segments = tuple(segment_lengths) if segment_lengths is not None else seg_default
        ratios = tuple(dilated_ratios) if dilated_ratios is not None else rat_default
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(in_dim, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1], embed_dim))
        self.pos_drop = nn.Dropout(dropout)
        self.encoder = LongNetEncoder(
            embed_dim,
            depth,
            num_heads,
            int(embed_dim * mlp_ratio),
            segments,
            ratios,
            drop_path_rate=drop_path_rate,
            dropout=dropout,
            checkpoint_activations=checkpoint_activations,
        )
        self.pooling_norm = pooling_norm
        eps = 1e-5 if pooling_norm == "fc_norm" else 1e-6
        setattr(self, pooling_norm, nn.LayerNorm(embed_dim, eps=eps))
        self.head = nn.Linear(embed_dim, n_classes) if n_classes > 0 else None
        self.seq_group: dist.ProcessGroup | None = None
        self.sequence_parallel = False
        self._init_weights()

    def _init_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02, a=-0.02, b=0.02)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02, a=-0.02, b=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def set_sequence_parallel(self, enabled: bool = True, group: dist.ProcessGroup | None = None) -> None:
        """Split the token sequence over ``group`` (LongNet's sequence parallelism).

        Each rank then passes its own horizontal band of the image: rank ``i`` of ``P`` the rows
        ``[i * H / P, (i + 1) * H / P)`` of an image of exactly ``img_size`` (the position table is
        sliced, not interpolated, as in the reference). Every rank returns the whole slide's outputs and
        computes the same loss; averaging parameter gradients over the group (what DDP does) then gives
        exactly the one-process gradient (input gradients come back multiplied by the group size).
        """
        self.sequence_parallel, self.seq_group = bool(enabled), group
        self.encoder.set_sequence_parallel(enabled, group)

    def _parallel(self) -> tuple[int, int] | None:
        """(rank, world) when the sequence is split over several processes, else None."""
        if self.sequence_parallel and dist.is_available() and dist.is_initialized():
            world = dist.get_world_size(self.seq_group)
            if world > 1:
                return dist.get_rank(self.seq_group), world
        return None

    def set_input_size(self, img_size: int) -> None:
        """Use the Table 7 schedule of ``img_size`` (weights, including ``pos_embed``, unchanged)."""
        self.encoder.set_schedule(*longvit_schedule(img_size))

    def token_grid(self, x: Tensor) -> tuple[int, int]:
        """(H / p, W / p) for an image batch, with a clear error when the sides are not multiples of p."""
        if x.dim() != 4 or x.shape[1] != self.in_dim:
            raise ValueError(f"LongViT expects images (B, {self.in_dim}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(
                f"LongViT: image size {h}x{w} is not a multiple of the patch size {self.patch_size}; "
                "pad the slide image (gigaslide.data.slide_image pads to a multiple of 32)"
            )
        return h // self.patch_size, w // self.patch_size

    def tokens(self, x: Tensor) -> Tensor:
        """Patch embeddings plus (interpolated) position embeddings: (B, 3, H, W) -> (B, N, D)."""
        grid = self.token_grid(x)
        t = self.patch_embed.proj(x).flatten(2).transpose(1, 2)  # (B, N, D)
        par = self._parallel()
        if par is not None:
            rank, world = par
            if grid[1] != self.grid[1] or grid[0] * world != self.grid[0]:
                raise ValueError(
                    f"sequence-parallel LongViT: rank band of {grid[0]}x{grid[1]} tokens does not tile the "
                    f"{self.grid[0]}x{self.grid[1]} grid over {world} ranks; give each rank H/{world} rows of an "
                    f"image of img_size={self.img_size}"
                )
            table = self.pos_embed.reshape(1, *self.grid, -1)[:, rank * grid[0] : (rank + 1) * grid[0]]
            pos = table.reshape(1, grid[0] * grid[1], -1)
        else:
            pos = resize_pos_embed(self.pos_embed, grid, num_prefix_tokens=0, old_grid=self.grid)
        return self.pos_drop(t + pos.to(t.dtype))

    def forward_features(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """Encoded tokens (B, N, D) (before pooling); ``mask`` (B, H/p, W/p) True = token used."""
        t = self.tokens(x)
        pad = None if mask is None else ~self._flat_mask(x, mask)
        return self.encoder(t, key_padding_mask=pad)

    def _flat_mask(self, x: Tensor, mask: Tensor) -> Tensor:
        grid = self.token_grid(x)
        if tuple(mask.shape) != (x.shape[0], *grid):
            raise ValueError(
                f"LongViT: token mask must have shape (B, H/{self.patch_size}, W/{self.patch_size}) = "
                f"{(x.shape[0], *grid)}, got {tuple(mask.shape)}"
            )
        flat = mask.reshape(x.shape[0], -1).to(device=x.device, dtype=torch.bool)
        empty = (~flat.any(dim=1)).nonzero().flatten().tolist()
        if empty and self._parallel() is None:  # a rank's band may hold no tissue
            raise ValueError(f"LongViT: image(s) {empty} have no token in the mask; check the tissue mask")
        return flat

    def pool(self, tokens: Tensor, valid: Tensor | None = None) -> Tensor:
        """Slide embedding (B, D) from encoded tokens (B, N, D); ``valid`` (B, N) bool restricts the mean."""
        if self.pooling_norm == "norm":
            tokens = self.norm(tokens)
        if self._parallel() is not None:  # mean over every rank's tokens, gradients back to each rank
            w = tokens.new_ones(tokens.shape[:2]) if valid is None else valid.to(tokens.dtype)
            part = torch.cat([(tokens * w.unsqueeze(-1)).sum(1), w.sum(1, keepdim=True)], dim=-1)  # (B, D+1)
            total = all_gather_with_grad(part.unsqueeze(0), self.seq_group).sum(0)
            pooled = total[:, :-1] / total[:, -1:].clamp_min(1.0)
        else:
            pooled = tokens.mean(dim=1) if valid is None else masked_mean(tokens, valid)
        return self.fc_norm(pooled) if self.pooling_norm == "fc_norm" else pooled

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """(B, 3, H, W) image [+ (B, H/p, W/p) token mask] -> logits (B, C), embedding (B, D)."""
        valid = None if mask is None else self._flat_mask(x, mask)
        tokens = self.encoder(self.tokens(x), key_padding_mask=None if valid is None else ~valid)
        emb = self.pool(tokens, valid)
        logits = self.head(emb) if self.head is not None else emb.new_zeros(emb.shape[0], 0)
        return SlideOutput(logits=logits, embedding=emb)
