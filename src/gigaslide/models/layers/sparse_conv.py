"""Sparse 2-D convolution in plain PyTorch: submanifold and strided convolutions, batch norm, ReLU, pooling.

A :class:`SparseMap` holds the active sites of a batch of 2-D feature maps: ``features`` (M, C) and
integer ``coords`` (M, 3) = (batch, y, x), one row per site, rows unique. Every other position of
the map is zero. No compiled extension is involved: neighbours are found by encoding each site as
one int64 key, sorting the keys once and looking up every kernel offset with ``searchsorted``; a
convolution is then, per kernel offset, a gather of the matched input rows, a matmul with that
offset's (C_in, C_out) weight slice and a scatter-add into the output rows. Autograd handles the
backward pass. The neighbour map ("rulebook") of a site set is cached on the map and shared by the
maps derived from it, so the convolutions of a residual block look their neighbours up once.

Semantics (each equals ``F.conv2d`` on the densified map, evaluated at the output sites):

- ``stride == 1`` (submanifold convolution): outputs only at the input's active sites.
- ``stride > 1``: outputs at the downsampled sites ``floor(site / stride)`` of the active sites.
  With ``kernel_size=3, padding=1`` every input site lies in the window of its own output site.

Duplicate coordinates: :meth:`SparseMap.from_points` merges points that fall on the same site into
one site whose features are the mean of theirs (as SparseConvNet's ``InputLayer(mode=4)``, used by
the official Giga-SSL code).

Weights have ``nn.Conv2d``'s layout (C_out, C_in, kH, kW) and batch norms ``nn.BatchNorm2d``'s state,
so the layers of a dense ResNet load as they are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: one neighbour map: output coords (M_out, 3), the neighbour table (M_out, k*k) of input rows (M_in where
#: the neighbour is inactive) and, per kernel offset, the matched (input rows, output rows)
Rules = tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]
ALGORITHMS = ("gather", "scatter")


@dataclass
class SparseMap:
    """Active sites of B sparse 2-D maps.

    Attributes:
        features: (M, C) float features of the active sites.
        coords: (M, 3) int64 (batch, y, x) of the sites; rows are unique.
        batch_size: number of maps B (a map may have no site).
    """

    features: Tensor
    coords: Tensor
    batch_size: int
    rules: dict[tuple[int, int, int], Rules] = field(default_factory=dict, repr=False)

    def replace(self, features: Tensor) -> SparseMap:
        """The same sites (and cached neighbour maps) with new features (M, C')."""
        if features.shape[0] != self.coords.shape[0]:
            raise ValueError(f"{features.shape[0]} feature rows for {self.coords.shape[0]} sites")
        return SparseMap(features, self.coords, self.batch_size, self.rules)

    @classmethod
    def from_points(cls, features: Tensor, coords: Tensor, batch_size: int) -> SparseMap:
        """Build a map from P points, averaging the features of points on the same site.

        Args:
            features: (P, C) point features.
            coords: (P, 3) integer (batch, y, x) of each point; repeats allowed.
            batch_size: B; batch indices must lie in [0, B).
        """
        if features.dim() != 2 or coords.shape != (features.shape[0], 3):
            raise ValueError(
                f"from_points expects features (P, C) and coords (P, 3), got {tuple(features.shape)} "
                f"and {tuple(coords.shape)}"
            )
        coords = coords.to(device=features.device, dtype=torch.long)
        if coords.numel() and (coords[:, 0].min() < 0 or coords[:, 0].max() >= batch_size):
            raise ValueError(f"batch indices must lie in [0, {batch_size})")
        lo, span = _bounds(coords)
        keys = _encode(coords, lo, span)
        uniq, inverse = torch.unique(keys, sorted=True, return_inverse=True)
        m = uniq.numel()
        counts = torch.zeros(m, device=features.device, dtype=features.dtype)
        counts.index_add_(0, inverse, torch.ones_like(inverse, dtype=features.dtype))
        summed = features.new_zeros(m, features.shape[1]).index_add(0, inverse, features)
        site_coords = coords.new_zeros(m, 3).index_copy(0, inverse, coords)
        return cls(summed / counts.unsqueeze(1), site_coords, int(batch_size))

    def to_dense(self, origin: tuple[int, int], size: tuple[int, int]) -> Tensor:
        """(B, C, H, W) dense map of the window starting at ``origin`` = (y0, x0) with ``size`` = (H, W)."""
        h, w = size
        dense = self.features.new_zeros(self.batch_size, self.features.shape[1], h, w)
        y = self.coords[:, 1] - origin[0]
        x = self.coords[:, 2] - origin[1]
        inside = (y >= 0) & (y < h) & (x >= 0) & (x < w)
        b = self.coords[inside, 0]
        dense[b, :, y[inside], x[inside]] = self.features[inside]
        return dense


def _bounds(coords: Tensor, margin: int = 0) -> tuple[Tensor, Tensor]:
    """Lower corner (3,) and extent (3,) of the box holding every (batch, y, x), grown by ``margin``."""
    if coords.numel() == 0:
        return coords.new_zeros(3), coords.new_ones(3)
    lo = coords.min(dim=0).values - margin
    hi = coords.max(dim=0).values + margin
    lo[0] = 0
    return lo, hi - lo + 1


def _encode(coords: Tensor, lo: Tensor, span: Tensor) -> Tensor:
    """One int64 key per (batch, y, x) row inside the box (lo, span): row-major order."""
    c = coords - lo
    return (c[:, 0] * span[1] + c[:, 1]) * span[2] + c[:, 2]


def build_rules(sparse: SparseMap, kernel_size: int, stride: int, padding: int) -> Rules:
    """Neighbour map of a convolution on ``sparse``'s sites (cached on the map).

    Returns the output coords (M_out, 3), the neighbour table (M_out, k*k): for each output row and
    kernel offset (ky, kx) in row-major order, the input row at ``out * stride + (ky, kx) - padding``,
    or M_in when that site is inactive; and, per offset, the matched (input rows, output rows).
    """
    key = (kernel_size, stride, padding)
    if key in sparse.rules:
        return sparse.rules[key]
    coords = sparse.coords
    if stride == 1:
        out_coords = coords
    else:
        down = torch.cat([coords[:, :1], torch.div(coords[:, 1:], stride, rounding_mode="floor")], dim=1)
        out_coords = torch.unique(down, dim=0) if down.numel() else down
    lo, span = _bounds(coords)
    in_keys = _encode(coords, lo, span)
    sorted_keys, order = torch.sort(in_keys)
    pairs: list[tuple[Tensor, Tensor]] = []
    out_rows = torch.arange(out_coords.shape[0], device=coords.device)
    table = torch.full(
        (out_coords.shape[0], kernel_size**2), coords.shape[0], dtype=torch.long, device=coords.device
    )
    base = out_coords[:, 1:] * stride - padding  # (M_out, 2)
    hi = lo[1:] + span[1:]
    for ky in range(kernel_size):
        for kx in range(kernel_size):
            q = base + torch.tensor([ky, kx], device=coords.device)
            inside = ((q >= lo[1:]) & (q < hi)).all(dim=1)
            qk = _encode(torch.cat([out_coords[:, :1], q], dim=1), lo, span)
            pos = torch.searchsorted(sorted_keys, qk).clamp_max(max(sorted_keys.numel() - 1, 0))
            found = inside & (sorted_keys[pos] == qk) if sorted_keys.numel() else inside & False
            rows_in, rows_out = order[pos[found]], out_rows[found]
            table[rows_out, ky * kernel_size + kx] = rows_in
            pairs.append((rows_in, rows_out))
    rules = (out_coords, table, pairs)
    sparse.rules[key] = rules
    return rules


class SparseConv2d(nn.Module):
    """Sparse equivalent of ``nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding)``.

    ``stride=1`` is a submanifold convolution (outputs at the input sites); ``stride>1`` outputs at the
    downsampled sites. ``weight`` (C_out, C_in, k, k) and ``bias`` are laid out as ``nn.Conv2d``'s.

    ``algorithm``: ``scatter`` (default) runs, per kernel offset, one matmul on the matched rows only and
    scatter-adds the products, so its cost follows the number of active neighbour pairs (Giga-SSL's maps
    of a few tiles have almost none); ``gather`` gathers every output's k*k neighbours (zeros for
    inactive ones) into one (M_out, k*k*C_in) matrix and runs one large matmul, which can win on
    nearly full maps. Both give the same result.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        bias: bool = False,
        algorithm: str = "scatter",
    ) -> None:
        super().__init__()
        if kernel_size < 1 or stride < 1:
            raise ValueError(f"kernel_size and stride must be >= 1, got {kernel_size}, {stride}")
        if algorithm not in ALGORITHMS:
            raise ValueError(f"algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
        self.algorithm = algorithm
        self.in_channels, self.out_channels = int(in_channels), int(out_channels)
        self.kernel_size, self.stride = int(kernel_size), int(stride)
        self.padding = kernel_size // 2 if padding is None else int(padding)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s default initialisation."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size**2
            nn.init.uniform_(self.bias, -1 / math.sqrt(fan_in), 1 / math.sqrt(fan_in))

    def forward(self, x: SparseMap) -> SparseMap:
        """(M, C_in) at the input sites -> (M_out, C_out) at the output sites."""
        if x.features.shape[1] != self.in_channels:
            raise ValueError(f"SparseConv2d expects {self.in_channels} channels, got {x.features.shape[1]}")
        out_coords, table, pairs = build_rules(x, self.kernel_size, self.stride, self.padding)
        feats = x.features
        if self.algorithm == "gather":
            padded = torch.cat([feats, feats.new_zeros(1, feats.shape[1])])  # row M_in = inactive site
            cols = padded[table].flatten(1)  # (M_out, k*k*C_in), offset-major like the weight below
            w = self.weight.to(feats.dtype).permute(2, 3, 1, 0).reshape(-1, self.out_channels)
            out = (cols @ w).to(feats.dtype)  # (M_out, C_out); the matmul is half precision under autocast
        else:
            out = feats.new_zeros(out_coords.shape[0], self.out_channels)
            # (C_in, C_out) per offset; unbind: one gradient buffer for all offsets, not one per slice
            ws = self.weight.to(feats.dtype).permute(2, 3, 1, 0).flatten(0, 1).contiguous().unbind(0)
            for w_k, (rows_in, rows_out) in zip(ws, pairs):
                if rows_in.numel():
                    prod = feats.index_select(0, rows_in) @ w_k  # half precision under autocast
                    out = out.index_add(0, rows_out, prod.to(out.dtype))
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        if self.stride == 1:
            return x.replace(out)
        return SparseMap(out, out_coords, x.batch_size)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"algorithm={self.algorithm}"
        )


class SparseBatchNorm(nn.BatchNorm1d):
    """Batch norm over the active sites only (zeros of the map are not samples); ``BatchNorm2d`` state."""

    def forward(self, x: SparseMap) -> SparseMap:  # type: ignore[override]
        return x.replace(super().forward(x.features))


class SparseReLU(nn.Module):
    """ReLU of the active sites' features."""

    def forward(self, x: SparseMap) -> SparseMap:
        return x.replace(F.relu(x.features))


def sparse_add(a: SparseMap, b: SparseMap) -> SparseMap:
    """Site-wise sum of two maps on the same sites (a residual connection)."""
    if a.coords is not b.coords and not torch.equal(a.coords, b.coords):
        raise ValueError("sparse_add needs two maps with the same sites in the same order")
    return a.replace(a.features + b.features)


def sparse_global_avg_pool(x: SparseMap) -> Tensor:
    """Mean of the features over each map's active sites -> (B, C); a map without sites gives zeros."""
    b = x.coords[:, 0]
    total = x.features.new_zeros(x.batch_size, x.features.shape[1]).index_add(0, b, x.features)
    count = torch.bincount(b, minlength=x.batch_size).clamp_min(1).to(total.dtype)
    return total / count.unsqueeze(1)
