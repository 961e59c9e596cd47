"""One reading rule for every backend: a read at a level returns that level's stored pixels.

``read_region((x, y), level, (w, h))`` returns the stored pixels of ``level`` starting at
``(floor(x / ds), floor(y / ds))``. OpenSlide resamples the sub-pixel remainder at levels whose
downsample is not an integer; gigaslide's ``openslide`` backend must not (issue 12 section 4).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from io_synthetic import write_pyramid

from gigaslide.io import open_slide
from gigaslide.io.openslide_backend import fractional_levels

BACKENDS = ("openslide", "tiff-direct", "tiffslide")
TCGA = "tcga-cr-7395-01a-01-ts1.svs"


def _reference(levels: list[np.ndarray], ds: float, x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
    """The rule, written out: stored pixels from floor(location / downsample), white outside."""
    lx, ly = math.floor(x / ds + 1e-9), math.floor(y / ds + 1e-9)
    out = np.full((h, w, 3), 255, np.uint8)
    src = levels[level][ly : ly + h, lx : lx + w]
    out[: src.shape[0], : src.shape[1]] = src
    return out


@pytest.fixture(scope="module")
def odd_pyramid(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[np.ndarray]]:
    """1001 x 767 px: level 1 is 501 x 384 (downsample 1.9977), level 2 is 251 x 192 (3.9917)."""
    image = np.random.default_rng(3).integers(0, 256, (767, 1001, 3), dtype=np.uint8)  # sharp content
    path = write_pyramid(tmp_path_factory.mktemp("odd") / "odd.tiff", image, compression=None)
    return path, [image[:: 2**k, :: 2**k] for k in range(3)]


def test_levels_with_non_integer_downsample_return_stored_pixels(odd_pyramid) -> None:
    path, levels = odd_pyramid
    slides = {b: open_slide(path, backend=b) for b in BACKENDS}
    ds = slides["openslide"].level_downsamples
    assert fractional_levels(ds) == (1, 2)
    rng = np.random.default_rng(0)
    for _ in range(20):
        x, y, level = int(rng.integers(0, 980)), int(rng.integers(0, 740)), int(rng.integers(1, 3))
        want = _reference(levels, ds[level], x, y, level, 37, 29)
        for name, slide in slides.items():
            np.testing.assert_array_equal(slide.read_region((x, y), level, (37, 29)), want, err_msg=name)


def test_plain_openslide_resamples_there(odd_pyramid) -> None:
    """Why the backend does not simply forward: OpenSlide's own read differs from the stored pixels."""
    openslide = pytest.importorskip("openslide")
    path, levels = odd_pyramid
    with openslide.OpenSlide(str(path)) as osr:
        ds = osr.level_downsamples[1]
        x = 301  # 301 / 1.9977 = 150.67: a sub-pixel remainder
        raw = np.asarray(osr.read_region((x, x), 1, (40, 40)).convert("RGB"))
    assert np.abs(raw.astype(int) - _reference(levels, ds, x, x, 1, 40, 40)).max() > 20


def test_tcga_level1_same_pixels_in_every_backend(shared_data: Path) -> None:
    """The TCGA slide's level 1 (downsample 2.0005): 50 regions identical across backends."""
    slides = {b: open_slide(shared_data / TCGA, backend=b) for b in BACKENDS}
    assert fractional_levels(slides["openslide"].level_downsamples) == (1,)
    rng = np.random.default_rng(0)
    for _ in range(50):
        x, y = int(rng.integers(0, 4200)), int(rng.integers(0, 3300))
        ref = slides["tiff-direct"].read_region((x, y), 1, (128, 96))
        for name in ("openslide", "tiffslide"):
            np.testing.assert_array_equal(slides[name].read_region((x, y), 1, (128, 96)), ref, err_msg=name)
