"""The public test slides in ../shared/data through every backend that can read them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaslide.io import MissingMPPError, SlideReadError, list_backends, open_slide
from gigaslide.io.registry import backend_unavailable_reason

CMU = "cmu-1-small-region.svs"
TCGA = "tcga-cr-7395-01a-01-ts1.svs"
KIDNEY = "kidney-48-5.tif"
BROKEN = "broken.svs"


def _mad(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def test_cmu1_auto_choice_metadata_and_read(shared_data: Path) -> None:
    with open_slide(shared_data / CMU) as slide:
        assert slide.backend == "tiff-direct"
        assert slide.dimensions == (2220, 2967)
        assert slide.level_count == 1
        assert slide.mpp == pytest.approx(0.499)
        assert slide.require_mpp() == pytest.approx(0.499)
        assert slide.objective_power == 20
        assert slide.properties["aperio.MPP"] == "0.4990"
        region = slide.read_region((1000, 1500), 0, (300, 200))
        assert region.shape == (200, 300, 3) and region.dtype == np.uint8
        assert region.std() > 5  # real tissue, not padding


@pytest.mark.parametrize("backend", ["tiff-direct", "tiffslide"])
def test_cmu1_pixels_match_openslide(shared_data: Path, backend: str) -> None:
    ours = open_slide(shared_data / CMU, backend=backend)
    ref = open_slide(shared_data / CMU, backend="openslide")
    assert ours.level_dimensions == ref.level_dimensions
    assert ours.mpp == pytest.approx(ref.mpp)
    # tile-aligned, straddling several 240 px tiles, and one at the bottom-right corner
    for loc, size in [((240, 480), (240, 240)), ((317, 1011), (523, 389)), ((2100, 2900), (120, 67))]:
        assert _mad(ours.read_region(loc, 0, size), ref.read_region(loc, 0, size)) < 0.5


@pytest.mark.parametrize("backend", ["tiff-direct", "openslide", "tiffslide"])
def test_padding_outside_slide_is_white(shared_data: Path, backend: str) -> None:
    slide = open_slide(shared_data / CMU, backend=backend)
    w, h = slide.dimensions
    inside = slide.read_region((w - 64, h - 64), 0, (64, 64))
    region = slide.read_region((w - 64, h - 64), 0, (128, 100))
    assert region.shape == (100, 128, 3)
    np.testing.assert_array_equal(region[:64, :64], inside)
    assert (region[64:] == 255).all() and (region[:, 64:] == 255).all()
    negative = slide.read_region((-30, -10), 0, (100, 50))
    assert (negative[:10] == 255).all() and (negative[:, :30] == 255).all()
    np.testing.assert_array_equal(negative[10:, 30:], slide.read_region((0, 0), 0, (70, 40)))
    assert (slide.read_region((w + 5, 0), 0, (16, 16)) == 255).all()


@pytest.mark.parametrize("backend", ["tiff-direct", "openslide", "tiffslide"])
def test_tcga_without_mpp(shared_data: Path, backend: str) -> None:
    slide = open_slide(shared_data / TCGA, backend=backend)
    assert slide.level_count == 2
    assert slide.level_dimensions == ((4443, 3567), (2221, 1783))
    assert slide.mpp is None
    with pytest.raises(MissingMPPError, match="--slide-mpp") as info:
        slide.require_mpp()
    assert TCGA in str(info.value)
    given = open_slide(shared_data / TCGA, mpp=0.25, backend=backend)
    assert given.require_mpp() == 0.25
    assert given.level_mpp(1) == pytest.approx(0.25 * 2.0005055, rel=1e-6)
    assert given.best_level_for(0.5) == 1  # level 1 is 0.50013 um/px, within the 1% tolerance
    assert given.best_level_for(0.49) == 0


def test_tcga_tiff_direct_matches_openslide(shared_data: Path) -> None:
    ours = open_slide(shared_data / TCGA)
    ref = open_slide(shared_data / TCGA, backend="openslide")
    assert ours.backend == "tiff-direct"  # JPEG 2000 tiles served through tifffile's decoder
    assert ours.level_downsamples == pytest.approx(ref.level_downsamples, abs=1e-12)
    assert (
        _mad(ours.read_region((1200, 900), 0, (400, 300)), ref.read_region((1200, 900), 0, (400, 300))) < 0.5
    )
    assert _mad(ours.read_region((0, 0), 1, (600, 500)), ref.read_region((0, 0), 1, (600, 500))) < 0.5


def test_mpp_argument_overrides_metadata(shared_data: Path) -> None:
    slide = open_slide(shared_data / CMU, mpp=0.25)
    assert slide.metadata_mpp == pytest.approx(0.499)
    assert slide.mpp == 0.25


@pytest.mark.parametrize("backend", [None, *list_backends()])
def test_broken_file_names_file_and_reason(shared_data: Path, backend: str | None) -> None:
    if backend is not None and backend_unavailable_reason(backend) is not None:
        pytest.skip(f"{backend} not installed (its unavailability is tested in test_registry)")
    with pytest.raises(SlideReadError) as info:
        open_slide(shared_data / BROKEN, backend=backend)
    msg = str(info.value)
    assert str(shared_data / BROKEN) in msg
    assert len(msg) > len(str(shared_data / BROKEN)) + 20  # a reason follows the name
    if backend is None:
        for name in list_backends():  # every backend's reason, or named among those not installed
            assert f"- {name}:" in msg or (
                "not installed here: " in msg and name in msg.split("not installed here: ")[1]
            )


def test_kidney_plain_tiff_uses_image_backend(shared_data: Path) -> None:
    with pytest.raises(SlideReadError, match=KIDNEY):
        open_slide(shared_data / KIDNEY, backend="openslide")
    slide = open_slide(shared_data / KIDNEY, mpp=0.5)
    assert slide.backend == "image"
    assert slide.dimensions == (1493, 901) and slide.level_count == 1
    assert slide.require_mpp() == 0.5
    reference = np.asarray(Image.open(shared_data / KIDNEY).convert("RGB"))
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (1493, 901)), reference)
    np.testing.assert_array_equal(slide.read_region((700, 400), 0, (256, 256)), reference[400:656, 700:956])
    edge = slide.read_region((1400, 850), 0, (200, 100))
    np.testing.assert_array_equal(edge[:51, :93], reference[850:, 1400:])
    assert (edge[51:] == 255).all() and (edge[:, 93:] == 255).all()
    with pytest.raises(MissingMPPError, match="--slide-mpp"):
        open_slide(shared_data / KIDNEY).require_mpp()


def test_png_patch_opens_with_image_backend(shared_data: Path) -> None:
    slide = open_slide(shared_data / "he-patch-256.png")
    assert slide.backend == "image" and slide.dimensions == (256, 256)
    reference = np.asarray(Image.open(shared_data / "he-patch-256.png").convert("RGB"))
    np.testing.assert_array_equal(slide.read_region((0, 0), 0, (256, 256)), reference)


def test_thumbnail_matches_between_backends(shared_data: Path) -> None:
    ours = open_slide(shared_data / TCGA).thumbnail(256)
    ref = open_slide(shared_data / TCGA, backend="openslide").thumbnail(256)
    assert ours.shape == ref.shape == (206, 256, 3)
    assert _mad(ours, ref) < 1.0
