"""CLAM and TRIDENT read gigaslide's coordinate files right (issue 13 section 4).

Each tool's reading rule is written out here from its documented semantics (no code of theirs):

* CLAM (``Whole_Slide_Bag_FP``): ``read_region(xy, patch_level, (patch_size, patch_size))``;
  ``StitchCoords`` needs ``name``; CLAM stores no step size.
* TRIDENT (``WSIPatcher`` from a coords file): ``ratio = level0_magnification /
  target_magnification``; ``size0 = round(patch_size * ratio)``; level = the one whose downsample
  is within 0.1 of ``ratio``, else the coarsest one below it; ``read_region(xy, level,
  (round(size0 / int(ds)),) * 2)`` resized to ``patch_size``. Without the magnifications it falls
  back to CLAM's attributes. Its Processor looks for ``patches/<name>_patches.h5``.
"""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest

from gigaslide.io import open_slide
from gigaslide.pipeline.convert import convert_coords, convert_folder
from gigaslide.pipeline.inputs import SlideInput
from gigaslide.pipeline.tile_job import run_tiling
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.synth import write_synthetic_slide


def _attrs(path: Path) -> dict:
    with h5py.File(path) as f:
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f["coords"].attrs.items()}


def _coords(path: Path) -> np.ndarray:
    with h5py.File(path) as f:
        return np.asarray(f["coords"][:])


def clam_read(slide, xy, attrs) -> np.ndarray:
    size = int(attrs["patch_size"])
    return slide.read_region((int(xy[0]), int(xy[1])), int(attrs["patch_level"]), (size, size))


def trident_level0_and_read(slide, xy, attrs) -> tuple[int, np.ndarray]:
    """(level-0 extent TRIDENT reads, the pixels it reads before resizing) for one tile."""
    if "level0_magnification" not in attrs or "target_magnification" not in attrs:  # CLAM fallback
        level, size = int(attrs["patch_level"]), int(attrs["patch_size"])
        return round(size * slide.level_downsamples[level]), clam_read(slide, xy, attrs)
    ratio = float(attrs["level0_magnification"]) / float(attrs["target_magnification"])
    size0 = round(int(attrs["patch_size"]) * ratio)
    dss = slide.level_downsamples
    exact = [i for i, d in enumerate(dss) if abs(d - ratio) <= 0.1]
    level = exact[0] if exact else max(i for i, d in enumerate(dss) if d <= ratio)
    size = round(size0 / int(dss[level]))
    pixels = slide.read_region((int(xy[0]), int(xy[1])), level, (size, size))
    return size * int(dss[level]), pixels


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # 0.499 um/px like CMU-1: at 1 um/px a tile is 513 level-0 px, read as 257 px at level 1
    path = tmp_path_factory.mktemp("s") / "cmu_like.tiff"
    return write_synthetic_slide(path, width=2048, height=1536, mpp=0.499, seed=0, n_levels=3)


@pytest.mark.parametrize("target_mpp", [1.0, 0.5])
def test_each_tool_reads_the_tile_gigaslide_means(
    slide_path: Path, tmp_path: Path, target_mpp: float
) -> None:
    slides = [SlideInput("s", slide_path)]
    kw = {"target_mpp": target_mpp, "tile_size": 256, "progress": False}
    run_tiling(slides, tmp_path / "g", **kw)
    run_tiling(slides, tmp_path / "t", layout="trident", **kw)
    g_path, t_path = tmp_path / "g" / "patches" / "s.h5", tmp_path / "t" / "patches" / "s_patches.h5"
    spec = read_coords(g_path).spec
    assert read_coords(t_path).spec == spec
    np.testing.assert_array_equal(_coords(g_path), _coords(t_path))
    g, t = _attrs(g_path), _attrs(t_path)
    assert g["name"] == t["name"] == "s"
    assert t["patch_size"] == 256 and t["patch_size_level0"] == spec.level0_size
    assert (t["level0_width"], t["level0_height"]) == (2048, 1536)
    assert "level0_magnification" not in g  # TRIDENT must take the CLAM path on the CLAM layout
    with open_slide(slide_path) as slide:
        for xy in _coords(g_path)[:5]:
            ours = slide.read_region(tuple(int(v) for v in xy), spec.read_level, (spec.read_size,) * 2)
            np.testing.assert_array_equal(clam_read(slide, xy, g), ours)
            for attrs in (g, t):  # TRIDENT on either layout: the same region, to TRIDENT's rounding
                extent, pixels = trident_level0_and_read(slide, xy, attrs)
                assert abs(extent - spec.level0_size) <= spec.read_downsample
                n = min(pixels.shape[0], ours.shape[0])
                np.testing.assert_array_equal(pixels[:n, :n], ours[:n, :n])
    # gigaslide's manifest points at the TRIDENT file, so `embed` reads that output as well
    with (tmp_path / "t" / "manifest.csv").open() as f:
        assert next(csv.DictReader(f))["coords_file"].endswith("s_patches.h5")


