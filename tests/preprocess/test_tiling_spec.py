"""TileSpec geometry, level choice and CLAM/TRIDENT attribute round trips."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gigaslide.preprocess.coords_io import read_coords, write_coords
from gigaslide.preprocess.tiling_spec import TileSpec


@pytest.mark.parametrize(
    ("slide_mpp", "level0"),
    [(0.25, 512), (0.265, 483), (0.499, round(256 * 0.5 / 0.499)), (0.5, 256)],
)
def test_level0_size_is_exact(slide_mpp: float, level0: int) -> None:
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=slide_mpp, level_downsamples=[1.0], level0_dims=(5000, 4000)
    )
    assert spec.level0_size == level0
    assert spec.level0_stride == pytest.approx(256 * 0.5 / slide_mpp)
    assert spec.read_level == 0 and spec.read_size == level0


@pytest.mark.parametrize(
    ("target", "level", "read_size"),
    [
        (0.25, 0, 256),  # native
        (0.5, 0, 512),  # between level 0 and 1: read level 0, shrink 2x
        (1.0, 1, 256),  # exactly level 1
        (2.0, 1, 512),  # between 1 and 2
        (4.0, 2, 256),  # exactly level 2
        (8.0, 2, 512),  # coarser than every level: coarsest level, shrink
        (0.1, 0, 102),  # finer than level 0: level 0, upsampled
    ],
)
def test_read_level_is_coarsest_at_least_as_fine(target: float, level: int, read_size: int) -> None:
    spec = TileSpec.create(
        tile_size=256,
        target_mpp=target,
        slide_mpp=0.25,
        level_downsamples=[1.0, 4.0, 16.0],
        level0_dims=(8192, 8192),
    )
    assert (spec.read_level, spec.read_size) == (level, read_size)
    assert spec.read_downsample == [1.0, 4.0, 16.0][level]


def test_read_level_tolerates_inexact_downsamples() -> None:
    # OpenSlide reports 4.0003 for a level that is nominally 4x: still chosen for 1.0 um/px
    spec = TileSpec.create(
        tile_size=256, target_mpp=1.0, slide_mpp=0.25, level_downsamples=[1.0, 4.0003], level0_dims=(9, 9)
    )
    assert spec.read_level == 1 and spec.read_size == 256


def test_grid_shape_covers_slide() -> None:
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.5, level_downsamples=[1.0], level0_dims=(1000, 256)
    )
    assert spec.grid_shape() == (4, 1)  # 0, 256, 512, 768 (last hangs over 1000)
    overlap = TileSpec.create(
        tile_size=256,
        stride=128,
        target_mpp=0.5,
        slide_mpp=0.5,
        level_downsamples=[1.0],
        level0_dims=(512, 512),
    )
    assert overlap.grid_shape() == (3, 3) and overlap.overlap == 128


@pytest.mark.parametrize("bad", [{"tile_size": 0}, {"target_mpp": -1.0}, {"stride": 0}, {"min_tissue": 1.5}])
def test_create_rejects_bad_values(bad: dict) -> None:
    kw = dict(tile_size=256, target_mpp=0.5, slide_mpp=0.25, level_downsamples=[1.0], level0_dims=(9, 9))
    with pytest.raises(ValueError):
        TileSpec.create(**{**kw, **bad})


def test_gigaslide_attrs_round_trip(tmp_path) -> None:
    spec = TileSpec.create(
        tile_size=224,
        stride=200,
        target_mpp=0.5,
        slide_mpp=0.2526,
        level_downsamples=[1.0, 4.0, 16.0],
        level0_dims=(40000, 30000),
        min_tissue=0.4,
    )
    coords = np.array([[0, 0], [400, 800]], dtype=np.int64)
    path = write_coords(tmp_path / "a.h5", coords, spec, tissue_fraction=np.array([0.5, 1.0]))
    cf = read_coords(path)
    assert cf.spec == spec
    np.testing.assert_array_equal(cf.coords, coords)
    np.testing.assert_allclose(cf.tissue_fraction, [0.5, 1.0])
    # CLAM's readers use patch_level/patch_size: the region read at that level
    assert cf.attrs["patch_level"] == spec.read_level and cf.attrs["patch_size"] == spec.read_size
    assert cf.attrs["level_dim"] == [40000, 30000]  # read level 0 here
    assert cf.attrs["patch_size_level0"] == spec.level0_size


def _write_h5(path, coords, attrs) -> None:
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in attrs.items():
            ds.attrs[k] = v


def test_clam_file(tmp_path) -> None:
    # CLAM create_patches_fp: patch_level 1 of a 4x pyramid, level_dim is the size OF THAT LEVEL
    path = tmp_path / "clam.h5"
    coords = np.array([[0, 0], [1024, 0], [0, 1024]])
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": np.array([4.0, 4.0]),
        "downsampled_level_dim": np.array([2500, 2000]),
        "level_dim": np.array([2500, 2000]),
        "name": "slide",
        "save_path": "/x",
    }
    _write_h5(path, coords, attrs)
    cf = read_coords(path, slide_mpp=0.25)
    s = cf.spec
    assert (s.read_level, s.read_size, s.read_downsample, s.tile_size) == (1, 256, 4.0, 256)
    assert s.level0_size == 1024 and s.level0_stride == 1024
    assert s.level0_dims == (10000, 8000)
    assert s.target_mpp == pytest.approx(1.0) and s.extra["source"] == "clam"
    np.testing.assert_array_equal(cf.coords, coords)
    # without mpp the geometry still reads (mpp unknown)
    assert np.isnan(read_coords(path).spec.target_mpp)


def test_trident_file(tmp_path) -> None:
    path = tmp_path / "slide_patches.h5"
    coords = np.array([[0, 0], [448, 0]])
    attrs = {
        "patch_size": 256,
        "patch_size_level0": 512,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 32,
        "name": "slide",
        "savetodir": "/x",
    }
    _write_h5(path, coords, attrs)
    s = read_coords(path).spec
    assert s.slide_mpp == pytest.approx(0.25) and s.target_mpp == pytest.approx(0.5)
    assert (s.tile_size, s.stride, s.level0_size, s.read_level, s.read_size) == (256, 224, 512, 0, 512)
    assert s.level0_stride == pytest.approx(448)
    # an explicit slide mpp wins over the nominal magnification
    assert read_coords(path, slide_mpp=0.2527).spec.target_mpp == pytest.approx(0.5054)


def test_unknown_attrs_rejected(tmp_path) -> None:
    path = tmp_path / "x.h5"
    _write_h5(path, [[0, 0]], {"foo": 1})
    with pytest.raises(ValueError, match="unrecognised"):
        read_coords(path)
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not hdf5")
    with pytest.raises(ValueError, match=r"bad\.h5"):
        read_coords(bad)


def test_clam_level0_dim_preferred_over_scaled_level_dim(tmp_path) -> None:
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": np.array([2.0, 2.0]),
        "level_dim": [2221, 1783],
    }
    _write_h5(tmp_path / "a.h5", [[0, 0]], attrs)
    assert read_coords(tmp_path / "a.h5", slide_mpp=0.25).spec.level0_dims == (4442, 3566)  # 2221 * 2.0
    _write_h5(tmp_path / "b.h5", [[0, 0]], {**attrs, "level0_dim": np.array([4443, 3567])})
    assert read_coords(tmp_path / "b.h5", slide_mpp=0.25).spec.level0_dims == (4443, 3567)
