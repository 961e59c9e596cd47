"""`TileDataset`: tiles of one slide read lazily from level-0 coordinates.

Each tile is ``slide.read_region(coord, spec.read_level, (read_size, read_size))`` resized to
``spec.tile_size`` (cv2 INTER_AREA when shrinking). The slide handle is opened on first
use in each process, so the dataset is safe with DataLoader worker processes: a handle
inherited through ``fork`` (different pid) or a pickled dataset reopens its own.

Batched reads: a DataLoader with automatic batching calls :meth:`TileDataset.__getitems__`,
which decodes a whole batch straight into one (B, 3, S, S) uint8 tensor (allocated in shared
memory inside worker processes, so handing it to the main process copies nothing). Pass
``collate_fn=collate_tiles`` to receive that tensor as is; the default collate still works and
gives the same values (at the cost of one more copy).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from gigaslide.preprocess.coords_io import read_coords
from gigaslide.preprocess.tiling_spec import TileSpec

if TYPE_CHECKING:
    from gigaslide.io.base import Slide


def resize_tile(tile: np.ndarray, size: int) -> np.ndarray:
    """Resize an (H, W, 3) uint8 tile to (size, size, 3): area averaging down, bicubic up."""
    h, w = tile.shape[:2]
    if (h, w) == (size, size):
        return tile
    interp = cv2.INTER_AREA if size < max(h, w) else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(tile, (size, size), interpolation=interp))


def tile_to_chw(tile: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
    """(S, S, 3) uint8 HWC -> (3, S, S) uint8 CHW tensor, written into ``out`` when given.

    ``cv2.split`` into the channel planes is ~8x faster than a strided transpose copy.
    """
    if out is None:
        out = torch.empty((3, tile.shape[0], tile.shape[1]), dtype=torch.uint8)
    planes = out.numpy()
    cv2.split(np.ascontiguousarray(tile), [planes[0], planes[1], planes[2]])
    return out


def _batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 tensor, in shared memory when built inside a DataLoader worker (zero-copy hand-over)."""
    if get_worker_info() is None:
        return torch.empty(shape, dtype=torch.uint8)
    storage = torch.UntypedStorage._new_shared(int(np.prod(shape)))
    return torch.empty(0, dtype=torch.uint8).set_(storage).view(shape)


class TileBatch(list):
    """A batch from :meth:`TileDataset.__getitems__`: a list of ``(image, coord)`` samples (views)
    that also holds the stacked ``images`` (B, 3, S, S) uint8 and ``coords`` (B, 2) int64 tensors."""

    def __init__(self, images: torch.Tensor, coords: torch.Tensor) -> None:
        super().__init__(zip(images, coords))
        self.images = images
        self.coords = coords


def collate_tiles(batch: list[Any]) -> Any:
    """DataLoader ``collate_fn``: a :class:`TileBatch` passes through as ``(images, coords)`` without
    copying; anything else goes to torch's default collate."""
    if isinstance(batch, TileBatch):
        return batch.images, batch.coords
    return default_collate(batch)


