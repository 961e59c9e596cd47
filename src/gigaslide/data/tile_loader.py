"""`TileLoader`: batches of uint8 tiles read by a thread pool inside the calling process.

A torch ``DataLoader`` with worker *processes* hands every batch over through shared memory,
which costs page faults and inter-process traffic on top of the decoding. When the slide reader
releases the GIL while it works (``tiff-direct``: ``os.pread`` + imagecodecs/libjpeg-turbo;
OpenSlide through ctypes; tiffslide through tifffile/imagecodecs; cv2's resize does too), plain
threads decode in parallel and write each tile straight into the batch tensor, with no
hand-over at all.

The loader yields ``(images (B, 3, S, S) uint8, coords (B, 2) int64)`` in dataset order. It
needs a :class:`~gigaslide.data.tile_dataset.TileDataset` built with ``transform=None``: the
tiles stay uint8 (4x less memory and host-to-device traffic than float32) and conversion,
resizing and normalisation run on the device, batch-wise
(:class:`gigaslide.data.transforms.BatchNormalizer`).

At most ``prefetch`` batches are being read or waiting to be consumed at any time, so memory
stays bounded on slides of 100,000+ tiles. A failing read re-raises its original exception in
the consumer; the pool is shut down (pending batches cancelled, running ones stopped at their
next tile) when iteration ends, fails, or the consumer leaves the loop early.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch

from gigaslide.data.tile_dataset import TileDataset, tile_to_chw


class _Stopped(Exception):
    """Raised inside a batch task when the loader is shutting down."""


class TileLoader:
    """Iterate over a :class:`TileDataset` in batches, reading tiles with a pool of threads.

    Args:
        dataset: the tiles; must have ``transform=None`` (uint8 output). Its slide reader must be
            thread-safe and should release the GIL while decoding (tiff-direct, openslide,
            tiffslide), otherwise the threads run one at a time.
        batch_size: tiles per batch; the last batch may be smaller.
        num_threads: reader threads (default ``os.cpu_count()``); 0 reads in the calling thread.
        prefetch: most batches being read or waiting to be consumed (default ``2 * num_threads``).
        start: skip the first ``start`` tiles (resume an interrupted slide).
        pin_memory: allocate batches in page-locked memory when CUDA is available, so that
            ``images.to("cuda", non_blocking=True)`` is asynchronous.
        reuse_buffers: write batches into a ring of ``prefetch + 2`` preallocated tensors instead
            of a fresh tensor each (no page faults on new memory: ~15% faster on CPU). Then the
            ``images`` of a batch are overwritten once the batch after the next one is requested:
            use or copy them before that (a loop that handles one batch at a time is safe; keeping
            every batch, e.g. ``list(loader)``, is not).

    ``len(loader)`` is the number of batches. Each iteration starts its own pool.
    """

    def __init__(
        self,
        dataset: TileDataset,
        batch_size: int = 64,
        num_threads: int | None = None,
        prefetch: int | None = None,
        start: int = 0,
        pin_memory: bool = False,
        reuse_buffers: bool = False,
    ) -> None:
        if getattr(dataset, "transform", None) is not None:
            raise ValueError(
                f"TileLoader needs a TileDataset with transform=None (uint8 tiles), got transform="
                f"{dataset.transform!r}; normalise the batches on the device with "
                "gigaslide.data.transforms.BatchNormalizer, or use a torch DataLoader for a per-tile transform"
            )
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        threads = (os.cpu_count() or 1) if num_threads is None else int(num_threads)
        if threads < 0:
            raise ValueError(f"num_threads must be >= 0 (0 = read in the calling thread), got {num_threads}")
        depth = 2 * max(threads, 1) if prefetch is None else int(prefetch)
        if depth < 1:
            raise ValueError(f"prefetch must be >= 1, got {prefetch}")
        n = len(dataset)
        if not 0 <= start <= n:
            raise ValueError(f"start must be in [0, {n}] for a dataset of {n} tiles, got {start}")
        self.dataset = dataset
        self.batch_size = int(batch_size)
        self.num_threads = threads
        self.prefetch = depth
        self.start = int(start)
        self.pin_memory = bool(pin_memory) and torch.cuda.is_available()
        self.reuse_buffers = bool(reuse_buffers)

    def __len__(self) -> int:
        return math.ceil((len(self.dataset) - self.start) / self.batch_size)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """``[(lo, hi), ...]`` dataset rows of each batch, in order."""
        n = len(self.dataset)
        return [(lo, min(lo + self.batch_size, n)) for lo in range(self.start, n, self.batch_size)]

    def _new_images(self, n: int) -> torch.Tensor:
        size = self.dataset.spec.tile_size
        return torch.empty((n, 3, size, size), dtype=torch.uint8, pin_memory=self.pin_memory)

    def _read_batch(
        self, lo: int, hi: int, stop: threading.Event, out: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``lo:hi`` -> (images (B, 3, S, S) uint8, coords (B, 2) int64), into ``out[:B]`` if given."""
        images = self._new_images(hi - lo) if out is None else out[: hi - lo]
        for j, i in enumerate(range(lo, hi)):
            if stop.is_set():
                raise _Stopped
            try:
                tile_to_chw(self.dataset.read_tile(i), images[j])
            except Exception as e:
                if hasattr(e, "add_note"):  # Python >= 3.11
                    e.add_note(f"TileLoader: while reading tile {i} of {self.dataset.slide_path}")
                raise
        coords = torch.from_numpy(np.array(self.dataset.coords[lo:hi], dtype=np.int64))  # (B, 2)
        return images, coords

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        bounds = self.batch_bounds()
        if self.num_threads == 0:
            return self._iter_inline(bounds)
        return self._iter_threads(bounds)

    def _ring(self, n_batches: int, depth: int) -> list[torch.Tensor | None]:
        """Preallocated batch tensors, ``depth`` of them (none when buffers are not reused)."""
        if not self.reuse_buffers:
            return [None]
        return [self._new_images(self.batch_size) for _ in range(min(depth, n_batches))]

    def _iter_inline(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        never = threading.Event()
        ring = self._ring(len(bounds), 2)
        for k, (lo, hi) in enumerate(bounds):
            yield self._read_batch(lo, hi, never, ring[k % len(ring)])

    def _iter_threads(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not bounds:
            return
        if isinstance(self.dataset, TileDataset):
            _ = self.dataset.slide  # open the handle once here, not racing in every thread
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="gigaslide-tiles")
        pending: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque()
        # batch k goes into ring[k % R] and is submitted when the consumer asks for batch k - prefetch;
        # with R = prefetch + 2 the slot's previous batch, k - R, is then two behind the one handed over
        ring = self._ring(len(bounds), self.prefetch + 2)
        todo = enumerate(bounds)
        try:
            for k, (lo, hi) in todo:
                pending.append(pool.submit(self._read_batch, lo, hi, stop, ring[k % len(ring)]))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                batch = pending.popleft().result()  # re-raises a worker's exception here
                for k, (lo, hi) in todo:  # refill before handing the batch over, so reading overlaps use
                    pending.append(pool.submit(self._read_batch, lo, hi, stop, ring[k % len(ring)]))
                    break
                yield batch
        finally:
            stop.set()
            for fut in pending:
                fut.cancel()
            pool.shutdown(wait=True, cancel_futures=True)

    def __repr__(self) -> str:
        return (
            f"TileLoader({self.dataset!r}, batch_size={self.batch_size}, num_threads={self.num_threads}, "
            f"prefetch={self.prefetch}, start={self.start}, pin_memory={self.pin_memory}, "
            f"reuse_buffers={self.reuse_buffers})"
        )
