"""End-to-end full-slide training (Campanella et al. 2024): tile encoder and slide aggregator trained jointly.

One optimisation step is one slide: its ``K`` tiles are encoded with gradients on, the aggregator
turns the (K, D) features into a slide prediction, and the slide loss backpropagates through both.
:class:`E2EObjective` runs on the training engine in three modes that give the same gradients:

``naive``
    encoder forward on all K tiles at once; activation memory grows with K.
``cached`` (beyond the paper: any K on one device)
    pass 1 encodes the K tiles in chunks without keeping activations; the aggregator runs forward
    and backward on the full feature matrix, giving the feature gradients ``g``; pass 2 re-encodes
    each chunk with gradients and backpropagates ``g`` of that chunk. Peak memory depends on the
    chunk size, not on K. The recomputation is exact: each chunk's dropout masks are replayed from
    the RNG state saved in pass 1, and batch-norm running statistics are restored after pass 1 so
    they are updated once (by pass 2). Batch statistics are per chunk, as the tiles are encoded per
    chunk; freeze batch norm (``freeze_bn``) for the exact equivalence with ``naive``.
``distributed`` (the paper's method, N + 1 processes under torchrun)
    rank 0 holds the aggregator, ranks 1..N the encoder in a DDP subgroup. The K tiles are split
    over the encoder ranks (uneven splits allowed); their features are gathered on rank 0, which runs
    the aggregator forward and backward and scatters the feature gradients back; each encoder rank
    backpropagates the pseudo-loss ``N * sum(f * g)`` (DDP averages over the N ranks), so the encoder
    gradient equals that of one process. Encoder ranks may cache (``chunk_size``) their share.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from gigaslide.data.slide_tiles import SlideBatch
from gigaslide.train.engine import NO_DDP, Objective, StepContext, StepOutput
from gigaslide.utils.collectives import gather_to_rank, scatter_from_rank

MODES = ("naive", "cached", "distributed")


def freeze_batchnorm(module: nn.Module) -> int:
    """Put every batch-norm layer in eval mode for good (running statistics used, never updated);
    returns how many were frozen. Survives ``module.train()``."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = _stay_eval.__get__(m)  # type: ignore[method-assign]
            n += 1
    return n


def _stay_eval(self: nn.Module, mode: bool = True) -> nn.Module:
    return nn.Module.train(self, False)


def _bn_buffers(module: nn.Module) -> list[Tensor]:
    return [
        b
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
        for b in m.buffers()
    ]


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def _chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


