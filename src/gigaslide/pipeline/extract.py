"""Tile feature extraction: run a tile encoder over the tiles of one slide.

Two ways to feed the encoder (``loader=``):

- ``"threads"`` (default): a :class:`~gigaslide.data.tile_loader.TileLoader` reads uint8 tiles
  with a thread pool in this process (the readers release the GIL); each batch is copied to the
  device as uint8 and converted, resized and normalised there
  (:class:`~gigaslide.data.transforms.BatchNormalizer`);
- ``"processes"``: a torch DataLoader whose worker processes read, decode and normalise tiles
  (:class:`TileDataset` with a :class:`~gigaslide.data.transforms.TileTransform`).

Both give the same features to float rounding. The main process runs the encoder under
``torch.inference_mode()``, with autocast for fp16/bf16 and channels-last memory for conv
nets. :func:`iter_features` yields one batch at a time so callers can stream rows to disk
(see :mod:`gigaslide.pipeline.embed_job`); :func:`extract_features` collects them in memory.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.tile_loader import TileLoader
from gigaslide.data.transforms import BatchNormalizer, TileTransform
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.device import resolve_device

if TYPE_CHECKING:
    from gigaslide.io.base import Slide

logger = logging.getLogger(__name__)

RANDOM_INIT = "RANDOM-INIT"  # `weights` attribute of features made with random weights
PRECISIONS: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LOADERS = ("threads", "processes")
Batches = Iterable[tuple[torch.Tensor, torch.Tensor]]  # (images (B, 3, H, W), coords (B, 2))


def check_precision(precision: str) -> torch.dtype:
    """Map ``fp32|fp16|bf16`` to a torch dtype, with a clear error otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
    return PRECISIONS[precision]


def warn_half_precision_on_cpu(device: torch.device, precision: str) -> bool:
    """Log a warning when fp16/bf16 is asked for on a CPU; returns whether it warned.

    CPU autocast to half precision is usually slower than fp32 (few CPUs have fast fp16/bf16
    matrix units) and loses accuracy, so it is rarely what a user wants.
    """
    if device.type != "cpu" or check_precision(precision) == torch.float32:
        return False
    logger.warning(
        "--precision %s on a CPU device: half precision on CPU is usually much slower than fp32 and "
        "less accurate; use --precision fp32 on CPU (fp16/bf16 pay off on a GPU, --device cuda)",
        precision,
    )
    return True


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast to fp16/bf16 (weights stay fp32); a null context for fp32."""
    dtype = check_precision(precision)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def is_conv_net(model: nn.Module) -> bool:
    """True when the model has convolutions other than a ViT-style patch embedding (kernel == stride)."""
    return any(isinstance(m, nn.Conv2d) and tuple(m.kernel_size) != tuple(m.stride) for m in model.modules())


def prepare_encoder(encoder: nn.Module, device: torch.device) -> bool:
    """Move to ``device`` in eval mode; channels-last for conv nets. Returns whether channels-last is used."""
    encoder.eval().to(device)
    channels_last = is_conv_net(encoder)
    if channels_last:
        encoder.to(memory_format=torch.channels_last)
    return channels_last


def encode_batch(
    encoder: nn.Module,
    images: torch.Tensor,
    device: torch.device,
    precision: str,
    channels_last: bool,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """(B, 3, H, W) images -> (B, D) (or (B, ...) for encoders with N-D outputs) float32 features on the CPU.

    ``images`` are normalised floats, or uint8 tiles when ``preprocess`` (e.g. a
    :class:`BatchNormalizer`) turns them into the encoder input on ``device``.
    """
    x = images.to(device, non_blocking=True)
    if preprocess is not None:
        x = preprocess(x)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode(), autocast_context(device, precision):
        out = encoder(x)
    if not isinstance(out, torch.Tensor) or out.ndim < 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"the encoder returned {shape} for {x.shape[0]} tiles; a tile encoder must return a (B, D) or "
            "(B, ...) tensor with one row per tile"
        )
    return out.float().cpu()


def make_loader(dataset: Dataset, batch_size: int, num_workers: int, device: torch.device) -> DataLoader:
    """In-order loader; workers prefetch a few batches each, pinned memory on CUDA."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if num_workers > 0 else None,
        persistent_workers=False,
    )


def check_loader(loader: str) -> str:
    """Validate a ``loader=`` choice (``threads`` or ``processes``)."""
    if loader not in LOADERS:
        raise ValueError(f"loader must be one of {list(LOADERS)}, got {loader!r}")
    return loader


def make_batches(
    dataset: TileDataset,
    transform: Callable[[np.ndarray], torch.Tensor],
    loader: str,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    start: int = 0,
) -> tuple[Batches, Callable[[torch.Tensor], torch.Tensor] | None]:
    """The batches of ``dataset`` from row ``start`` on, and the step that turns them into encoder input.

    ``threads``: a :class:`TileLoader` with ``num_workers`` threads (uint8 batches) and a
    :class:`BatchNormalizer` equal to ``transform`` (which must be a :class:`TileTransform`).
    ``processes``: a DataLoader with ``num_workers`` processes applying ``transform`` per tile,
    and no further step. ``dataset`` must have ``transform=None``; it is rebuilt as needed.
    """
    check_loader(loader)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0, got {num_workers}")
    if loader == "threads":
        if not isinstance(transform, TileTransform):
            raise ValueError(
                f"loader='threads' normalises batches on the device and supports TileTransform only, got "
                f"{transform!r}; use loader='processes' for another per-tile transform"
            )
        tiles = TileLoader(
            dataset,
            batch_size=batch_size,
            num_threads=num_workers,
            start=start,
            pin_memory=device.type == "cuda",
            reuse_buffers=True,  # iter_features is done with a batch before asking for the next
        )
        return tiles, BatchNormalizer.from_transform(transform)
    ds = TileDataset(
        dataset.slide_path, dataset.coords, dataset.spec, transform=transform, mpp=dataset.mpp,
        backend=dataset.backend,
    )  # fmt: skip
    subset: Dataset = Subset(ds, range(start, len(ds))) if start else ds
    return make_loader(subset, batch_size, num_workers, device), None


