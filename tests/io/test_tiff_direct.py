"""The direct tile reader on synthetic pyramids: geometry, pixels vs OpenSlide, cache, fork safety, refusals."""

from __future__ import annotations

import multiprocessing as mp
import pickle
from pathlib import Path

import numpy as np
import pytest
import tifffile
from io_synthetic import tissue_like, write_pyramid

from gigaslide.io import SlideReadError, open_slide
from gigaslide.io.tiff_direct import TiffDirectSlide
from gigaslide.io.tiff_structure import TiffLayoutUnsupported


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def _crop_padded(image: np.ndarray, x: int, y: int, w: int, h: int) -> np.ndarray:
    """``image[y:y+h, x:x+w]`` with white where the window leaves the image."""
    out = np.full((h, w, 3), 255, np.uint8)
    part = image[y : y + h, x : x + w]
    out[: part.shape[0], : part.shape[1]] = part
    return out


def test_geometry_matches_openslide(pyramid_tiff: Path) -> None:
    ours = open_slide(pyramid_tiff)
    ref = open_slide(pyramid_tiff, backend="openslide")
    assert ours.backend == "tiff-direct" and ref.backend == "openslide"
    assert ours.level_dimensions == ref.level_dimensions == ((1300, 1000), (650, 500), (325, 250))
    assert ours.level_downsamples == pytest.approx(ref.level_downsamples)
    assert ours.mpp == pytest.approx(0.5) and ref.mpp == pytest.approx(0.5)
    assert ours.level_tile_size(2) == (256, 256)


@pytest.mark.parametrize("level", [0, 1, 2])
def test_pixels_match_openslide_and_source(
    pyramid_tiff: Path, synthetic_image: np.ndarray, level: int
) -> None:
    ours = open_slide(pyramid_tiff)
    ref = open_slide(pyramid_tiff, backend="openslide")
    ds = 2**level
    source = synthetic_image[::ds, ::ds]
    lw, lh = ours.level_dimensions[level]
    for x, y, w, h in [(0, 0, 256, 256), (37, 91, 300, 150), (lw - 100, lh - 60, 100, 60), (250, 5, 20, 240)]:
        a = ours.read_region((x * ds, y * ds), level, (w, h))
        assert a.shape == (h, w, 3) and a.dtype == np.uint8
        assert _mad(a, ref.read_region((x * ds, y * ds), level, (w, h))) < 0.5
        assert _mad(a, _crop_padded(source, x, y, w, h)) < 2.0  # JPEG loss only


def test_aperio_style_rgb_jpeg(tmp_path: Path, synthetic_image: np.ndarray) -> None:
    """RGB photometric JPEG without JFIF (the SVS layout) is decoded without a colour transform."""
    path = tmp_path / "rgb.tiff"
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for k in range(2):
            tw.write(
                synthetic_image[:: 2**k, :: 2**k],
                tile=(256, 256),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"outcolorspace": "RGB"},
                subsampling=(1, 1),
                subfiletype=1 if k else 0,
            )
    with tifffile.TiffFile(path) as tf:
        assert int(tf.pages[0].photometric) == 2 and not tf.pages[0].is_jfif
    ours = open_slide(path)
    ref = open_slide(path, backend="openslide")
    assert ours.backend == "tiff-direct"
    for level in (0, 1):
        a = ours.read_region((64, 128), level, (400, 300))
        assert _mad(a, ref.read_region((64, 128), level, (400, 300))) < 0.5
    assert _mad(ours.read_region((0, 0), 0, (1300, 1000)), synthetic_image) < 1.0


@pytest.mark.parametrize("compression", ["zlib", "lzw", None])
def test_lossless_codecs_are_exact(
    tmp_path: Path, synthetic_image: np.ndarray, compression: str | None
) -> None:
    path = write_pyramid(tmp_path / "lossless.tiff", synthetic_image, compression=compression)
    slide = open_slide(path)
    assert slide.backend == "tiff-direct"
    for level in range(3):
        ds = 2**level
        np.testing.assert_array_equal(
            slide.read_region((13 * ds, 50 * ds), level, (290, 200)),
            synthetic_image[::ds, ::ds][50:250, 13:303],
        )


def test_subifd_pyramid_levels(tmp_path: Path, synthetic_image: np.ndarray) -> None:
    path = write_pyramid(tmp_path / "sub.tiff", synthetic_image, subifds=True, compression="zlib")
    slide = open_slide(path)
    assert slide.backend == "tiff-direct"
    assert slide.level_dimensions == ((1300, 1000), (650, 500), (325, 250))
    np.testing.assert_array_equal(slide.read_region((0, 0), 2, (325, 250)), synthetic_image[::4, ::4])


