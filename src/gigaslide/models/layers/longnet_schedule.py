"""Segment-length / dilation schedules of LongViT (Table 7) and Prov-GigaPath's slide encoder.

    segments, ratios = longvit_schedule(4096)       # ((1024, 2048, 4096, 8192, 16384), (1, 2, 4, 8, 16))

Every schedule pairs segment length ``w_i`` with dilation ``r_i`` (same length, same order).
"""

from __future__ import annotations

import math

import numpy as np

#: LongViT's dilation ratios (Tables 5-6), shared by every input resolution
DILATED_RATIOS: tuple[int, ...] = (1, 2, 4, 8, 16)

#: Table 7: segment lengths per input resolution (pixels per side, 32 x 32 patches)
LONGVIT_SEGMENT_LENGTHS: dict[int, tuple[int, ...]] = {
    1024: (64, 128, 256, 512, 1024),
    4096: (1024, 2048, 4096, 8192, 16384),
    8192: (1024, 4096, 8192, 16384, 65536),
    16384: (1024, 4096, 16384, 65536, 262144),
    32768: (1024, 4096, 32768, 262144, 1048576),
}


def longvit_schedule(input_size: int, strict: bool = False) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(segment lengths, dilation ratios) for a square ``input_size`` x ``input_size`` LongViT input.

    Sizes of Table 7 get their row. Other sizes get the pretraining row (1,024^2), which is what
    LongViT's reference code does for any size it does not list; ``strict=True`` raises instead.
    """
    size = int(input_size)
    if size in LONGVIT_SEGMENT_LENGTHS:
        return LONGVIT_SEGMENT_LENGTHS[size], DILATED_RATIOS
    if strict:
        known = ", ".join(str(s) for s in LONGVIT_SEGMENT_LENGTHS)
        raise ValueError(f"no Table 7 segment lengths for input size {size}; known sizes: {known}")
    return LONGVIT_SEGMENT_LENGTHS[1024], DILATED_RATIOS


def gigapath_segment_lengths(max_wsi_size: int = 262144, tile_size: int = 256) -> tuple[int, ...]:
    """Prov-GigaPath's rule: 5 powers of two spaced evenly in log2 between 1,024 and the longest sequence.

    The longest sequence is ``(max_wsi_size // tile_size) ** 2`` tiles; exponents are truncated to
    integers as in the reference (``2 ** linspace(10, floor(log2(L)), 5)`` cast to int).
    """
    max_len = (int(max_wsi_size) // int(tile_size)) ** 2
    if max_len < 1:
        raise ValueError(f"max_wsi_size {max_wsi_size} is smaller than one tile of {tile_size} px")
    exps = np.linspace(math.log2(1024), int(math.log2(max_len)), 5)
    return tuple(int(v) for v in np.power(2, exps).astype(int))
