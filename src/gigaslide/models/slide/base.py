"""Common contract of every slide-level model: inputs, :class:`SlideOutput` and masked reductions.

Every slide model maps a padded batch of tile-feature bags to slide-level predictions::

    out = model(x, coords=None, mask=None, labels=None)
    x       (B, N, D) float  tile features, bags padded to a common length N
    coords  (B, N, 2)        level-0 tile coordinates (only used by models that accept them)
    mask    (B, N) bool      True = real tile, False = padding (None = every tile is real)
    labels  (B,) long        slide labels; only CLAM-like models use them, only pass them in training

Padded positions never influence the outputs: the base class zeroes them before the model sees
them, and every model reduces with the masked helpers below (or processes each bag's valid tiles).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from gigaslide.models.slide.registry import slide_model_info


@dataclass
class SlideOutput:
    """What every slide model returns.

    Attributes:
        logits: (B, C) class logits. For discrete-time survival C is the number of time bins and the
            logits are per-bin hazard logits (``sigmoid`` gives hazards; see ``gigaslide.train.losses``).
            An empty (B, 0) tensor for embedding-only models (``n_classes=0``).
        embedding: (B, E) slide embedding taken just before the final classifier; ``E == model.embed_dim``.
        attention: (B, N) attention over tiles, or None for models without a single attention map.
            Normalised over the valid tiles of each bag: sums to 1 over ``mask`` and is exactly 0 on padding.
        aux_loss: scalar auxiliary loss to add to the bag loss (``loss = bag_loss + aux_loss``), or None.
        extras: model-specific tensors (e.g. DS-MIL's per-head logits, CLAM's raw instance loss).
    """

    logits: Tensor
    embedding: Tensor
    attention: Tensor | None = None
    aux_loss: Tensor | None = None
    extras: dict[str, Tensor] = field(default_factory=dict)


def masked_softmax(scores: Tensor, mask: Tensor, dim: int = -1) -> Tensor:
    """Softmax of ``scores`` over ``dim`` restricted to ``mask`` (True = valid).

    Masked entries get exactly 0; each slice with at least one valid entry sums to 1.
    """
    filled = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(filled, dim=dim)
    # A slice with no valid entry would be all-NaN; callers validate that every bag has a tile,
    # the final masked_fill keeps the contract "exactly 0 on padding" regardless.
    return weights.masked_fill(~mask, 0.0)


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean over the tile axis of x (B, N, D) using only valid tiles (mask (B, N)) -> (B, D)."""
    weights = mask.to(x.dtype).unsqueeze(-1)  # (B, N, 1)
    count = weights.sum(dim=1).clamp_min(1.0)  # (B, 1)
    return (x * weights).sum(dim=1) / count


def masked_max(x: Tensor, mask: Tensor) -> Tensor:
    """Element-wise max over the tile axis of x (B, N, D) using only valid tiles -> (B, D)."""
    filled = x.masked_fill(~mask.unsqueeze(-1), float("-inf"))
    return filled.max(dim=1).values


def check_inputs(
    x: Tensor, coords: Tensor | None, mask: Tensor | None, in_dim: int, model_name: str
) -> Tensor:
    """Validate the forward inputs and return a boolean mask (B, N) (all True when ``mask`` is None)."""
    if x.dim() != 3:
        raise ValueError(
            f"{model_name}: expected tile features of shape (B, N, D), got {tuple(x.shape)}; "
            "add a batch axis with x.unsqueeze(0) for a single bag"
        )
    b, n, d = x.shape
    if d != in_dim:
        raise ValueError(
            f"{model_name}: features have dimension {d} but the model was built with in_dim={in_dim}; "
            "create the model with the encoder's embedding size"
        )
    if n == 0:
        raise ValueError(f"{model_name}: empty bag (N=0); a slide needs at least one tile")
    if coords is not None and (coords.dim() != 3 or tuple(coords.shape) != (b, n, 2)):
        raise ValueError(
            f"{model_name}: coords must have shape (B, N, 2)={(b, n, 2)}, got {tuple(coords.shape)}"
        )
    if mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=x.device)
    if tuple(mask.shape) != (b, n):
        raise ValueError(f"{model_name}: mask must have shape (B, N)={(b, n)}, got {tuple(mask.shape)}")
    mask = mask.to(device=x.device, dtype=torch.bool)
    empty = (~mask.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"{model_name}: bag(s) {empty} have no valid tile in mask; drop empty slides first")
    return mask


