"""Plain images (PNG/JPEG/strip TIFF) as one-level slides."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from io_synthetic import tissue_like
from PIL import Image

from gigaslide.io import SlideReadError, open_slide
from gigaslide.io import image_backend as image_mod


def test_rgba_png_composited_on_white(tmp_path: Path) -> None:
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:, :25, 3] = 255  # left half opaque red-ish, right half fully transparent
    path = tmp_path / "a.png"
    Image.fromarray(rgba, "RGBA").save(path)
    slide = open_slide(path, mpp=1.0)
    assert slide.backend == "image"
    out = slide.read_region((0, 0), 0, (50, 40))
    assert out[:, :25].tolist() == [[[200, 0, 0]] * 25] * 40
    assert (out[:, 25:] == 255).all()


def test_grey_and_jpeg(tmp_path: Path) -> None:
    grey = (np.arange(60 * 70) % 251).astype(np.uint8).reshape(60, 70)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = open_slide(tmp_path / "g.png").read_region((5, 6), 0, (20, 10))
    np.testing.assert_array_equal(out, np.repeat(grey[6:16, 5:25, None], 3, axis=2))
    rgb = tissue_like(120, 160)
    Image.fromarray(rgb).save(tmp_path / "t.jpg", quality=95)
    slide = open_slide(tmp_path / "t.jpg")
    np.testing.assert_array_equal(
        slide.read_region((0, 0), 0, (160, 120)), np.asarray(Image.open(tmp_path / "t.jpg").convert("RGB"))
    )


def test_png_dpi_is_not_taken_as_mpp(tmp_path: Path) -> None:
    Image.fromarray(tissue_like(32, 32)).save(tmp_path / "d.png", dpi=(72, 72))
    assert open_slide(tmp_path / "d.png").mpp is None


def test_planar_tiff_and_memmap(tmp_path: Path) -> None:
    rgb = tissue_like(90, 110)
    tifffile.imwrite(
        tmp_path / "planar.tif", np.moveaxis(rgb, -1, 0), photometric="rgb", planarconfig="separate"
    )
    np.testing.assert_array_equal(open_slide(tmp_path / "planar.tif").read_region((0, 0), 0, (110, 90)), rgb)
    tifffile.imwrite(tmp_path / "plain.tif", rgb, photometric="rgb")
    slide = open_slide(tmp_path / "plain.tif")
    np.testing.assert_array_equal(slide.read_region((10, 20), 0, (30, 40)), rgb[20:60, 10:40])


def test_refusals_name_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tifffile.imwrite(tmp_path / "deep.tif", np.zeros((10, 10), np.uint16))
    with pytest.raises(
        SlideReadError,
        match=r"deep.tif: backend 'image' cannot read this file: uint16 pixels are not supported",
    ):
        open_slide(tmp_path / "deep.tif", backend="image")
    Image.fromarray(tissue_like(64, 64)).save(tmp_path / "big.png")
    monkeypatch.setattr(image_mod, "MAX_DECODED_BYTES", 1000)
    with pytest.raises(SlideReadError, match=r"big.png: .*64x64 px is too large"):
        open_slide(tmp_path / "big.png", backend="image")
