"""torch.distributed helpers that degrade to a single process.

``torchrun`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` (and ``MASTER_ADDR``/``MASTER_PORT``);
:func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on CPU).
Without them every helper behaves as rank 0 of a world of one, so the same code runs under
``python -m gigaslide`` and ``torchrun -m gigaslide``.
"""

from __future__ import annotations

import datetime
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_ENV_VARS = ("RANK", "WORLD_SIZE")


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a (possibly one-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    is_distributed: bool = False

    @property
    def is_main(self) -> bool:
        """True on global rank 0 (the process that merges manifests, prints summaries)."""
        return self.rank == 0


def dist_env() -> DistInfo:
    """Read the torchrun environment without touching any process group."""
    if not all(v in os.environ for v in _ENV_VARS):
        return DistInfo()
    try:
        rank = int(os.environ["RANK"])
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as e:
        raise ValueError(f"malformed torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {e}") from e
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"invalid torchrun environment: RANK={rank} WORLD_SIZE={world}")
    return DistInfo(rank=rank, world_size=world, local_rank=local, is_distributed=world > 1)


def init_distributed(backend: str | None = None, timeout_s: float = 12 * 3600.0) -> DistInfo:
    """Join the torchrun process group when launched by torchrun; otherwise return a one-process info.

    Args:
        backend: ``"nccl"`` or ``"gloo"``; default NCCL when CUDA is available, gloo otherwise.
        timeout_s: collective timeout. Ranks finish their slide shards at different times and wait
            at the final barrier, so it is long by default.
    """
    info = dist_env()
    if not info.is_distributed:
        return info
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return info
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(info.local_rank)
    dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    log.debug("joined process group: rank %d/%d (%s)", info.rank, info.world_size, backend)
    return info


def _group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    """Wait for every rank; a no-op in a single process."""
    if not _group_active():
        return
    import torch
    import torch.distributed as dist

    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined. Safe to call twice."""
    if _group_active():
        import torch.distributed as dist

        dist.destroy_process_group()


def mean_over_ranks(values: dict[str, float], device: Any = "cpu") -> dict[str, float]:
    """Each value averaged over the ranks (every rank must pass the same keys); unchanged in one process.

    ``device``: where the values travel (the rank's CUDA device under NCCL; gloo reduces on the CPU).
    """
    if not _group_active() or not values:
        return values
    import torch
    import torch.distributed as dist

    world = dist.get_world_size()
    if world == 1:
        return values
    keys = sorted(values)
    dev = torch.device(device) if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=dev)
    dist.all_reduce(t)
    mean = {k: v / world for k, v in zip(keys, t.tolist())}
    return {k: mean[k] for k in values}  # the caller's key order (log columns)


def from_main(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` computed on rank 0 only; every rank gets its result (or raises its error).

    For work that must happen once per job and whose outcome every rank needs identical (rendering a
    cache, listing what could be read). In one process it is a plain call. The result must pickle.
    """
    if not _group_active():
        return fn(*args, **kwargs)
    import torch.distributed as dist

    box: list[Any] = [None]
    if dist.get_rank() == 0:
        try:
            box = [(True, fn(*args, **kwargs))]
        except Exception as e:  # handed to every rank, so that no rank waits for a result that never comes
            box = [(False, e)]
    dist.broadcast_object_list(box, src=0)
    ok, value = box[0]
    if not ok:
        raise value
    return value


def quiet_other_ranks(info: DistInfo, level: int = logging.ERROR) -> None:
    """Show only records of ``level`` and above from gigaslide's loggers on ranks other than 0.

    For jobs whose ranks do the same work on the same inputs (DINO pretraining): rank 0 reports for
    the job, so every warning and notice is printed once instead of once per process.
    """
    if not info.is_main:
        logging.getLogger("gigaslide").setLevel(level)


def shard(items: Sequence[T], rank: int, world_size: int, weights: Sequence[float] | None = None) -> list[T]:
    """The items of ``rank`` out of ``world_size``; every item goes to exactly one rank.

    Every rank must pass the same ``items`` in the same order (e.g. sorted slide ids).
    Without ``weights`` the split is round-robin (``items[rank::world_size]``). With weights
    (e.g. tile counts) it is greedy balancing: items in decreasing weight (ties by position)
    each go to the currently lightest rank (ties to the lowest rank). The returned items keep
    their original order.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid rank {rank} for world size {world_size}")
    if weights is None:
        return list(items[rank::world_size])
    if len(weights) != len(items):
        raise ValueError(f"{len(weights)} weights for {len(items)} items")
    order = sorted(range(len(items)), key=lambda i: (-float(weights[i]), i))
    loads = [0.0] * world_size
    owner = [0] * len(items)
    for i in order:
        r = min(range(world_size), key=lambda k: (loads[k], k))
        owner[i] = r
        loads[r] += float(weights[i])
    return [item for item, r in zip(items, owner) if r == rank]
