"""One function that turns a batch into the forward arguments of any slide model, by its input kind.

Every harness (training, prediction, cross-validation, heatmaps) calls a slide model as
``model(**slide_inputs(model, batch, labels))``; what the model takes is registry metadata
(:attr:`SlideModelInfo.input_kind`), so a new kind of model plugs in without touching the harness:

=================== ============================ ======================================== ==========================
input kind          ``x``                        ``mask``                                 ``coords``
=================== ============================ ======================================== ==========================
``features``        (B, N, D) tile features      (B, N)                                   (B, N, 2) if accepted
``features_coords`` (B, N, D) tile features      (B, N)                                   (B, N, 2), required
``region_grids``    (B, M, T, D) token grids     (B, M, T): region mask AND per-item mask (B, M, 2) if accepted
``image``           (B, 3, H, W) pixels          the batch's ``item_mask`` (B, h, w) or None  never
=================== ============================ ======================================== ==========================

A batch is anything with ``x``, ``mask`` and ``coords`` attributes (optionally ``item_mask``), such
as :class:`gigaslide.data.bags.BagBatch`.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import Tensor, nn

from gigaslide.models.slide.registry import SlideModelInfo, slide_model_info

_TAKES = {
    "features": "tile features (B, N, D)",
    "features_coords": "tile features (B, N, D) with coordinates (B, N, 2)",
    "region_grids": "region token grids (B, M, T, D)",
    "image": "images (B, 3, H, W)",
}


class SlideBatch(Protocol):
    """What :func:`slide_inputs` reads from a batch."""

    x: Tensor
    mask: Tensor | None
    coords: Tensor | None


def _refuse(info: SlideModelInfo, x: Tensor, hint: str) -> ValueError:
    return ValueError(
        f"slide model {info.name!r} takes {_TAKES[info.input_kind]} (input_kind={info.input_kind!r}), but the "
        f"batch holds x of shape {tuple(x.shape)}; {hint}"
    )


def slide_inputs(model: nn.Module, batch: SlideBatch, labels: Tensor | None = None) -> dict[str, Any]:
    """Keyword arguments ``x, coords, mask, labels`` for ``model`` from ``batch`` (see the module table).

    Raises:
        ValueError: the batch does not hold what the model's input kind needs (the message says what).
    """
    info = slide_model_info(model)
    kind, x = info.input_kind, batch.x
    coords = batch.coords if info.accepts_coords else None
    item_mask: Tensor | None = getattr(batch, "item_mask", None)
    if kind in ("features", "features_coords"):
        if x.dim() != 3:
            raise _refuse(info, x, "train it on (N, D) tile-feature files")
        if info.needs_coords and batch.coords is None:
            raise ValueError(
                f"slide model {info.name!r} needs tile coordinates (B, N, 2), but this batch has none: its "
                "feature files store no `coords` dataset (embed from a tiling output, which records them)"
            )
        return {"x": x, "coords": coords, "mask": batch.mask, "labels": labels}
    if kind == "region_grids":
        if x.dim() != 4:
            raise _refuse(
                info, x, "embed regions with an encoder whose output is a token grid (meta.output_shape)"
            )
        mask = batch.mask
        if mask is not None:
            mask = mask.unsqueeze(-1).expand(x.shape[:3])  # (B, M, T)
            if item_mask is not None:
                mask = mask & item_mask.to(mask.device, dtype=mask.dtype)
        return {"x": x, "coords": coords, "mask": mask, "labels": labels}
    if x.dim() != 4 or x.shape[1] != 3:
        raise _refuse(info, x, "feed it image batches, not feature bags")
    return {"x": x, "coords": None, "mask": item_mask, "labels": labels}
