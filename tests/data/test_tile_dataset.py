"""TileDataset: lazy reads at the spec's level and size, padding, DataLoader workers, CLAM/TRIDENT files."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import cv2
import h5py
import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gigaslide.data.tile_dataset import TileBatch, TileDataset, collate_tiles, resize_tile, tile_to_chw
from gigaslide.io import open_slide
from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling import grid_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.synth import write_synthetic_slide

W, H = 2048, 1536


@pytest.fixture(scope="module")
def slide_path(tmp_path_factory) -> Path:
    # 0.25 um/px, levels at downsample 1, 2, 4
    return write_synthetic_slide(
        tmp_path_factory.mktemp("tds") / "s.tiff", width=W, height=H, mpp=0.25, n_levels=3
    )


def _spec(path: Path, target: float, tile: int = 128) -> TileSpec:
    with open_slide(path) as s:
        return TileSpec.create(
            tile_size=tile,
            target_mpp=target,
            slide_mpp=s.require_mpp(),
            level_downsamples=s.level_downsamples,
            level0_dims=s.dimensions,
        )


def test_reads_match_reference(slide_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    assert spec.read_level == 1 and spec.read_size == 128 and spec.level0_size == 256
    coords = np.array([[512, 256], [1024, 768]])
    ds = TileDataset(slide_path, coords, spec)
    assert len(ds) == 2
    img, coord = ds[1]
    assert img.dtype == torch.uint8 and img.shape == (3, 128, 128)
    assert coord.dtype == torch.int64 and coord.tolist() == [1024, 768]
    with open_slide(slide_path) as s:
        ref = s.read_region((1024, 768), 1, (128, 128))
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)
    with pytest.raises(IndexError):
        ds[2]
    assert torch.equal(ds[-1][0], img)


def test_resized_reads_and_transform(slide_path: Path) -> None:
    # 0.6 um/px on a 0.25 slide: 128 * 2.4 = 307 level-0 px read from level 1 (154 px) and shrunk
    spec = _spec(slide_path, 0.6)
    assert (spec.read_level, spec.read_size, spec.level0_size) == (1, 154, 307)
    seen = []
    ds = TileDataset(slide_path, [[300, 200]], spec, transform=lambda a: seen.append(a.shape) or a.mean())
    value, _ = ds[0]
    assert seen == [(128, 128, 3)]
    with open_slide(slide_path) as s:
        raw = s.read_region((300, 200), 1, (154, 154))
    ref = cv2.resize(raw, (128, 128), interpolation=cv2.INTER_AREA)
    assert value == pytest.approx(ref.mean())
    np.testing.assert_array_equal(ds.read_tile(0), ref)


def test_level_choice_matches_level0_downsampling(slide_path: Path) -> None:
    # 1.0 um/px: read level 2 directly; compare with reading level 0 and shrinking 4x
    spec = _spec(slide_path, 1.0)
    assert (spec.read_level, spec.read_size, spec.level0_size) == (2, 128, 512)
    tile = TileDataset(slide_path, [[512, 512]], spec).read_tile(0).astype(float)
    with open_slide(slide_path) as s:
        full = s.read_region((512, 512), 0, (512, 512))
    ref = cv2.resize(full, (128, 128), interpolation=cv2.INTER_AREA).astype(float)
    assert np.abs(tile - ref).mean() < 6.0  # same content, up to JPEG/pyramid differences
    assert tile.std() > 5  # not a blank tile


def test_edge_tiles_are_padded_white(slide_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    ds = TileDataset(slide_path, [[W - 128, H - 128], [W + 10, 0]], spec)
    tile = ds.read_tile(0)  # only the top-left 64 x 64 output pixels are inside the slide
    assert (tile[:, 66:] == 255).all() and (tile[66:, :] == 255).all()
    assert (ds.read_tile(1) == 255).all()


def test_resize_tile() -> None:
    a = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    assert resize_tile(a, 4) is a
    assert resize_tile(a, 2).shape == (2, 2, 3) and resize_tile(a, 8).shape == (8, 8, 3)
    np.testing.assert_array_equal(resize_tile(np.full((6, 6, 3), 7, np.uint8), 3), np.full((3, 3, 3), 7))


def test_dataloader_workers_match_single_process(slide_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    coords = grid_coords(spec)[::3]
    ds = TileDataset(slide_path, coords, spec)
    _ = ds[0]  # open a handle in the parent: workers must not reuse it
    single = list(DataLoader(ds, batch_size=4, num_workers=0))
    multi = list(DataLoader(ds, batch_size=4, num_workers=2))
    assert len(single) == len(multi) == -(-len(coords) // 4)
    for (a, ca), (b, cb) in zip(single, multi):
        assert torch.equal(a, b) and torch.equal(ca, cb)
    assert torch.equal(torch.cat([c for _, c in multi]), torch.from_numpy(coords))


def test_batched_reads_equal_per_tile_reads(slide_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    coords = grid_coords(spec)[::5]
    ds = TileDataset(slide_path, coords, spec)
    batch = ds.__getitems__([0, 2, -1])
    assert isinstance(batch, TileBatch) and batch.images.shape == (3, 3, 128, 128)
    for j, i in enumerate([0, 2, len(ds) - 1]):
        img, c = ds[i]
        assert torch.equal(batch.images[j], img) and torch.equal(batch.coords[j], c)
        assert torch.equal(batch[j][0], img)  # list view for the default collate
    with pytest.raises(IndexError, match="out of range"):
        ds.__getitems__([0, len(ds)])
    # the zero-copy collate and the default collate give the same batches, with and without workers
    ref = list(DataLoader(ds, batch_size=4, num_workers=0))
    for workers in (0, 2):
        fast = list(DataLoader(ds, batch_size=4, num_workers=workers, collate_fn=collate_tiles))
        assert len(fast) == len(ref)
        for (a, ca), (b, cb) in zip(ref, fast):
            assert torch.equal(a, b) and torch.equal(ca, cb)
            assert b.dtype == torch.uint8 and b.is_contiguous()


def test_tile_to_chw_equals_transpose() -> None:
    tile = np.random.default_rng(0).integers(0, 256, (64, 48, 3), dtype=np.uint8)
    ref = torch.from_numpy(np.ascontiguousarray(tile.transpose(2, 0, 1)))
    assert torch.equal(tile_to_chw(tile), ref)
    out = torch.zeros((3, 64, 48), dtype=torch.uint8)
    assert tile_to_chw(tile[:, :, :], out) is out and torch.equal(out, ref)


def test_pickle_drops_handle(slide_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    ds = TileDataset(slide_path, [[0, 0]], spec)
    first = ds[0][0]
    assert ds._slide is not None
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._slide is None and torch.equal(clone[0][0], first)
    ds.close()
    assert ds._slide is None and torch.equal(ds[0][0], first)


def test_coords_from_another_slide_are_rejected(slide_path: Path) -> None:
    spec = TileSpec.create(
        tile_size=128, target_mpp=0.5, slide_mpp=0.25, level_downsamples=[1.0], level0_dims=(9999, 9999)
    )
    with pytest.raises(ValueError, match=r"9999x9999 slide.*2048x1536"):
        TileDataset(slide_path, [[0, 0]], spec)[0]


def test_from_coords_file_gigaslide(slide_path: Path, tmp_path: Path) -> None:
    spec = _spec(slide_path, 0.5)
    coords = np.array([[0, 0], [256, 512]])
    path = write_coords(tmp_path / "s.h5", coords, spec)
    ds = TileDataset.from_coords_file(slide_path, path)
    assert ds.spec == spec and len(ds) == 2
    assert torch.equal(ds[1][0], TileDataset(slide_path, coords, spec)[1][0])


def _write_h5(path: Path, coords, attrs: dict) -> Path:
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in attrs.items():
            d.attrs[k] = v
    return path


def test_from_clam_file(slide_path: Path, tmp_path: Path) -> None:
    # CLAM: 256 px patches at level 1 (downsample 2); level_dim is level 1's size
    coords = np.array([[0, 0], [512, 512]])
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": np.array([2.0, 2.0]),
        "downsampled_level_dim": np.array([W // 2, H // 2]),
        "level_dim": np.array([W // 2, H // 2]),
        "name": "s",
        "save_path": str(tmp_path),
    }
    path = _write_h5(tmp_path / "clam.h5", coords, attrs)
    ds = TileDataset.from_coords_file(slide_path, path, mpp=0.25)
    assert ds.spec.level0_dims == (W, H) and ds.spec.target_mpp == pytest.approx(0.5)
    img, coord = ds[1]
    assert img.shape == (3, 256, 256) and coord.tolist() == [512, 512]
    with open_slide(slide_path) as s:
        ref = s.read_region((512, 512), 1, (256, 256))
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)


def test_from_trident_file(slide_path: Path, tmp_path: Path) -> None:
    # TRIDENT: 40x slide (0.25 um/px), 20x patches of 128 px = 256 level-0 px
    coords = np.array([[256, 0], [512, 256]])
    attrs = {
        "patch_size": 128,
        "patch_size_level0": 256,
        "level0_magnification": 40,
        "target_magnification": 20,
        "overlap": 0,
        "name": "s",
        "savetodir": str(tmp_path),
    }
    path = _write_h5(tmp_path / "s_patches.h5", coords, attrs)
    ds = TileDataset.from_coords_file(slide_path, path)
    assert ds.spec.tile_size == 128 and ds.spec.target_mpp == pytest.approx(0.5)
    img, _ = ds[0]
    assert img.shape == (3, 128, 128)
    with open_slide(slide_path) as s:
        ref = cv2.resize(s.read_region((256, 0), 0, (256, 256)), (128, 128), interpolation=cv2.INTER_AREA)
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)


@pytest.mark.parametrize(
    ("extra", "dims"),
    [({}, (4442, 3566)), ({"level0_dim": np.array([4443, 3567])}, (4443, 3567))],
)
def test_clam_file_on_tcga_level1(shared_data: Path, tmp_path: Path, extra: dict, dims: tuple) -> None:
    # TCGA: 4443 x 3567 with level 1 2221 x 1783; level_dim * downsample misses level 0 by a pixel
    slide = shared_data / "tcga-cr-7395-01a-01-ts1.svs"
    coords = np.array([[0, 0], [2048, 1536]])
    attrs = {
        "patch_size": 256,
        "patch_level": 1,
        "downsample": np.array([2.0, 2.0]),
        "downsampled_level_dim": np.array([2221, 1783]),
        "level_dim": np.array([2221, 1783]),
        **extra,
    }
    path = _write_h5(tmp_path / "tcga.h5", coords, attrs)
    ds = TileDataset.from_coords_file(slide, path, mpp=0.25)
    assert ds.spec.level0_dims == dims and ds.spec.target_mpp == pytest.approx(0.5)
    img, _ = ds[1]  # the geometry check tolerates one downsample
    with open_slide(slide) as s:
        ref = s.read_region((2048, 1536), 1, (256, 256))
    np.testing.assert_array_equal(img.permute(1, 2, 0).numpy(), ref)
    off = TileDataset(slide, coords, dataclasses.replace(ds.spec, level0_dims=(4439, 3567)), mpp=0.25)
    with pytest.raises(ValueError, match="4439x3567 slide but this slide is 4443x3567"):
        off[0]  # more than one downsample off: another slide
