"""tile_slide on real slides (CMU-1, TCGA without mpp) and synthetic pyramids; HIPT regions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.io import MissingMPPError, open_slide
from gigaslide.preprocess.tiling import grid_coords, subtile_coords, subtile_spec, tile_slide
from gigaslide.synth import write_synthetic_slide


def test_cmu1_tissue_tiles(shared_data: Path) -> None:
    with open_slide(shared_data / "cmu-1-small-region.svs") as slide:
        res = tile_slide(slide, target_mpp=0.5, tile_size=256)
        spec = res.spec
        assert spec.level0_size == round(256 * 0.5 / 0.499) == 257 and spec.read_size == 257
        assert spec.level0_dims == (2220, 2967) and spec.grid_shape() == (9, 12)
        grid = grid_coords(spec)
        assert 20 <= res.n_tiles <= 0.7 * len(grid)  # tissue found, background excluded
        kept = {tuple(c) for c in res.coords.tolist()}
        corners = [(0, 0), (int(grid[:, 0].max()), 0), (0, int(grid[:, 1].max()))]
        assert not kept & set(corners)
        assert (res.tissue_fraction >= 0.25).all()
        # kept tiles are darker (stained) than the rejected ones
        rejected = np.array([c for c in grid.tolist() if tuple(c) not in kept])
        ds_keep = TileDataset(slide.path, res.coords[::4], spec)
        ds_rej = TileDataset(slide.path, rejected[::4], spec)
        mean_keep = np.mean([ds_keep.read_tile(i).mean() for i in range(len(ds_keep))])
        mean_rej = np.mean([ds_rej.read_tile(i).mean() for i in range(len(ds_rej))])
        assert mean_keep < mean_rej - 20


def test_tcga_needs_mpp(shared_data: Path) -> None:
    path = shared_data / "tcga-cr-7395-01a-01-ts1.svs"
    with open_slide(path) as slide, pytest.raises(MissingMPPError, match=r"tcga-cr-7395.*--slide-mpp"):
        tile_slide(slide, 0.5, 256)
    with open_slide(path, mpp=0.25) as slide:
        res = tile_slide(slide, 0.5, 256)
    # 0.5 um/px on 0.25: 512 level-0 px, read from level 1 (downsample 2.0005) at 256 px
    assert (res.spec.level0_size, res.spec.read_level, res.spec.read_size) == (512, 1, 256)
    assert res.n_tiles > 0


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    # 0.25 um/px with levels at downsample 1, 2, 4
    d = tmp_path_factory.mktemp("pyr")
    return write_synthetic_slide(d / "p.tiff", width=2048, height=1536, mpp=0.25, n_levels=3, seed=3)


@pytest.mark.parametrize(
    ("target", "level", "read_size", "level0"),
    [(0.25, 0, 128, 128), (0.5, 1, 128, 256), (1.0, 2, 128, 512), (0.75, 1, 192, 384), (2.0, 2, 256, 1024)],
)
def test_level_choice_on_pyramid(
    pyramid: Path, target: float, level: int, read_size: int, level0: int
) -> None:
    with open_slide(pyramid) as slide:
        assert slide.level_downsamples == pytest.approx((1.0, 2.0, 4.0))
        res = tile_slide(slide, target, 128, min_tissue=0.1)
    assert (res.spec.read_level, res.spec.read_size, res.spec.level0_size) == (level, read_size, level0)
    assert res.n_tiles > 0 and (res.coords % 1 == 0).all()


def test_exact_size_on_0265_slide(tmp_path: Path) -> None:
    path = write_synthetic_slide(tmp_path / "a.tiff", width=1536, height=1024, mpp=0.265, n_levels=2)
    with open_slide(path) as slide:
        res = tile_slide(slide, 0.5, 256, min_tissue=0.1)
    assert res.spec.level0_size == 483 and res.spec.read_level == 0 and res.spec.read_size == 483
    steps = np.unique(np.diff(np.unique(grid_coords(res.spec)[:, 0])))
    assert set(steps.tolist()) <= {483, 484}


@pytest.fixture(scope="module")
def hipt_slide(tmp_path_factory) -> Path:
    return write_synthetic_slide(tmp_path_factory.mktemp("hipt") / "h.tiff", width=4096, height=3072, mpp=0.5)


def test_hipt_region_subtiles_are_region_blocks(hipt_slide: Path) -> None:
    with open_slide(hipt_slide) as slide:
        regions = tile_slide(slide, 0.5, 4096, min_tissue=0.1)
        assert regions.spec.level0_size == 4096 and regions.coords.tolist() == [[0, 0]]
        region = TileDataset(hipt_slide, regions.coords, regions.spec).read_tile(0)  # (4096, 4096, 3)
    sub = subtile_coords(regions.coords, regions.spec)[0]  # (256, 2)
    tiles = TileDataset(hipt_slide, sub, subtile_spec(regions.spec))
    for k in (0, 17, 100, 255):
        r, c = divmod(k, 16)
        np.testing.assert_array_equal(
            tiles.read_tile(k), region[r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256]
        )


def test_tiling_finer_than_level0_warns_but_tiles(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = write_synthetic_slide(tmp_path / "u.tiff", width=512, height=384, mpp=0.5, seed=1)
    with open_slide(path) as slide, caplog.at_level("WARNING", logger="gigaslide.preprocess.tiling"):
        res = tile_slide(slide, 0.25, 128, min_tissue=0.1)  # 128 px tiles from 64 level-0 px
        assert (res.spec.read_level, res.spec.read_size) == (0, 64) and res.n_tiles > 0
        assert res.warning.startswith("tiles are upsampled x2 from level 0")
        assert "--target-mpp 0.5" in res.warning
        assert [r.getMessage() for r in caplog.records] == [f"{path}: {res.warning}"]
        caplog.clear()
        for target in (0.5, 0.496):  # at level 0, or finer by less than 1%: no warning
            assert tile_slide(slide, target, 128, min_tissue=0.1).warning == ""
        assert caplog.records == []