def iter_features(
    encoder: nn.Module,
    loader: Batches,
    device: torch.device,
    precision: str = "fp32",
    channels_last: bool | None = None,
    preprocess: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(features (B, D) or (B, ...) float32, coords (B, 2) int64)`` batch by batch, in loader order.

    ``loader`` yields ``(images, coords)``; ``preprocess`` runs on each image batch once it is on
    ``device`` (see :func:`make_batches`).
    """
    check_precision(precision)
    if channels_last is None:
        channels_last = prepare_encoder(encoder, device)
    for images, coords in loader:
        feats = encode_batch(encoder, images, device, precision, channels_last, preprocess)
        yield feats.numpy(), np.asarray(coords, dtype=np.int64).reshape(-1, 2)


def weights_identity(encoder: nn.Module) -> tuple[str, str, bool]:
    """(weights path or ``RANDOM-INIT``, sha256, random_init) of an encoder.

    For random initialisation the sha256 is that of the state dict, so two random-init runs
    with different seeds never share a fingerprint.
    """
    info = dict(getattr(encoder, "weights_info", {}) or {})
    if info.get("random_init"):
        digest = hashlib.sha256()
        for name, t in sorted(encoder.state_dict().items()):
            digest.update(name.encode())
            digest.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return RANDOM_INIT, digest.hexdigest(), True
    path = str(info.get("path") or info.get("source") or "")
    sha = str(info.get("sha256") or "")
    if not path and not sha:
        raise ValueError(
            "the encoder has no `weights_info` (path/sha256 or random_init); build it with "
            "gigaslide.models.encoders.create_encoder"
        )
    return path, sha, False


def default_transform(encoder: nn.Module) -> TileTransform:
    """The normalisation/resize transform described by ``encoder.meta``."""
    meta = getattr(encoder, "meta", None)
    if meta is None:
        raise ValueError(
            "the encoder has no `.meta` (input_size, mean, std); build it with "
            "gigaslide.models.encoders.create_encoder or pass transform= explicitly"
        )
    return TileTransform.from_meta(meta)


def extract_features(
    slide: str | os.PathLike[str] | Slide,
    coords: np.ndarray,
    spec: TileSpec,
    encoder: nn.Module,
    batch_size: int = 64,
    num_workers: int = 0,
    device: str | torch.device = "cpu",
    precision: str = "fp32",
    transform: Callable[[np.ndarray], torch.Tensor] | None = None,
    loader: str = "threads",
) -> np.ndarray:
    """Features of the tiles at ``coords`` of ``slide``.

    Args:
        slide: a slide path or an open :class:`~gigaslide.io.base.Slide` (its path, mpp
            override and backend are reused by each worker).
        coords: (N, 2) level-0 top-left corners.
        spec: the tile geometry the coordinates were made with.
        encoder: a tile encoder, (B, 3, H, W) -> (B, D) or (B, ...).
        batch_size: tiles per encoder call.
        num_workers: reader threads (``loader="threads"``) or DataLoader worker processes
            (``loader="processes"``); 0 reads in the calling thread.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"auto"``.
        precision: ``fp32``, ``fp16`` or ``bf16`` (autocast).
        transform: tile transform; default from ``encoder.meta``. With ``loader="threads"`` it
            must be a :class:`TileTransform` (applied batch-wise on the device).
        loader: ``threads`` (default) or ``processes`` (see the module docstring).

    Returns:
        (N, D) (or (N, ...) for N-D encoder outputs) float32 features in the order of ``coords``.
    """
    dev = resolve_device(device)
    check_loader(loader)
    warn_half_precision_on_cpu(dev, precision)
    tf = transform if transform is not None else default_transform(encoder)
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)  # (N, 2)
    if isinstance(slide, (str, os.PathLike)):
        dataset = TileDataset(slide, coords, spec)
    else:
        from gigaslide.io import list_backends

        backend = getattr(slide, "backend", None)
        dataset = TileDataset(
            slide.path,
            coords,
            spec,
            mpp=slide.mpp,
            backend=backend if backend in list_backends() else None,
        )
    channels_last = prepare_encoder(encoder, dev)
    batches, preprocess = make_batches(dataset, tf, loader, batch_size, num_workers, dev)
    out: list[np.ndarray] = []
    n = 0
    for feats, got in iter_features(encoder, batches, dev, precision, channels_last, preprocess):
        if not np.array_equal(got, coords[n : n + len(got)]):
            raise RuntimeError(f"tiles arrived out of order at row {n}; the loader must not shuffle")
        out.append(feats)
        n += len(feats)
    if not out:
        meta = getattr(encoder, "meta", None)
        item = tuple(getattr(meta, "item_shape", None) or (int(getattr(meta, "embed_dim", 0)),))
        return np.zeros((0, *item), dtype=np.float32)
    return np.concatenate(out, axis=0)