class SlideModel(nn.Module, abc.ABC):
    """Base class of slide-level aggregators over tile features (input kinds ``features``/``features_coords``).

    Subclasses set ``in_dim``, ``n_classes`` and ``embed_dim`` and implement :meth:`_forward`, which
    receives a validated boolean mask and features whose padded rows are already zeroed. They build
    their classifier with :func:`classifier_head`, so that ``n_classes=0`` gives an embedding-only
    model. Whether coordinates are required is registry metadata (``input_kind``), read through
    :func:`~gigaslide.models.slide.registry.slide_model_info`.
    """

    #: classification loss of the model's official recipe: "cross_entropy" (softmax over classes) or
    #: "bce" (one sigmoid per class against one-hot targets, e.g. DS-MIL)
    classification_loss: str = "cross_entropy"

    def __init__(self, in_dim: int, n_classes: int) -> None:
        super().__init__()
        if in_dim < 1 or n_classes < 0:
            raise ValueError(
                f"in_dim must be >= 1 and n_classes >= 0 (0 = embedding only), got in_dim={in_dim}, "
                f"n_classes={n_classes}"
            )
        self.in_dim = int(in_dim)
        self.n_classes = int(n_classes)
        self.embed_dim = int(in_dim)

    def forward(
        self,
        x: Tensor,
        coords: Tensor | None = None,
        mask: Tensor | None = None,
        labels: Tensor | None = None,
    ) -> SlideOutput:
        """Aggregate a padded batch of bags; see the module docstring for shapes."""
        name = type(self).__name__
        mask = check_inputs(x, coords, mask, self.in_dim, name)
        if slide_model_info(self).needs_coords and coords is None:
            raise ValueError(f"{name} needs tile coordinates: pass coords (B, N, 2)")
        if labels is not None:
            labels = labels.to(device=x.device, dtype=torch.long).reshape(-1)
            if labels.numel() != x.shape[0]:
                raise ValueError(f"{name}: labels must have shape (B,)=({x.shape[0]},), got {labels.numel()}")
        # zero padded rows so that garbage (even NaN) there cannot leak through 0-weighted sums
        x = x.masked_fill(~mask.unsqueeze(-1), 0.0)
        return self._forward(x, coords, mask, labels)

    @abc.abstractmethod
    def _forward(self, x: Tensor, coords: Tensor | None, mask: Tensor, labels: Tensor | None) -> SlideOutput:
        """Model-specific aggregation of validated inputs."""

    def loss_streams(self, out: SlideOutput) -> list[tuple[float, Tensor]]:
        """``(weight, logits (B, C))`` pairs the task loss is applied to and summed over.

        Default ``[(1.0, out.logits)]``; a model trained on several predictions overrides it
        (DS-MIL: ``0.5`` each on the bag stream and on the max-instance stream).
        """
        return [(1.0, out.logits)]

    def output_layers(self) -> list[nn.Module]:
        """The layer(s) whose outputs are ``logits`` (default: ``self.classifier``).

        A trainer sets their bias to a prior (e.g. the cohort's baseline hazard per survival bin)
        through :meth:`init_output_bias`. Models whose logits come from other layers override this.
        """
        head = getattr(self, "classifier", None)
        if head is None:
            raise NotImplementedError(f"{type(self).__name__} has no `classifier`; override output_layers()")
        return [head]

    @torch.no_grad()
    def init_output_bias(self, bias: Tensor) -> None:
        """Set the bias (C,) of every output layer, so that the untrained model predicts ``bias``."""
        bias = torch.as_tensor(bias, dtype=torch.float32).reshape(-1)
        if bias.numel() != self.n_classes:
            raise ValueError(f"output bias needs {self.n_classes} values, got {bias.numel()}")
        for layer in self.output_layers():
            if getattr(layer, "bias", None) is None or layer.bias.numel() != self.n_classes:
                raise ValueError(
                    f"{type(self).__name__}: output layer {layer} has no ({self.n_classes},) bias"
                )
            layer.bias.copy_(bias.to(layer.bias))


class NoHead(nn.Module):
    """The classifier of an embedding-only model (``n_classes=0``): (B, E) -> empty logits (B, 0)."""

    def forward(self, x: Tensor) -> Tensor:
        return x[..., :0]


def classifier_head(in_dim: int, n_classes: int) -> nn.Module:
    """``nn.Linear(in_dim, n_classes)``, or :class:`NoHead` (no parameters) for ``n_classes == 0``."""
    return nn.Linear(in_dim, n_classes) if n_classes > 0 else NoHead()


def mlp_block(in_dim: int, out_dim: int, dropout: float) -> nn.Sequential:
    """Linear -> ReLU -> Dropout, the tile-feature projection shared by the attention MIL models."""
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.ReLU(), nn.Dropout(dropout))
