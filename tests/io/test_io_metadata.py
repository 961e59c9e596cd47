"""mpp / objective parsing from TIFF resolution tags, Aperio descriptions and property dicts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile

from gigaslide.io import open_slide
from gigaslide.io.metadata import (
    mpp_from_properties,
    mpp_from_resolution,
    objective_from_properties,
    parse_aperio_description,
)


def test_resolution_units() -> None:
    assert mpp_from_resolution((20000, 1), (20000, 1), 3) == pytest.approx(0.5)  # px per cm
    assert mpp_from_resolution(50800.0, 50800.0, "inch") == pytest.approx(0.5)
    assert mpp_from_resolution((40000, 1), (10000, 1), "CENTIMETER") == pytest.approx((0.25 + 1.0) / 2)
    assert mpp_from_resolution((20000, 1), None, 3) == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("xres", "unit"),
    [((72, 1), 2), ((300, 1), "inch"), ((20000, 1), 1), ((20000, 1), None), ((0, 1), 3), ((5, 0), 3)],
)
def test_meaningless_resolution_is_ignored(xres: tuple[int, int], unit: object) -> None:
    assert mpp_from_resolution(xres, xres, unit) is None


def test_aperio_description() -> None:
    desc = "Aperio Image Library v10.0.51\r\n46920x33014 (256x256) JPEG/RGB Q=30|AppMag = 20|MPP = 0.4990|MPP = 9"
    meta = parse_aperio_description(desc)
    assert meta["AppMag"] == "20" and meta["MPP"] == "0.4990"  # first value of a repeated key wins
    assert parse_aperio_description("ImageJ=1.5\nimages=1") == {}


def test_property_lookup() -> None:
    props = {"openslide.mpp-x": "0.25", "openslide.mpp-y": "0.27", "openslide.objective-power": "40"}
    assert mpp_from_properties(props, ("openslide.mpp-x", "openslide.mpp-y")) == pytest.approx(0.26)
    assert mpp_from_properties({"a": "abc"}, ("a", "b")) is None
    assert objective_from_properties(props, ("x", "openslide.objective-power")) == 40.0
    assert objective_from_properties({"x": "-1"}, ("x",)) is None


@pytest.mark.parametrize("backend", ["tiff-direct", "openslide", "tiffslide"])
def test_generic_tiff_mpp_through_backends(tmp_path: Path, backend: str) -> None:
    image = np.full((300, 300, 3), 200, np.uint8)
    cm = tmp_path / "cm.tiff"
    tifffile.imwrite(
        cm,
        image,
        tile=(256, 256),
        photometric="rgb",
        resolution=(1e4 / 0.25, 1e4 / 0.25),
        resolutionunit="CENTIMETER",
    )
    dpi = tmp_path / "dpi.tiff"
    tifffile.imwrite(
        dpi, image, tile=(256, 256), photometric="rgb", resolution=(72, 72), resolutionunit="INCH"
    )
    assert open_slide(cm, backend=backend).mpp == pytest.approx(0.25)
    assert open_slide(dpi, backend=backend).mpp is None  # a 72 dpi default is not a microscope scale