class TileDataset(Dataset):
    """The tiles of one slide at the resolution of ``spec``.

    Args:
        slide_path: the slide file.
        coords: (N, 2) level-0 (x, y) top-left corners.
        spec: the tile geometry (read level, read size, output size).
        transform: applied to the (tile_size, tile_size, 3) uint8 RGB array; when None the
            image is returned as a torch.uint8 (3, tile_size, tile_size) tensor.
        mpp: level-0 mpp given to :func:`gigaslide.io.open_slide` (slides lacking metadata).
        backend: reader backend name for :func:`gigaslide.io.open_slide` (None = automatic).

    ``dataset[i]`` is ``(image, coord)`` with ``coord`` a torch.int64 (2,) tensor.
    """

    def __init__(
        self,
        slide_path: str | os.PathLike[str],
        coords: np.ndarray,
        spec: TileSpec,
        transform: Callable[[np.ndarray], Any] | None = None,
        mpp: float | None = None,
        backend: str | None = None,
    ) -> None:
        self.slide_path = Path(slide_path)
        self.coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
        self.spec = spec
        self.transform = transform
        self.mpp = mpp
        self.backend = backend
        self._slide: Slide | None = None
        self._pid: int | None = None

    @classmethod
    def from_coords_file(
        cls,
        slide_path: str | os.PathLike[str],
        coords_path: str | os.PathLike[str],
        transform: Callable[[np.ndarray], Any] | None = None,
        mpp: float | None = None,
        backend: str | None = None,
    ) -> TileDataset:
        """Tiles listed in a coordinate file (gigaslide, CLAM or TRIDENT ``.h5``)."""
        cf = read_coords(coords_path, slide_mpp=mpp)
        return cls(slide_path, cf.coords, cf.spec, transform=transform, mpp=mpp, backend=backend)

    # -- slide handle ---------------------------------------------------------------------
    @property
    def slide(self) -> Slide:
        """This process's slide handle, opened on first use."""
        pid = os.getpid()
        if self._slide is None or self._pid != pid:
            from gigaslide.io import open_slide

            # a handle inherited from the parent through fork is never used nor closed here
            slide = open_slide(self.slide_path, mpp=self.mpp, backend=self.backend)
            self._check_geometry(slide)
            self._slide, self._pid = slide, pid
        return self._slide

    def _check_geometry(self, slide: Slide) -> None:
        spec = self.spec
        if spec.read_level >= slide.level_count:
            raise ValueError(
                f"{self.slide_path}: the coordinates read level {spec.read_level} but the slide has "
                f"{slide.level_count} level(s); were they computed on another slide?"
            )
        w, h = spec.level0_dims
        tol = max(2.0, spec.read_downsample)
        if w > 0 and h > 0 and (abs(w - slide.dimensions[0]) > tol or abs(h - slide.dimensions[1]) > tol):
            raise ValueError(
                f"{self.slide_path}: the coordinates were computed on a {w}x{h} slide but this slide is "
                f"{slide.dimensions[0]}x{slide.dimensions[1]}; pass the matching slide/coordinate file"
            )

    def close(self) -> None:
        """Close this process's slide handle (it reopens on the next read)."""
        if self._slide is not None and self._pid == os.getpid():
            self._slide.close()
        self._slide, self._pid = None, None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_slide"], state["_pid"] = None, None  # handles never travel between processes
        return state

    # -- reading --------------------------------------------------------------------------
    def read_tile(self, index: int) -> np.ndarray:
        """Tile ``index`` as a (tile_size, tile_size, 3) uint8 RGB array."""
        x, y = (int(v) for v in self.coords[index])
        size = self.spec.read_size
        tile = self.slide.read_region((x, y), self.spec.read_level, (size, size))  # (read, read, 3)
        return resize_tile(tile, self.spec.tile_size)

    def __len__(self) -> int:
        return int(self.coords.shape[0])

    def __getitem__(self, index: int) -> tuple[Any, torch.Tensor]:
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"tile index {index} out of range for {len(self)} tiles")
        tile = self.read_tile(index)  # (S, S, 3) uint8
        coord = torch.from_numpy(self.coords[index].copy())  # (2,) int64
        if self.transform is not None:
            return self.transform(tile), coord
        return tile_to_chw(tile), coord  # (3, S, S)

    def __getitems__(self, indices: list[int]) -> list[Any]:
        """A whole batch (DataLoader automatic batching): decoded straight into one tensor.

        With a ``transform`` the samples are built one by one, as ``dataset[i]`` would.
        """
        if self.transform is not None:
            return [self[i] for i in indices]
        n = len(self)
        idx = [int(i) + n if int(i) < 0 else int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < n]
        if bad:
            raise IndexError(f"tile indices {bad[:5]} out of range for {n} tiles")
        size = self.spec.tile_size
        images = _batch_tensor((len(idx), 3, size, size))  # (B, 3, S, S)
        for j, i in enumerate(idx):
            tile_to_chw(self.read_tile(i), images[j])
        return TileBatch(images, torch.from_numpy(self.coords[idx].copy()))  # coords (B, 2)

    def __repr__(self) -> str:
        s = self.spec
        return (
            f"TileDataset({str(self.slide_path)!r}, n={len(self)}, tile_size={s.tile_size}, "
            f"target_mpp={s.target_mpp:g}, read_level={s.read_level}, read_size={s.read_size})"
        )
