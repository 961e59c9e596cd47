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

    def __len__(self) -> int:
        return math.ceil((len(self.dataset) - self.start) / self.batch_size)

    def batch_bounds(self) -> list[tuple[int, int]]:
        """``[(lo, hi), ...]`` dataset rows of each batch, in order."""
        n = len(self.dataset)
        return [(lo, min(lo + self.batch_size, n)) for lo in range(self.start, n, self.batch_size)]

    def _read_batch(self, lo: int, hi: int, stop: threading.Event) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows ``lo:hi`` -> (images (B, 3, S, S) uint8, coords (B, 2) int64)."""
        size = self.dataset.spec.tile_size
        images = torch.empty((hi - lo, 3, size, size), dtype=torch.uint8, pin_memory=self.pin_memory)
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

    def _iter_inline(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        never = threading.Event()
        for lo, hi in bounds:
            yield self._read_batch(lo, hi, never)

    def _iter_threads(self, bounds: list[tuple[int, int]]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not bounds:
            return
        if isinstance(self.dataset, TileDataset):
            _ = self.dataset.slide  # open the handle once here, not racing in every thread
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=self.num_threads, thread_name_prefix="gigaslide-tiles")
        pending: deque[Future[tuple[torch.Tensor, torch.Tensor]]] = deque()
        todo = iter(bounds)
        try:
            for lo, hi in todo:
                pending.append(pool.submit(self._read_batch, lo, hi, stop))
                if len(pending) >= self.prefetch:
                    break
            while pending:
                batch = pending.popleft().result()  # re-raises a worker's exception here
                for lo, hi in todo:  # refill before handing the batch over, so reading overlaps use
                    pending.append(pool.submit(self._read_batch, lo, hi, stop))
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
            f"prefetch={self.prefetch}, start={self.start}, pin_memory={self.pin_memory})"
        )
