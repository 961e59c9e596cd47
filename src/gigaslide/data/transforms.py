"""Tile transforms: uint8 HWC RGB arrays -> normalised float CHW tensors for an encoder.

Two ways to apply the same preprocessing:

- :class:`TileTransform`, per tile, inside DataLoader worker processes (a plain picklable class);
- :class:`BatchNormalizer`, per batch of uint8 tiles, on the device after the copy (used with
  :class:`~gigaslide.data.tile_loader.TileLoader`).

Both call :func:`normalize_batch` (scale to [0, 1], resize, subtract mean, divide by std), so
they agree to float rounding. Resizing (when the tile size differs from the encoder's input
size) uses bilinear interpolation with antialiasing, which is what PIL/torchvision do for
downscaling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _size_pair(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int):
        return (size, size)
    h, w = (int(s) for s in size)
    return (h, w)


class TileTransform:
    """Convert one tile to the tensor an encoder expects.

    Args:
        input_size: encoder input side (int) or (H, W); tiles of another size are resized.
        mean, std: per-channel normalisation applied after scaling to [0, 1].

    Call with an (H, W, 3) uint8 array (or a (3, H, W) uint8 tensor); returns (3, H', W') float32.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"mean and std need 3 values (RGB), got {mean} and {std}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std values must be positive, got {std}")
        self.input_size = _size_pair(input_size)
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._mean_t = torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std_t = torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1)

    @classmethod
    def from_meta(cls, meta: Any) -> TileTransform:
        """Build from an encoder's ``EncoderMeta`` (``input_size``, ``mean``, ``std``)."""
        return cls(meta.input_size, meta.mean, meta.std)

    def __call__(self, tile: np.ndarray | torch.Tensor) -> torch.Tensor:
        if isinstance(tile, np.ndarray):
            if tile.ndim != 3 or tile.shape[2] != 3:
                raise ValueError(f"expected an (H, W, 3) RGB tile, got shape {tile.shape}")
            x = torch.from_numpy(np.ascontiguousarray(tile)).permute(2, 0, 1)  # (3, H, W)
        elif isinstance(tile, torch.Tensor):
            x = tile
            if x.ndim != 3 or x.shape[0] != 3:
                raise ValueError(f"expected a (3, H, W) tile tensor, got shape {tuple(x.shape)}")
        else:
            raise TypeError(f"expected a numpy array or torch tensor tile, got {type(tile).__name__}")
        if x.dtype != torch.uint8:
            raise ValueError(f"expected a uint8 tile (0-255), got dtype {x.dtype}")
        return normalize_batch(x.unsqueeze(0), self.input_size, self._mean_t, self._std_t).squeeze(0)

    def __repr__(self) -> str:
        return f"TileTransform(input_size={self.input_size}, mean={self.mean}, std={self.std})"


def resize_chw(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, antialiased resize of a (C, H, W) float tensor to ``size`` = (H', W')."""
    y = F.interpolate(x.unsqueeze(0), size=size, mode="bilinear", align_corners=False, antialias=True)
    return y.squeeze(0)


def normalize_batch(
    images: torch.Tensor, size: tuple[int, int], mean: torch.Tensor, std: torch.Tensor
) -> torch.Tensor:
    """(B, 3, H, W) uint8 -> (B, 3, H', W') float32: ``/ 255``, resize to ``size``, ``(x - mean) / std``.

    ``mean`` and ``std`` are (1, 3, 1, 1) float32 tensors on the device of ``images``. The single
    implementation behind :class:`TileTransform` and :class:`BatchNormalizer`.
    """
    x = images.to(torch.float32).div_(255.0)
    if tuple(x.shape[2:]) != tuple(size):
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
    return (x - mean) / std


class BatchNormalizer:
    """The :class:`TileTransform` of a whole batch of uint8 tiles, run wherever the batch is (GPU).

    Args:
        input_size: encoder input side (int) or (H, W); tiles of another size are resized.
        mean, std: per-channel normalisation applied after scaling to [0, 1].

    Call with a (B, 3, H, W) uint8 tensor; returns (B, 3, H', W') float32 on the same device.
    """

    def __init__(
        self,
        input_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        std: Sequence[float] = IMAGENET_STD,
    ) -> None:
        ref = TileTransform(input_size, mean, std)  # same validation
        self.input_size, self.mean, self.std = ref.input_size, ref.mean, ref.std
        self._stats: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_meta(cls, meta: Any) -> BatchNormalizer:
        """Build from an encoder's ``EncoderMeta`` (``input_size``, ``mean``, ``std``)."""
        return cls(meta.input_size, meta.mean, meta.std)

    @classmethod
    def from_transform(cls, transform: TileTransform) -> BatchNormalizer:
        """The batch equivalent of a :class:`TileTransform`."""
        return cls(transform.input_size, transform.mean, transform.std)

    def _device_stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._stats:
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            std = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._stats[device] = (mean, std)
        return self._stats[device]

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"expected a (B, 3, H, W) batch of tiles, got {shape}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 tiles (0-255), got dtype {images.dtype}")
        mean, std = self._device_stats(images.device)
        return normalize_batch(images, self.input_size, mean, std)

    def __repr__(self) -> str:
        return f"BatchNormalizer(input_size={self.input_size}, mean={self.mean}, std={self.std})"


def make_transform(meta: Any) -> TileTransform:
    """The transform matching an encoder's metadata (shortcut for :meth:`TileTransform.from_meta`)."""
    return TileTransform.from_meta(meta)
