"""What a tile encoder expects and produces (:class:`EncoderMeta`), shared by the registry and timm entries.

Standard normalisation constants live in :mod:`gigaslide.data.transforms` (``IMAGENET_MEAN``/``IMAGENET_STD``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

#: names of the form ``timm:<architecture>`` build any timm model
TIMM_PREFIX = "timm:"


@dataclass(frozen=True)
class EncoderMeta:
    """What a tile encoder expects and produces.

    ``input_size`` is the tile side in pixels the encoder was trained on, read at ``mpp`` micrometres
    per pixel; ``mean``/``std`` are the per-channel normalisation applied to [0, 1] RGB input.
    ``output_shape`` is the shape of one tile's output when it is not ``(embed_dim,)``, e.g.
    ``(256, 384)`` for an encoder returning a region's token grid (B, 256, 384).
    """

    name: str
    embed_dim: int
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    mpp: float
    paper: str
    description: str = ""
    output_shape: tuple[int, ...] | None = None

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one tile's output: ``output_shape`` or ``(embed_dim,)``."""
        return tuple(self.output_shape) if self.output_shape is not None else (int(self.embed_dim),)

    def to_dict(self) -> dict[str, Any]:
        """JSON/HDF5-attribute friendly copy (tuples become lists)."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        if self.output_shape is not None:
            d["output_shape"] = list(self.output_shape)
        return d
