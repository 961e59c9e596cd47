"""Tile-level augmentations of the Giga-SSL bank, with parameters shared by all tiles of a view or not.

:meth:`TileAugment.sample` draws one parameter set per tile as numpy arrays (``shared=True`` draws a
single set and repeats it: every tile of the view gets the same crop, flips, rotation, colour jitter,
grayscale and blur, the paper's shared augmentation; ``shared=False`` is its "NS" ablation).
:meth:`TileAugment.__call__` applies per-tile parameters to a (B, 3, H, W) float batch in [0, 1], on
whatever device the batch is, vectorised over the batch.

Operations, in this order (defaults from the official bank builder where it sets them):

1. geometry, one bilinear resampling: random resized crop (area fraction in [0.5, 1], aspect ratio in
   [3/4, 4/3]) back to the tile size, a flip of each axis (p = 1/2) and a rotation by k x 90 degrees;
2. colour jitter with p = 0.8: brightness, contrast, saturation factors in [0.6, 1.4] and a hue
   shift in [-0.2, 0.2] of a turn (a rotation of the chroma plane in YIQ space), in this fixed order;
3. grayscale with p = 0.2 (ITU-R 601 luma);
4. Gaussian blur with p = 0.5, 5 x 5 kernel, sigma in [0.1, 1] (reflect padding).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

_LUMA = (0.299, 0.587, 0.114)
_RGB2YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))


@dataclass(frozen=True)
class TileAugment:
    """Random tile augmentation (see the module docstring for the operations and defaults)."""

    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    rotate90: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.2)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 1.0)
    blur_p: float = 0.5
    blur_kernel: int = 5

    def sample(self, n: int, rng: np.random.Generator, shared: bool = True) -> dict[str, np.ndarray]:
        """Parameters of ``n`` tiles: a dict of (n,) arrays; ``shared`` repeats one draw n times."""
        m = 1 if shared else n
        area = rng.uniform(*self.crop_scale, size=m)
        log_r = rng.uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]), size=m)
        w = np.minimum(np.sqrt(area * np.exp(log_r)), 1.0)
        h = np.minimum(np.sqrt(area / np.exp(log_r)), 1.0)
        b, c, s, hue = self.jitter
        p = {
            "crop_w": w,
            "crop_h": h,
            "crop_cx": rng.uniform(-1, 1, size=m) * (1 - w),
            "crop_cy": rng.uniform(-1, 1, size=m) * (1 - h),
            "flip_x": rng.random(m) < (0.5 if self.flip else 0.0),
            "flip_y": rng.random(m) < (0.5 if self.flip else 0.0),
            "rot90": rng.integers(0, 4 if self.rotate90 else 1, size=m),
            "jitter_on": rng.random(m) < self.jitter_p,
            "brightness": rng.uniform(1 - b, 1 + b, size=m),
            "contrast": rng.uniform(1 - c, 1 + c, size=m),
            "saturation": rng.uniform(1 - s, 1 + s, size=m),
            "hue": rng.uniform(-hue, hue, size=m),
            "gray": rng.random(m) < self.gray_p,
            "blur_on": rng.random(m) < self.blur_p,
            "sigma": rng.uniform(*self.blur_sigma, size=m),
        }
        return {k: np.repeat(v, n) if shared else v for k, v in p.items()}

    def __call__(self, images: Tensor, params: dict[str, np.ndarray]) -> Tensor:
        """Augment (B, 3, H, W) float images in [0, 1] with per-tile ``params`` -> (B, 3, H, W) in [0, 1]."""
        if images.ndim != 4 or images.shape[1] != 3 or not images.is_floating_point():
            raise ValueError(f"expected a (B, 3, H, W) float batch in [0, 1], got {tuple(images.shape)}")
        n = images.shape[0]
        if any(len(v) != n for v in params.values()):
            raise ValueError(
                f"augmentation parameters for {len(next(iter(params.values())))} tiles, batch of {n}"
            )
        t = {k: torch.as_tensor(np.asarray(v), device=images.device) for k, v in params.items()}
        x = _geometry(images, t)
        x = _where(x, params["jitter_on"], t, _color_jitter)
        x = _where(x, params["gray"], t, lambda y, _: _gray(y).expand_as(y))
        x = _where(x, params["blur_on"], t, lambda y, s: _blur(y, s["sigma"], self.blur_kernel))
        return x.clamp(0.0, 1.0)


def _where(x: Tensor, flags: np.ndarray, t: dict[str, Tensor], fn: Callable[..., Tensor]) -> Tensor:
    """Apply ``fn(tiles, their params)`` to the flagged tiles only (all or none when shared: no copy)."""
    flags = np.asarray(flags, dtype=bool)
    if not flags.any():
        return x
    if flags.all():
        return fn(x, t)
    idx = torch.as_tensor(np.flatnonzero(flags), device=x.device)
    out = x.clone()
    out[idx] = fn(x[idx], {k: v[idx] for k, v in t.items()})
    return out


def params_row(params: dict[str, np.ndarray], i: int) -> dict[str, float | int | bool]:
    """The parameters of tile ``i`` as plain JSON-able values."""
    return {k: v[i].item() for k, v in params.items()}


def _geometry(x: Tensor, t: dict[str, Tensor]) -> Tensor:
    """Output pixel p samples the input at ``crop_center + diag(w, h) @ R(k) @ flips @ p`` (normalised coords)."""
    dt = x.dtype
    k = t["rot90"].long()
    cos = torch.tensor([1.0, 0.0, -1.0, 0.0], device=x.device, dtype=dt)[k]
    sin = torch.tensor([0.0, 1.0, 0.0, -1.0], device=x.device, dtype=dt)[k]
    fx = 1.0 - 2.0 * t["flip_x"].to(dt)
    fy = 1.0 - 2.0 * t["flip_y"].to(dt)
    w, h = t["crop_w"].to(dt), t["crop_h"].to(dt)
    theta = torch.stack(
        [
            torch.stack([w * cos * fx, -w * sin * fy, t["crop_cx"].to(dt)], dim=1),
            torch.stack([h * sin * fx, h * cos * fy, t["crop_cy"].to(dt)], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def _gray(x: Tensor) -> Tensor:
    """(B, 3, H, W) -> (B, 1, H, W) luma."""
    w = torch.tensor(_LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def _color_jitter(x: Tensor, t: dict[str, Tensor]) -> Tensor:
    dt = x.dtype

    def f(name: str) -> Tensor:
        return t[name].to(dt).view(-1, 1, 1, 1)

    x = (x * f("brightness")).clamp_(0, 1)  # a new tensor: the rest works in place
    mean = _gray(x).mean(dim=(2, 3), keepdim=True)
    x.sub_(mean).mul_(f("contrast")).add_(mean).clamp_(0, 1)
    g = _gray(x)
    x.sub_(g).mul_(f("saturation")).add_(g).clamp_(0, 1)
    # hue: rotate the chroma plane (I, Q) of YIQ by 2*pi*hue; per tile one RGB -> RGB matrix, one bmm
    m = torch.tensor(_RGB2YIQ, device=x.device, dtype=torch.float64)
    angle = 2 * math.pi * t["hue"].to(torch.float64)
    rot = torch.zeros(angle.shape[0], 3, 3, device=x.device, dtype=torch.float64)
    rot[:, 0, 0] = 1.0
    rot[:, 1, 1], rot[:, 1, 2] = torch.cos(angle), -torch.sin(angle)
    rot[:, 2, 1], rot[:, 2, 2] = torch.sin(angle), torch.cos(angle)
    hue = (torch.linalg.inv(m) @ rot @ m).to(dt)  # (B, 3, 3)
    b, c, h, w = x.shape
    return torch.bmm(hue, x.reshape(b, c, h * w)).view(b, c, h, w).clamp(0, 1)


def _blur(x: Tensor, sigma: Tensor, size: int) -> Tensor:
    """Per-tile separable Gaussian blur, ``size`` x ``size`` kernel, reflect padding."""
    b, c, h, w = x.shape
    r = torch.arange(size, device=x.device, dtype=x.dtype) - (size - 1) / 2
    k = torch.exp(-(r[None] ** 2) / (2 * sigma.to(x.dtype)[:, None] ** 2))  # (B, size)
    k = (k / k.sum(dim=1, keepdim=True)).repeat_interleave(c, dim=0)  # (B*C, size)
    pad = size // 2
    y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, k.view(b * c, 1, 1, size), groups=b * c)
    y = F.conv2d(y, k.view(b * c, 1, size, 1), groups=b * c)
    return y.view(b, c, h, w)