def test_convert_coordinate_folders_both_ways(slide_path: Path, tmp_path: Path) -> None:
    run_tiling([SlideInput("s", slide_path)], tmp_path / "g", target_mpp=1.0, tile_size=256, progress=False)
    spec = read_coords(tmp_path / "g" / "patches" / "s.h5").spec
    out = convert_folder(tmp_path / "g", tmp_path / "tri", "trident")
    assert not out.failed and out.written["s"] == tmp_path / "tri" / "patches" / "s_patches.h5"
    t = _attrs(out.written["s"])
    assert t["patch_size"] == 256 and t["name"] == "s"
    assert float(t["level0_magnification"]) / float(t["target_magnification"]) == pytest.approx(spec.scale)
    back = convert_coords(tmp_path / "tri", tmp_path / "clam", "clam")
    c = _attrs(back.written["s"])
    assert back.written["s"].name == "s.h5" and c["name"] == "s"
    assert (c["patch_level"], c["patch_size"]) == (spec.read_level, spec.read_size)
    np.testing.assert_array_equal(_coords(back.written["s"]), _coords(tmp_path / "g" / "patches" / "s.h5"))


def _foreign_trident(path: Path, width: int = 2048, height: int = 1536) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=np.array([[0, 0], [512, 0], [512, 512]], dtype=np.int64))
        ds.attrs.update(
            {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 20,
             "target_magnification": 10, "overlap": 0, "name": "s", "savetodir": "/x",
             "level0_width": width, "level0_height": height}
        )  # fmt: skip
    return path


def test_trident_files_become_clam_files(slide_path: Path, tmp_path: Path) -> None:
    _foreign_trident(tmp_path / "job" / "patches" / "s_patches.h5")
    out = convert_coords(tmp_path / "job", tmp_path / "clam", "clam")
    c = _attrs(out.written["s"])
    assert "target_magnification" not in c and c["name"] == "s"
    assert (c["patch_level"], c["patch_size"]) == (0, 512)  # TRIDENT reads 512 level-0 px
    with open_slide(slide_path) as slide:
        extent, tri = trident_level0_and_read(
            slide, (512, 0), _attrs(tmp_path / "job" / "patches" / "s_patches.h5")
        )
        assert extent == 512
        clam = clam_read(slide, (512, 0), c)
        assert clam.shape[0] * slide.level_downsamples[int(c["patch_level"])] == extent
        # the same region: CLAM's level-0 read shrunk to TRIDENT's level-1 read is nearly identical
        small = cv2.resize(clam, (256, 256), interpolation=cv2.INTER_AREA)
        assert np.abs(small.astype(int) - tri.astype(int)).mean() < 3


def _clam_file(path: Path, step_level: int = 128) -> Path:
    """CLAM create_patches_fp --patch_level 1 --patch_size 256 --step_size 128 on a 2x pyramid."""
    path.parent.mkdir(parents=True, exist_ok=True)
    step0 = step_level * 2
    xs = np.arange(0, 1536 - 512, step0)
    coords = np.array([(x, y) for y in xs[:3] for x in xs if (x + y) % (3 * step0)], dtype=np.int64)
    with h5py.File(path, "w") as f:
        ds = f.create_dataset("coords", data=coords)
        ds.attrs.update(
            {"patch_size": 256, "patch_level": 1, "downsample": [2.0, 2.0],
             "downsampled_level_dim": [1024, 768], "level_dim": [1024, 768], "name": "s", "save_path": "/x"}
        )  # fmt: skip
    return path


