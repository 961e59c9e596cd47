"""Slide.thumbnail: whole-level resize for small levels, banded reading for large single-level slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from io_synthetic import tissue_like
from PIL import Image

from gigaslide.io import base, open_slide


def test_banded_thumbnail_equals_whole_resize(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    image = tissue_like(700, 1100, seed=3)
    path = tmp_path / "single.tiff"
    tifffile.imwrite(path, image, tile=(256, 256), photometric="rgb", compression="zlib")
    slide = open_slide(path)
    assert slide.level_count == 1
    expected = np.asarray(Image.fromarray(image).resize((200, 127), Image.Resampling.BOX))
    whole = slide.thumbnail(200)
    np.testing.assert_array_equal(whole, expected)
    reads: list[tuple[int, int]] = []
    original = slide._read

    def spy(x: int, y: int, level: int, w: int, h: int) -> np.ndarray:
        reads.append((w, h))
        return original(x, y, level, w, h)

    monkeypatch.setattr(slide, "_read", spy)
    monkeypatch.setattr(base, "THUMBNAIL_READ_PIXELS", 1100 * 60)  # force bands of ~60 level rows
    banded = slide.thumbnail(200)
    assert banded.shape == (127, 200, 3)
    assert len(reads) > 5 and max(w * h for w, h in reads) <= 1100 * 70
    diff = np.abs(banded.astype(np.int16) - expected.astype(np.int16))
    assert diff.mean() < 0.5 and diff.max() <= 2