def test_best_level_for_and_thumbnail(pyramid_tiff: Path) -> None:
    slide = open_slide(pyramid_tiff)
    assert [slide.best_level_for(m) for m in (0.25, 0.5, 0.9, 1.0, 1.9, 2.0, 8.0)] == [0, 0, 0, 1, 1, 2, 2]
    assert slide.level_mpp(2) == pytest.approx(2.0)
    thumb = slide.thumbnail(325)
    assert thumb.shape == (250, 325, 3)
    np.testing.assert_array_equal(thumb, slide.read_region((0, 0), 2, (325, 250)))


def test_grid_read_decodes_each_tile_once(pyramid_tiff: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    slide = TiffDirectSlide(pyramid_tiff)
    calls: list[tuple[int, int]] = []
    original = slide._decode

    def counting(level: int, index: int) -> np.ndarray | None:
        calls.append((level, index))
        return original(level, index)

    monkeypatch.setattr(slide, "_decode", counting)
    reference = open_slide(pyramid_tiff, backend="openslide")
    # 224 px tiles with stride 200 straddle the 256 px stored tiles in both directions
    for y in range(0, 1000 - 224, 200):
        for x in range(0, 1300 - 224, 200):
            region = slide.read_region((x, y), 0, (224, 224))
            if (x, y) in {(0, 0), (600, 400)}:
                assert _mad(region, reference.read_region((x, y), 0, (224, 224))) < 0.5
    assert len(calls) == len(set(calls))  # no tile decoded twice
    assert len(set(calls)) == 5 * 4  # the 256 px tiles covering x < 1224, y < 824


def test_cached_tiles_are_not_aliased(pyramid_tiff: Path) -> None:
    slide = open_slide(pyramid_tiff)
    first = slide.read_region((10, 10), 0, (100, 100))
    first[:] = 0  # caller mutates its copy
    again = slide.read_region((10, 10), 0, (100, 100))
    assert again.std() > 0 and again.max() > 0
    whole = slide.read_region((0, 0), 0, (256, 256))  # exact tile, served from the cache now
    assert whole.flags.writeable
    whole[:] = 0
    assert slide.read_region((10, 10), 0, (100, 100)).max() > 0


def _read_in_child(slide: TiffDirectSlide, queue: mp.Queue) -> None:
    queue.put(slide.read_region((300, 200), 1, (128, 96)))


def test_fork_and_pickle_safe(pyramid_tiff: Path) -> None:
    slide = open_slide(pyramid_tiff)
    expected = slide.read_region((300, 200), 1, (128, 96))  # parent opens its descriptor first
    clone = pickle.loads(pickle.dumps(slide))
    np.testing.assert_array_equal(clone.read_region((300, 200), 1, (128, 96)), expected)
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_read_in_child, args=(slide, queue))
    proc.start()
    got = queue.get(timeout=30)
    proc.join(timeout=30)
    assert proc.exitcode == 0
    np.testing.assert_array_equal(got, expected)
    slide.close()
    slide.close()  # idempotent


def test_refuses_strip_tiff_so_auto_falls_back(tmp_path: Path) -> None:
    path = tmp_path / "strips.tif"
    image = tissue_like(300, 400)
    tifffile.imwrite(path, image, photometric="rgb")
    with pytest.raises(TiffLayoutUnsupported, match="no tiled image"):
        TiffDirectSlide(path)
    with pytest.raises(SlideReadError, match=r"strips\.tif"):
        open_slide(path, backend="tiff-direct")
    slide = open_slide(path)
    assert slide.backend == "image"
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (400, 300)), image)


def test_refuses_16_bit(tmp_path: Path) -> None:
    path = tmp_path / "deep.tiff"
    tifffile.imwrite(path, np.zeros((300, 300, 3), np.uint16), tile=(256, 256), photometric="rgb")
    with pytest.raises(TiffLayoutUnsupported, match="16-bit"):
        TiffDirectSlide(path)


def test_truncated_file_reports_tile(tmp_path: Path, synthetic_image: np.ndarray) -> None:
    path = tmp_path / "cut.tiff"
    tifffile.imwrite(path, synthetic_image, tile=(256, 256), photometric="rgb", compression="zlib")
    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        last_start, last_size = int(page.dataoffsets[-1]), int(page.databytecounts[-1])
        ifd_end = int(page.offset) + 500
    assert last_start > ifd_end  # the IFD precedes the tile data, so the structure survives the cut
    path.write_bytes(path.read_bytes()[: last_start + last_size // 2])
    slide = open_slide(path, backend="tiff-direct")
    assert slide.read_region((0, 0), 0, (64, 64)).shape == (64, 64, 3)
    with pytest.raises(SlideReadError, match=r"cut.tiff: file is truncated \(tile 23 of level 0"):
        slide.read_region((1299, 999), 0, (1, 1))
