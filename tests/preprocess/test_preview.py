"""QC preview PNG: size, outline and grid colours, atomic write."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from gigaslide.preprocess.preview import (
    GRID_RGB,
    OUTLINE_RGB,
    TITLE_HEIGHT,
    preview_scale,
    preview_title,
    render_preview,
)
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.preprocess.tissue import TissueMask


def make_tissue(h: int = 100, w: int = 150, ds: float = 16.0) -> TissueMask:
    mask = np.zeros((h, w), bool)
    mask[20:80, 30:120] = True
    thumb = np.full((h, w, 3), 240, np.uint8)
    thumb[mask] = (220, 150, 190)
    return TissueMask.from_mask(mask, (ds, ds), thumb, mpp=8.0)


def spec_for(tissue: TissueMask) -> TileSpec:
    dims = (round(tissue.mask.shape[1] * 16), round(tissue.mask.shape[0] * 16))
    return TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.5, level_downsamples=(1.0,), level0_dims=dims
    )


def test_preview_written_with_outline_and_grid(tmp_path):
    tissue = make_tissue()
    spec = spec_for(tissue)
    coords = np.array([[512, 384], [768, 384], [512, 640]])
    out = render_preview(
        tissue, coords, spec, tmp_path / "p" / "slide.png", slide_name="slide", min_size=None
    )
    assert out == tmp_path / "p" / "slide.png" and out.exists()
    assert not [p for p in out.parent.iterdir() if p.name != "slide.png"]  # no temp file left
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (100 + TITLE_HEIGHT, 150, 3)
    body = img[TITLE_HEIGHT:]
    outline = np.all(body == OUTLINE_RGB, axis=2)
    grid = np.all(body == GRID_RGB, axis=2)
    assert outline.any() and grid.any()
    # the outline hugs the tissue rectangle (rows 20..79, cols 30..119)
    ys, xs = np.nonzero(outline)
    assert ys.min() >= 19 and ys.max() <= 80 and xs.min() >= 29 and xs.max() <= 120
    # tile (512, 384) covers thumbnail px 32..47 x 24..39: its left edge is drawn at x=32
    assert grid[24:40, 32].sum() >= 14
    assert np.all(img[:TITLE_HEIGHT, -5:] == 255)  # title bar is white at the far right


def test_preview_resizing(tmp_path):
    tissue = make_tissue()
    spec = spec_for(tissue)
    small = render_preview(tissue, np.zeros((0, 2)), spec, tmp_path / "a.png", min_size=300)
    assert np.asarray(Image.open(small)).shape[:2] == (200 + TITLE_HEIGHT, 300)
    capped = render_preview(tissue, np.array([[0, 0]]), spec, tmp_path / "b.png", max_size=75, min_size=None)
    assert np.asarray(Image.open(capped)).shape[:2] == (50 + TITLE_HEIGHT, 75)
    assert preview_scale((150, 100), 2048, 768) == pytest.approx(768 / 150)
    assert preview_scale((4000, 100), 2048, 768) == pytest.approx(2048 / 4000)
    assert preview_scale((1000, 900), 2048, 768) == 1.0


def test_title_text():
    spec = spec_for(make_tissue())
    assert preview_title("s1", 42, spec) == "s1: 42 tiles, 256 px at 0.5 um/px"
    assert preview_title("ünï", 1, spec).startswith("?n?")
