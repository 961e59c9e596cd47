"""Slide-level augmentation, the bank file format and the Giga-SSL view sampler."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from gigaslide.data.feature_writer import ChunkedFeatureWriter, partial_path_for
from gigaslide.data.gigassl_bank import AUGS_DONE_ATTR, BankWriter, GigaSSLBank, read_bank_slide
from gigaslide.data.gigassl_views import GigaSSLViews, tile_cells
from gigaslide.data.slide_augment import SlideAugment, monotone_scale
from gigaslide.preprocess.tiling_spec import TileSpec

SPEC = TileSpec.create(
    tile_size=256, target_mpp=1.0, slide_mpp=0.265, level_downsamples=[1.0, 4.0], level0_dims=(60000, 40000)
)
N_AUG, N_TILES, DIM = 4, 12, 6


def write_bank(root: Path, n_slides: int, seed: int = 0) -> Path:
    """n_slides bank files whose tiles lie on the tile grid; features encode (slide, aug, tile)."""
    rng = np.random.default_rng(seed)
    for s in range(n_slides):
        grid = np.array([(i, j) for i in range(8) for j in range(8)])
        coords = np.stack(
            [np.rint(grid[rng.choice(64, N_TILES, replace=False)] * SPEC.level0_stride) for _ in range(N_AUG)]
        ).astype(np.int64)
        feats = np.zeros((N_AUG, N_TILES, DIM), dtype=np.float32)
        feats[..., 0] = s
        feats[..., 1] = np.arange(N_AUG)[:, None]
        feats[..., 2] = np.arange(N_TILES)[None, :]
        attrs = {"slide_id": f"s{s}", "n_aug": N_AUG, "n_tiles": N_TILES, "encoder": "test"}
        with BankWriter(
            root / "h5_files" / f"s{s}.h5",
            coords,
            DIM,
            "fp",
            features_attrs=attrs,
            coords_attrs=SPEC.to_attrs(),
        ) as w:
            assert w.open() == 0
            for a in range(N_AUG):
                w.write(feats[a])
            w.finalize()
    return root


# -- slide-level augmentation ------------------------------------------------------------
def test_monotone_scale_is_strictly_increasing_and_exact_above_one() -> None:
    values = np.array([0, 1, 2, 5, 9, 10, 2, 1])
    for factor in (0.5, 0.73, 1.0, 1.6, 2.0):
        out = monotone_scale(values, factor)
        order = np.argsort(values, kind="stable")
        assert (np.diff(out[order]) >= 0).all()
        assert len(np.unique(out)) == len(np.unique(values))  # distinct stay distinct, equal stay equal
        if factor >= 1:
            np.testing.assert_array_equal(out, np.rint(factor * values))
    np.testing.assert_array_equal(monotone_scale(np.array([0, 4, 8, 9]), 0.5), [0, 2, 4, 5])


@pytest.mark.parametrize("seed", range(8))
def test_slide_augment_keeps_the_number_of_active_sites(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cells = np.unique(rng.integers(0, 30, size=(60, 2)), axis=0)
    out = SlideAugment()(cells, np.random.default_rng(seed + 100))
    assert out.shape == cells.shape and out.dtype == np.int64
    assert len(np.unique(out, axis=0)) == len(cells)
    assert (out.min(axis=0) == 0).all()


def test_slide_augment_components() -> None:
    cells = np.array([[0, 0], [3, 1], [1, 2]])
    rng = np.random.default_rng(0)
    none = SlideAugment(flip=False, rotate90=False, scale=None)
    np.testing.assert_array_equal(none(cells, rng), cells)
    # rotations and flips only: the result is one of the 8 symmetries of the square, shifted to 0
    syms = set()
    for k in range(40):
        out = SlideAugment(scale=None)(cells, np.random.default_rng(k))
        syms.add(out.tobytes())
        d = np.abs(out[:, None] - out[None]).sum(-1)
        np.testing.assert_array_equal(d, np.abs(cells[:, None] - cells[None]).sum(-1))  # L1 distances kept
    assert len(syms) == 8
    with pytest.raises(ValueError, match="0 < low <= high"):
        SlideAugment(scale=(2.0, 0.5))


def test_tile_cells_on_the_grid_and_with_a_grid_unit() -> None:
    idx = np.array([[0, 0], [1, 0], [3, 2], [7, 5]])
    coords = np.rint(idx * SPEC.level0_stride) + 1000  # 966.04 level-0 px per tile: rounding matters
    np.testing.assert_array_equal(tile_cells(coords, SPEC), idx)
    # d = 224 px at the tiling resolution: a 256 px stride is 8/7 of a cell
    np.testing.assert_array_equal(tile_cells(coords, SPEC, grid_unit=224), np.floor(idx * 256 / 224 + 1e-9))


# -- bank files ---------------------------------------------------------------------------
def test_bank_writer_resumes_at_the_next_augmentation(tmp_path: Path) -> None:
    coords = np.arange(N_AUG * N_TILES * 2).reshape(N_AUG, N_TILES, 2)
    final = tmp_path / "h5_files" / "a.h5"
    feats = np.random.default_rng(0).normal(size=(N_AUG, N_TILES, DIM)).astype(np.float32)
    with BankWriter(final, coords, DIM, "fp1") as w:
        w.open()
        w.write(feats[0])
        w.write(feats[1])  # interrupted here
    assert not final.exists() and partial_path_for(final).exists()
    with h5py.File(partial_path_for(final)) as f:
        assert f.attrs[AUGS_DONE_ATTR] == 2
    with BankWriter(final, coords, DIM, "fp1") as w:
        assert w.open() == 2
        w.write(feats[2])
        w.write(feats[3])
        w.finalize()
    with h5py.File(final) as f:
        assert list(f["features"].attrs["item_shape"]) == [N_TILES, DIM]  # the N-D feature-file convention
        np.testing.assert_array_equal(f["features"][:], feats)
        np.testing.assert_array_equal(f["coords"][:], coords)
    meta = read_bank_slide(final)
    assert (meta.n_aug, meta.n_tiles, meta.dim, meta.slide_id) == (N_AUG, N_TILES, DIM, "a")
    # another fingerprint discards a stale partial file
    with BankWriter(tmp_path / "b.h5", coords, DIM, "fp1") as w:
        w.open()
        w.write(feats[0])
    with BankWriter(tmp_path / "b.h5", coords, DIM, "fp2") as w:
        assert w.open() == 0
        with pytest.raises(RuntimeError, match="only 0 of 4"):
            w.finalize()


def write_old_layout_bank(
    path: Path, feats: np.ndarray, coords: np.ndarray, fingerprint: str, done: int
) -> None:
    """A bank file as the pre-ChunkedFeatureWriter BankWriter laid it out: one (1, n_tiles, D) HDF5 chunk per
    augmentation, file attrs gigaslide_fingerprint / gigaslide_rows_done, features attrs + item_shape."""
    n_aug, n_tiles, dim = feats.shape
    with h5py.File(path, "w") as f:
        f.attrs["gigaslide_fingerprint"] = fingerprint
        f.attrs[AUGS_DONE_ATTR] = done
        fd = f.create_dataset("features", shape=feats.shape, dtype=np.float32, chunks=(1, n_tiles, dim))
        fd[:done] = feats[:done]
        for k, v in {"slide_id": "old", "encoder": "test", "n_aug": n_aug, "n_tiles": n_tiles,
                     "fingerprint": fingerprint, "item_shape": [n_tiles, dim]}.items():  # fmt: skip
            fd.attrs[k] = v
        cd = f.create_dataset("coords", data=coords)
        for k, v in SPEC.to_attrs().items():
            cd.attrs[k] = v


def test_banks_in_the_old_layout_read_and_resume(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    coords = np.rint(rng.integers(0, 8, size=(N_AUG, N_TILES, 2)) * SPEC.level0_stride).astype(np.int64)
    feats = rng.normal(size=(N_AUG, N_TILES, DIM)).astype(np.float32)
    final = tmp_path / "h5_files" / "old.h5"
    final.parent.mkdir()
    # a finished old file reads as before
    write_old_layout_bank(final, feats, coords, "fp", N_AUG)
    bank = GigaSSLBank(tmp_path)
    assert (bank.slides[0].n_aug, bank.slides[0].n_tiles, bank.dim, bank.slides[0].slide_id) == (
        N_AUG, N_TILES, DIM, "old"
    )  # fmt: skip
    assert bank.slides[0].spec == SPEC
    got, got_coords = bank.view(0, 2, np.array([0, 5]))
    np.testing.assert_array_equal(got, feats[2, [0, 5]])
    np.testing.assert_array_equal(got_coords, coords[2, [0, 5]])
    bank.close()
    # an old partial file (2 augmentations done) resumes at augmentation 2 with the new writer
    final.unlink()
    write_old_layout_bank(partial_path_for(final), feats, coords, "fp", 2)
    with BankWriter(final, coords, DIM, "fp", features_attrs={"slide_id": "old"}) as w:
        assert w.open() == 2 and w.augs_done == 2
        w.write(feats[2:])  # a (B, n_tiles, D) run of augmentations is accepted too
        w.finalize()
    with h5py.File(final) as f:
        np.testing.assert_array_equal(f["features"][:], feats)
        assert f.attrs[AUGS_DONE_ATTR] == N_AUG
    # the writer is the N-D feature writer: same datasets and attributes as ChunkedFeatureWriter's
    with ChunkedFeatureWriter(tmp_path / "nd.h5", coords, (N_TILES, DIM), "fp", chunk_size=1) as w:
        w.open()
        w.write(feats)
        w.finalize()
    with BankWriter(tmp_path / "bank.h5", coords, DIM, "fp") as w:
        w.open()
        for a in range(N_AUG):
            w.write(feats[a])
        w.finalize()
    with h5py.File(tmp_path / "nd.h5") as f, h5py.File(tmp_path / "bank.h5") as g:
        assert dict(f.attrs) == dict(g.attrs)
        for name in ("features", "coords"):
            np.testing.assert_array_equal(f[name][:], g[name][:])
            assert {k: str(v) for k, v in f[name].attrs.items()} == {
                k: str(v) for k, v in g[name].attrs.items()
            }
    with pytest.raises(ValueError, match="must be \\(n_aug, n_tiles, 2\\)"):
        BankWriter(tmp_path / "c.h5", coords[0], DIM, "fp")


def test_bank_errors_name_the_problem(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="gigaslide gigassl bank"):
        GigaSSLBank(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished bank file"):
        GigaSSLBank(tmp_path / "empty")
    flat = tmp_path / "flat.h5"
    with h5py.File(flat, "w") as f:
        f["features"] = np.zeros((3, 4))
        f["coords"] = np.zeros((3, 2))
    with pytest.raises(ValueError, match="not a Giga-SSL bank"):
        read_bank_slide(flat)


# -- views ----------------------------------------------------------------------------------
def test_views_shapes_content_and_determinism(tmp_path: Path) -> None:
    bank = GigaSSLBank(write_bank(tmp_path, 7))
    views = GigaSSLViews(bank, batch_size=3, n_tiles=5, seed=1)
    assert len(views) == 2  # 7 slides // 3, last incomplete minibatch dropped
    b = views.batch(0, 1)
    assert b.features.shape == (2, 3, 5, DIM) and b.cells.shape == (2, 3, 5, 2)
    for v in range(2):
        for j, s in enumerate(b.slide_index.tolist()):
            f = b.features[v, j].numpy()
            assert (f[:, 0] == s).all() and (f[:, 1] == b.aug_index[v, j].item()).all()  # one augmentation
            assert len(set(f[:, 2].tolist())) == 5  # 5 distinct tiles of it
            cells = b.cells[v, j].numpy()
            assert len(np.unique(cells, axis=0)) == 5 and (cells.min(0) == 0).all()
    assert b.slide_ids == [f"s{s}" for s in b.slide_index.tolist()]
    # a pure function of (seed, epoch, index): same from a fresh object, from batches(start=1)
    again = next(GigaSSLViews(GigaSSLBank(tmp_path), batch_size=3, n_tiles=5, seed=1).batches(0, start=1))
    for name in ("features", "cells", "aug_index", "slide_index"):
        assert (getattr(b, name) == getattr(again, name)).all()
    other = views.batch(1, 1)
    assert not (other.features == b.features).all() or not (other.cells == b.cells).all()
    # the epoch's minibatches cover distinct slides
    seen = [s for batch in views.batches(0) for s in batch.slide_index.tolist()]
    assert len(seen) == len(set(seen)) == 6


def test_views_without_slide_augment_keep_the_grid_and_shard_ranks(tmp_path: Path) -> None:
    bank = GigaSSLBank(write_bank(tmp_path, 8))
    plain = GigaSSLViews(bank, batch_size=2, n_tiles=4, slide_augment=None, seed=2)
    b = plain.batch(0, 0)
    slide, aug = b.slide_index[0].item(), b.aug_index[0, 0].item()
    full_feats, coords = bank.view(slide, aug)
    tiles = b.features[0, 0, :, 2].long().numpy()
    np.testing.assert_array_equal(b.cells[0, 0].numpy(), tile_cells(coords[tiles], SPEC))
    some_feats, some_coords = bank.view(slide, aug, np.array([1, 4, 7]))
    np.testing.assert_array_equal(some_feats, full_feats[[1, 4, 7]])
    np.testing.assert_array_equal(some_coords, coords[[1, 4, 7]])
    with pytest.raises(ValueError, match="strictly increasing"):
        bank.view(slide, aug, np.array([4, 1]))
    ranks = [GigaSSLViews(bank, batch_size=2, n_tiles=4, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == 2
    got = [r.batch(0, 1).slide_index.tolist() for r in ranks]
    assert got[0] + got[1] == plain.epoch_order(0)[4:8].tolist()
    assert (ranks[0].batch(0, 0).features == plain.batch(0, 0).features).all()  # rank 0 = first B of global


def test_views_validate_settings(tmp_path: Path) -> None:
    bank = GigaSSLBank(write_bank(tmp_path, 3))
    with pytest.raises(ValueError, match="fewer tiles per augmentation"):
        GigaSSLViews(bank, batch_size=2, n_tiles=N_TILES + 1)
    with pytest.raises(ValueError, match="fewer than one minibatch"):
        GigaSSLViews(bank, batch_size=4)
    with pytest.raises(IndexError, match="out of range"):
        GigaSSLViews(bank, batch_size=2).batch(0, 1)