class E2EObjective(Objective):
    """Slide classification with a tile encoder and an aggregator trained jointly (see module docstring).

    Args:
        encoder: (B, 3, H, W) -> (B, D) tile encoder.
        aggregator: a slide model (``forward(x (1, K, D)) -> SlideOutput``).
        mode: ``"naive"``, ``"cached"`` or ``"distributed"``.
        chunk_size: tiles per encoder pass in ``cached`` mode (and on each encoder rank when given
            in ``distributed`` mode; None there = the whole share at once).
        feature_dim: D, needed by the aggregator rank in ``distributed`` mode.
        aux_weight: weight of the aggregator's auxiliary loss (CLAM), if it returns one.
    """

    def __init__(
        self,
        encoder: nn.Module,
        aggregator: nn.Module,
        mode: str = "naive",
        chunk_size: int | None = None,
        feature_dim: int | None = None,
        aux_weight: float = 1.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "cached" and (chunk_size is None or chunk_size < 1):
            raise ValueError("mode 'cached' needs chunk_size >= 1 (tiles per encoder pass)")
        self.encoder, self.aggregator, self.mode = encoder, aggregator, mode
        self.chunk_size, self.aux_weight = chunk_size, float(aux_weight)
        self.feature_dim = feature_dim
        self.rank_specific = mode == "distributed"
        self._encoder_group: Any = None
        if mode == "distributed":
            if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
                raise ValueError(
                    "mode 'distributed' needs N + 1 >= 2 processes: launch with torchrun --nproc_per_node N+1"
                )
            if feature_dim is None:
                raise ValueError("mode 'distributed' needs feature_dim (the encoder's embedding size)")
            world = dist.get_world_size()
            # every rank creates the subgroup (a collective), only encoder ranks use it
            self._encoder_group = dist.new_group(list(range(1, world)))

    # -- engine contract --------------------------------------------------------------------
    def modules(self) -> dict[str, nn.Module]:
        return {"encoder": self.encoder, "aggregator": self.aggregator}

    def trainable(self) -> dict[str, nn.Module]:
        if self.mode != "distributed":
            return self.modules()
        return {"aggregator": self.aggregator} if dist.get_rank() == 0 else {"encoder": self.encoder}

    def ddp_group(self, module_name: str) -> Any:
        if self.mode != "distributed":
            return None
        return self._encoder_group if module_name == "encoder" else NO_DDP

    def before_save(self, ctx: StepContext) -> None:
        """Every rank gets the trained encoder (from rank 1) and aggregator (from rank 0) before saving."""
        if self.mode != "distributed":
            return
        with torch.no_grad():
            for src, module in ((1, self.encoder), (0, self.aggregator)):
                for t in list(module.parameters()) + list(module.buffers()):
                    dist.broadcast(t.data, src=src)

    def train_step(self, batch: SlideBatch, ctx: StepContext) -> StepOutput:
        target = batch.target.to(ctx.device)
        if self.mode == "naive":
            with ctx.autocast():
                feats = ctx.models["encoder"](batch.images.to(ctx.device))  # (K, D)
            loss = self._slide_loss(ctx.models["aggregator"], feats, target, ctx)
            return StepOutput(loss)
        if self.mode == "cached":
            return self._cached_step(batch, target, ctx)
        return self._distributed_step(batch, target, ctx)

    # -- pieces -----------------------------------------------------------------------------
    def _slide_loss(self, aggregator: nn.Module, feats: Tensor, target: Tensor, ctx: StepContext) -> Tensor:
        with ctx.autocast():
            out = aggregator(feats.unsqueeze(0), labels=target)  # (1, K, D) -> logits (1, C)
        loss = F.cross_entropy(out.logits.float(), target)
        if out.aux_loss is not None:
            loss = loss + self.aux_weight * out.aux_loss.float()
        return loss

    def encode_with_cache(
        self, encoder: nn.Module, x: Tensor, chunk: int, ctx: StepContext
    ) -> tuple[Tensor, list]:
        """Pass 1: (k, 3, H, W) -> (k, D) features without activations; returns them and per-chunk RNG
        states for the exact replay of pass 2. Batch-norm running statistics are left unchanged."""
        saved = [b.clone() for b in _bn_buffers(encoder)]
        states, feats = [], []
        with torch.no_grad():
            for sl in _chunks(x.shape[0], chunk):
                states.append(_rng_state(ctx.device))
                with ctx.autocast():
                    feats.append(encoder(x[sl].to(ctx.device)).float())
        for b, old in zip(_bn_buffers(encoder), saved):
            b.copy_(old)
        return torch.cat(feats), states

    def backprop_with_cache(
        self, encoder: nn.Module, x: Tensor, grads: Tensor, chunk: int, states: list, ctx: StepContext
    ) -> None:
        """Pass 2: re-encode each chunk with gradients (same RNG as pass 1) and backpropagate its rows of
        ``grads`` (already scaled by the engine). DDP gradient sync happens on the last chunk only."""
        end_state = _rng_state(ctx.device)
        slices = list(_chunks(x.shape[0], chunk))
        for i, (sl, state) in enumerate(zip(slices, states)):
            _set_rng_state(state, ctx.device)
            last = i == len(slices) - 1
            sync = (
                encoder.no_sync() if (not last and hasattr(encoder, "no_sync")) else contextlib.nullcontext()
            )
            with sync:
                with ctx.autocast():
                    f = encoder(x[sl].to(ctx.device)).float()
                f.backward(grads[sl])
        _set_rng_state(end_state, ctx.device)

    def _cached_step(self, batch: SlideBatch, target: Tensor, ctx: StepContext) -> StepOutput:
        encoder = ctx.models["encoder"]
        feats, states = self.encode_with_cache(encoder, batch.images, self.chunk_size, ctx)
        feats.requires_grad_(True)
        loss = self._slide_loss(ctx.models["aggregator"], feats, target, ctx)
        ctx.backward(loss)  # aggregator gradients + feats.grad (scaled like every engine backward)
        self.backprop_with_cache(encoder, batch.images, feats.grad, self.chunk_size, states, ctx)
        return StepOutput(loss.detach(), backward_done=True)

    def _distributed_step(self, batch: SlideBatch, target: Tensor, ctx: StepContext) -> StepOutput:
        sizes = [0, *batch.sizes]  # rank 0 encodes nothing
        n_enc = len(batch.sizes)
        if ctx.world_size != n_enc + 1:
            raise ValueError(
                f"{ctx.world_size} processes for {n_enc} encoder shares: the data must be split N ways"
            )
        if ctx.rank == 0:
            empty = torch.zeros(0, self.feature_dim, device=ctx.device)
            with torch.no_grad():
                feats = gather_to_rank(empty, dst=0)  # (K, D)
            feats.requires_grad_(True)
            loss = self._slide_loss(ctx.models["aggregator"], feats, target, ctx)
            ctx.backward(loss)
            with torch.no_grad():
                scatter_from_rank(feats.grad, sizes, src=0)
            return StepOutput(loss.detach(), backward_done=True)
        encoder = ctx.models["encoder"]
        x = batch.images
        if self.chunk_size is not None:
            f, states = self.encode_with_cache(encoder, x, self.chunk_size, ctx)
        else:
            with ctx.autocast():
                f = encoder(x.to(ctx.device)).float()
        with torch.no_grad():
            gather_to_rank(f.detach(), dst=0)
            g = scatter_from_rank(f.new_zeros(0, f.shape[1]), sizes, src=0)  # this rank's rows of dL/df
        if self.chunk_size is not None:
            self.backprop_with_cache(encoder, x, g * n_enc, self.chunk_size, states, ctx)
        else:
            (f * g).sum().mul(n_enc).backward()  # DDP averages over the N encoder ranks
        return StepOutput((f.detach() * g).sum(), backward_done=True)

    @torch.no_grad()
    def predict(self, batch: SlideBatch, ctx: StepContext) -> Tensor | None:
        """(1, C) slide logits in eval mode (on rank 0 in ``distributed`` mode, None on encoder ranks).

        Tiles are encoded in chunks of ``chunk_size`` (all at once without), on every mode's ranks."""
        self.encoder.eval()
        self.aggregator.eval()
        try:
            if self.mode == "distributed" and ctx.rank == 0:
                feats = gather_to_rank(torch.zeros(0, self.feature_dim, device=ctx.device), dst=0)
                with ctx.autocast():
                    return self.aggregator(feats.unsqueeze(0)).logits.float()
            x = batch.images
            step = self.chunk_size or x.shape[0]
            with ctx.autocast():
                feats = torch.cat(
                    [self.encoder(x[sl].to(ctx.device)).float() for sl in _chunks(x.shape[0], step)]
                )
            if self.mode == "distributed":
                gather_to_rank(feats, dst=0)
                return None
            with ctx.autocast():
                return self.aggregator(feats.unsqueeze(0)).logits.float()
        finally:
            self.encoder.train()
            self.aggregator.train()
