"""TileLoader: thread-pool batches equal to a DataLoader's, in order, resumable, bounded, clean shutdown."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.tile_loader import TileLoader
from gigaslide.data.transforms import TileTransform
from gigaslide.io import open_slide
from gigaslide.preprocess.tiling import grid_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.synth import write_synthetic_slide


@pytest.fixture(scope="module")
def tiles(tmp_path_factory) -> tuple[Path, np.ndarray, TileSpec]:
    path = write_synthetic_slide(tmp_path_factory.mktemp("tl") / "s.tiff", width=1024, height=768, mpp=0.5)
    with open_slide(path) as s:
        spec = TileSpec.create(
            tile_size=48,
            target_mpp=1.0,
            slide_mpp=s.require_mpp(),
            level_downsamples=s.level_downsamples,
            level0_dims=s.dimensions,
        )
    coords = grid_coords(spec)[:80]  # (80, 2); partial tiles at the right edge are padded white
    return path, coords, spec


def _pool_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("gigaslide-tiles")]


def _collect(batches) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    images, coords, sizes = [], [], []
    for im, c in batches:
        images.append(im)
        coords.append(c)
        sizes.append(int(im.shape[0]))
    return torch.cat(images), torch.cat(coords), sizes


@pytest.mark.parametrize(("threads", "batch"), [(2, 7), (3, 13), (0, 16), (3, 1000)])
def test_same_batches_as_dataloader(tiles, threads: int, batch: int) -> None:
    path, coords, spec = tiles
    ds = TileDataset(path, coords, spec)
    want_im, want_c, want_sizes = _collect(DataLoader(ds, batch_size=batch, num_workers=0))
    loader = TileLoader(ds, batch_size=batch, num_threads=threads)
    got = list(loader)
    assert len(loader) == len(got) == len(want_sizes)
    for im, c in got:
        assert im.dtype == torch.uint8 and im.shape[1:] == (3, 48, 48)
        assert c.dtype == torch.int64 and c.shape == (im.shape[0], 2)
    got_im, got_c, got_sizes = _collect(got)
    assert got_sizes == want_sizes  # same batch boundaries, last one short
    assert torch.equal(got_c, want_c) and torch.equal(got_im, want_im)  # same tiles, same order
    assert not _pool_threads()


@pytest.mark.parametrize("threads", [0, 2])
def test_reused_buffers_hold_each_batch_until_the_one_after_next(tiles, threads: int) -> None:
    path, coords, spec = tiles
    ds = TileDataset(path, coords, spec)
    want = list(DataLoader(ds, batch_size=6, num_workers=0))
    loader = TileLoader(ds, batch_size=6, num_threads=threads, prefetch=2, reuse_buffers=True)
    prev = None
    storages = set()
    for k, (im, c) in enumerate(loader):
        assert torch.equal(im, want[k][0]) and torch.equal(c, want[k][1])
        if prev is not None:  # the previous batch is still intact while this one is handled
            assert torch.equal(prev, want[k - 1][0])
        prev = im
        storages.add(im.untyped_storage().data_ptr())
    assert len(storages) == (2 if threads == 0 else 2 + 2)  # a ring: no new memory per batch
    kept = [im for im, _ in loader]  # keeping every batch is not supported: early ones are overwritten
    assert not torch.equal(kept[0], want[0][0])


def test_start_skips_rows_and_loader_is_reiterable(tiles) -> None:
    path, coords, spec = tiles
    ds = TileDataset(path, coords, spec)
    full_im, full_c, _ = _collect(TileLoader(ds, batch_size=9, num_threads=2))
    loader = TileLoader(ds, batch_size=9, num_threads=2, start=50)
    assert len(loader) == 4  # 30 rows left: 9 + 9 + 9 + 3
    for _ in range(2):  # each iteration starts afresh
        im, c, sizes = _collect(loader)
        assert sizes == [9, 9, 9, 3]
        assert torch.equal(c, full_c[50:]) and torch.equal(im, full_im[50:])
    end = TileLoader(ds, batch_size=9, num_threads=2, start=len(ds))
    assert len(end) == 0 and list(end) == []


def test_bad_arguments(tiles) -> None:
    path, coords, spec = tiles
    ds = TileDataset(path, coords, spec)
    with pytest.raises(ValueError, match="transform=None"):
        TileLoader(TileDataset(path, coords, spec, transform=TileTransform(48)))
    with pytest.raises(ValueError, match="start must be in"):
        TileLoader(ds, start=len(ds) + 1)
    with pytest.raises(ValueError, match="batch_size"):
        TileLoader(ds, batch_size=0)
    with pytest.raises(ValueError, match="prefetch"):
        TileLoader(ds, prefetch=0)
    default = TileLoader(ds)
    assert default.num_threads >= 1 and default.prefetch == 2 * default.num_threads
    if not torch.cuda.is_available():
        assert not TileLoader(ds, pin_memory=True).pin_memory  # pinning needs CUDA


class FailingDataset(TileDataset):
    """Raises for one tile index."""

    bad = 37

    def read_tile(self, index: int) -> np.ndarray:
        if index == self.bad:
            raise OSError(f"corrupt tile {index}")
        return super().read_tile(index)


@pytest.mark.parametrize("threads", [0, 2])
def test_worker_error_reaches_consumer(tiles, threads: int) -> None:
    path, coords, spec = tiles
    loader = TileLoader(FailingDataset(path, coords, spec), batch_size=8, num_threads=threads, prefetch=3)
    seen = []
    with pytest.raises(OSError, match="corrupt tile 37"):
        for _, c in loader:
            seen.append(len(c))
    assert seen == [8, 8, 8, 8]  # the batches before the failing one (rows 32-39) arrive intact
    assert not _pool_threads()


class SlowDataset(TileDataset):
    """Sleeps in every read and records the highest row whose read has started."""

    def __init__(self, *args, delay: float = 0.002, **kw) -> None:
        super().__init__(*args, **kw)
        self.delay = delay
        self.max_started = -1
        self.n_reads = 0
        self._lock = threading.Lock()

    def read_tile(self, index: int) -> np.ndarray:
        with self._lock:
            self.max_started = max(self.max_started, index)
            self.n_reads += 1
        time.sleep(self.delay)
        size = self.spec.tile_size
        return np.full((size, size, 3), index % 256, dtype=np.uint8)


def test_prefetch_is_bounded(tiles) -> None:
    path, coords, spec = tiles
    ds = SlowDataset(path, coords, spec, delay=0.001)
    batch, prefetch = 4, 3
    loader = TileLoader(ds, batch_size=batch, num_threads=2, prefetch=prefetch)
    last = len(loader) - 1
    for k, (im, _) in enumerate(loader):
        assert int(im[0, 0, 0, 0]) == (k * batch) % 256  # in order
        # a slow consumer: the readers run ahead as far as they are allowed ...
        target = min(k + prefetch, last)
        deadline = time.monotonic() + 5.0
        while ds.max_started // batch < target and time.monotonic() < deadline:
            time.sleep(0.002)
        assert ds.max_started // batch >= target, f"batch {k}: no read-ahead up to batch {target}"
        time.sleep(0.01)  # ... and no further
        assert ds.max_started // batch <= k + prefetch, (k, ds.max_started)
    assert ds.n_reads == len(ds)


def test_early_break_stops_reading_and_joins_threads(tiles) -> None:
    path, coords, spec = tiles
    ds = SlowDataset(path, coords, spec, delay=0.02)
    loader = TileLoader(ds, batch_size=4, num_threads=2, prefetch=2)
    t0 = time.perf_counter()
    for _ in loader:
        break
    elapsed = time.perf_counter() - t0
    assert not _pool_threads()  # the generator's cleanup joined the pool
    assert ds.n_reads < 4 * 4  # at most the batches in flight, each stopped at its next tile
    assert elapsed < 0.02 * 4 * 3  # never waits for the rest of the slide (80 tiles = 1.6 s of reads)