def test_clam_stride_inferred_from_coordinates(tmp_path: Path) -> None:
    spec = read_coords(_clam_file(tmp_path / "a" / "s.h5", 128), slide_mpp=0.25).spec
    assert (spec.tile_size, spec.stride, spec.level0_size, spec.level0_stride) == (256, 128, 512, 256.0)
    assert spec.overlap == 128
    plain = read_coords(_clam_file(tmp_path / "b" / "s.h5", 256), slide_mpp=0.25).spec
    assert (plain.stride, plain.level0_stride) == (256, 512.0)


def test_clam_to_trident_needs_the_mpp(tmp_path: Path) -> None:
    _clam_file(tmp_path / "clam" / "patches" / "s.h5")
    out = convert_coords(tmp_path / "clam", tmp_path / "t1", "trident")
    assert "--slide-mpp" in out.failed["s"]
    out = convert_coords(tmp_path / "clam", tmp_path / "t2", "trident", slide_mpp=0.25)
    t = _attrs(out.written["s"])
    assert (t["patch_size"], t["patch_size_level0"], t["overlap"]) == (256, 512, 128)
    assert float(t["level0_magnification"]) / float(t["target_magnification"]) == pytest.approx(2.0)


def test_trident_mpp_from_the_slide_and_level0_size_checked(slide_path: Path, tmp_path: Path) -> None:
    from gigaslide.data.tile_dataset import TileDataset

    path = _foreign_trident(tmp_path / "p" / "s_patches.h5")
    nominal = read_coords(path).spec
    assert nominal.slide_mpp == 0.5 and nominal.extra["mpp_source"] == "magnification"
    assert read_coords(path, slide_mpp=0.499).spec.slide_mpp == 0.499
    assert nominal.level0_dims == (2048, 1536)
    assert TileDataset.from_coords_file(slide_path, path).read_tile(0).shape == (256, 256, 3)
    wrong = _foreign_trident(tmp_path / "q" / "s_patches.h5", width=4096, height=3072)
    with pytest.raises(ValueError, match="computed on a 4096x3072 slide"):
        TileDataset.from_coords_file(slide_path, wrong).read_tile(0)


def test_embed_reads_trident_coordinates_with_the_slide_mpp(slide_path: Path, tmp_path: Path) -> None:
    """TRIDENT says 20x; the slide says 0.499 um/px: the features record the slide's value."""
    import dataclasses

    import torch

    from gigaslide.models.encoders import create_encoder
    from gigaslide.pipeline.embed_job import run_embedding

    torch.manual_seed(0)
    enc = create_encoder("resnet18_trunc", weights="random")
    enc.meta = dataclasses.replace(enc.meta, input_size=32)  # fully convolutional: small and fast
    _foreign_trident(tmp_path / "tri" / "patches" / "cmu_like_patches.h5")
    run = run_embedding(
        tmp_path / "tri", enc, tmp_path / "f", slides=slide_path, device="cpu", progress=False
    )
    assert run.n_done == 1 and run.n_failed == 0
    with h5py.File(tmp_path / "f" / "h5_files" / "cmu_like.h5") as f:
        assert float(f["features"].attrs["target_mpp"]) == pytest.approx(0.998)  # 2 x 0.499, not 1.0
        assert f["features"].shape[0] == 3


def test_embed_finds_a_trident_layout_tiling_output(
    slide_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gigaslide.pipeline.embed_inputs import discover_jobs

    monkeypatch.chdir(tmp_path)
    run_tiling([SlideInput("s", slide_path)], "t", layout="trident", progress=False)  # a relative --out
    [job] = discover_jobs("t")
    assert job.coords_path.name == "s_patches.h5" and job.n_tiles > 0 and not job.error
    (tmp_path / "t").rename(tmp_path / "moved")  # the manifest's paths are stale now
    [job] = discover_jobs(tmp_path / "moved")
    assert job.coords_path == tmp_path / "moved" / "patches" / "s_patches.h5" and job.n_tiles > 0
