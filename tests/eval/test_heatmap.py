"""Heatmaps: percentile scores painted at the tiles' level-0 footprint; attention files."""

from __future__ import annotations

from pathlib import Path

import matplotlib
import numpy as np
import pytest
from PIL import Image

from gigaslide.eval.heatmap import (
    ScoresMismatchError,
    check_scores_match_slide,
    percentile_scores,
    read_scores,
    render_heatmap,
    write_attention,
)
from gigaslide.io.base import Slide
from gigaslide.preprocess.tiling_spec import TileSpec


class ArraySlide(Slide):
    """A two-level in-memory slide: uniform grey level 0 (1000 x 600) and its 4x downsample."""

    backend = "array"

    def __init__(self) -> None:
        super().__init__("memory.tif", mpp=0.5)
        self.levels = [np.full((600, 1000, 3), 200, np.uint8), np.full((150, 250, 3), 200, np.uint8)]
        self.level_dimensions = ((1000, 600), (250, 150))
        self.level_downsamples = (1.0, 4.0)
        self.reads: list[int] = []

    def _read(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        self.reads.append(level)
        return self.levels[level][y : y + height, x : x + width].copy()


def _grid() -> tuple[np.ndarray, np.ndarray]:
    xs, ys = np.meshgrid(np.arange(0, 1000, 100), np.arange(0, 600, 100))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (60, 2) non-overlapping 100 px tiles
    scores = np.linspace(0.0, 1.0, len(coords)) ** 3
    return coords, scores


def test_percentiles() -> None:
    np.testing.assert_allclose(percentile_scores([5.0, 1.0, 3.0, 3.0]), [1.0, 0.25, 0.625, 0.625])
    with pytest.raises(ValueError, match="NaN"):
        percentile_scores([1.0, np.nan])


def test_top_tile_gets_top_colour_at_its_place(tmp_path: Path) -> None:
    coords, scores = _grid()
    top = 23  # put the maximum on tile (300, 200)
    scores[top] = 10.0
    out = render_heatmap(ArraySlide(), coords, scores, 100, tmp_path / "h.png", max_size=500, alpha=1.0)
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (300, 500, 3)  # longest side = max_size, aspect kept
    top_colour = np.round(np.array(matplotlib.colormaps["jet"](1.0)[:3]) * 255)
    cx, cy = (coords[top] + 50) // 2  # tile centre at scale 0.5
    np.testing.assert_allclose(img[cy, cx], top_colour, atol=1)
    # the lowest-scoring tile gets the low end of the colormap, not the top colour
    assert np.abs(img[25, 25].astype(float) - top_colour).sum() > 100
    assert not list(tmp_path.glob(".*tmp"))  # atomic write leaves no temporary


def test_alpha_blend_and_unpainted_background(tmp_path: Path) -> None:
    coords, scores = _grid()
    keep = coords[:, 0] < 500  # paint the left half only
    out = render_heatmap(
        ArraySlide(), coords[keep], scores[keep], 100, tmp_path / "h.png", max_size=250, alpha=0.5
    )
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (150, 250, 3)
    np.testing.assert_array_equal(img[75, 200], [200, 200, 200])  # right half untouched
    colour = np.array(matplotlib.colormaps["jet"](percentile_scores(scores[keep])[0])[:3]) * 255
    np.testing.assert_allclose(img[10, 10], 0.5 * 200 + 0.5 * colour, atol=1.5)


def test_region_reads_finer_level(tmp_path: Path) -> None:
    coords, scores = _grid()
    slide = ArraySlide()
    out = render_heatmap(
        slide, coords, scores, 100, tmp_path / "r.png", max_size=200, region=(200, 100, 200, 200)
    )
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape == (200, 200, 3)  # 1 output px per level-0 px
    assert slide.reads[-1] == 0  # read at full resolution, not from the 4x level
    # tile (300, 200) occupies output pixels [100:200, 100:200]
    expected = np.round(np.array(matplotlib.colormaps["jet"](percentile_scores(scores)[23])[:3]) * 255)
    np.testing.assert_allclose(img[150, 150], 0.5 * 200 + 0.5 * expected, atol=1.5)
    with pytest.raises(ValueError, match="outside the slide"):
        render_heatmap(slide, coords, scores, 100, tmp_path / "x.png", region=(5000, 0, 10, 10))


def test_attention_file_roundtrip(tmp_path: Path) -> None:
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.25, level_downsamples=[1.0], level0_dims=(4096, 4096)
    )
    coords, scores = _grid()
    path = write_attention(tmp_path / "a.h5", coords, scores, spec=spec, meta={"slide_id": "s1", "fold": 2})
    ts = read_scores(path)
    np.testing.assert_array_equal(ts.coords, coords)
    np.testing.assert_allclose(ts.scores, scores, rtol=1e-6)
    assert ts.tile_size_level0 == 512 and ts.attrs["slide_id"] == "s1" and ts.attrs["fold"] == 2
    with pytest.raises(ValueError, match="4 coordinates for 3 scores"):
        write_attention(tmp_path / "b.h5", coords[:4], scores[:3])


def test_scores_of_another_slide_are_refused(tmp_path: Path) -> None:
    coords, scores = _grid()  # corners up to (900, 500)
    path = write_attention(tmp_path / "slide_003.h5", coords, scores, slide_id="slide_003")
    ts = read_scores(path)
    assert ts.attrs["slide_id"] == "slide_003"
    check_scores_match_slide(ts, (1000, 600), tmp_path / "slide_003.tiff", path)  # same slide: fine
    with pytest.raises(ScoresMismatchError, match=r"slide_003\.h5 holds scores of slide 'slide_003'") as info:
        check_scores_match_slide(ts, (1000, 600), tmp_path / "slide_005.tiff", path)
    assert "slide_005.tiff" in str(info.value) and "--force" in str(info.value)
    check_scores_match_slide(ts, (1000, 600), tmp_path / "slide_005.tiff", path, force=True)
    # a recorded slide_path naming the same file also matches (slide ids from a CSV)
    ts.attrs["slide_path"] = "/data/slide_005.tiff"
    check_scores_match_slide(ts, (1000, 600), tmp_path / "slide_005.tiff", path)
    # tiles outside the slide: refused even with force
    with pytest.raises(ScoresMismatchError, match=r"6 of 60 tile\(s\) lie outside .*900 x 600"):
        check_scores_match_slide(ts, (900, 600), tmp_path / "slide_003.tiff", path, force=True)
    with pytest.raises(ScoresMismatchError, match="outside"):
        check_scores_match_slide(ts, (1000, 500), tmp_path / "slide_003.tiff", path, force=True)
    # no slide id recorded (e.g. a third-party file): only the bounds are checked
    bare = read_scores(write_attention(tmp_path / "x.h5", coords, scores))
    assert "slide_id" not in bare.attrs
    check_scores_match_slide(bare, (1000, 600), tmp_path / "other.tiff", tmp_path / "x.h5")
