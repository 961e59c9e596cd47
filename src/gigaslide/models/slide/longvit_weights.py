"""Loading public LongViT and Prov-GigaPath slide-encoder checkpoints (local files only).

Layouts recognised by :func:`longvit_checkpoint_filter` (after the nesting key, e.g. ``teacher``,
``model`` or ``module``, has been unwrapped by :func:`gigaslide.models.weights.load_checkpoint`):

* LongViT finetuned (``LongViTForTCGAClassification``): ``model.patch_embed.proj.*``, ``model.pos_embed``,
  ``model.encoder.layers.{i}.*``, ``fc_norm.*``, ``head.*``;
* LongViT DINO pretraining (``longvit_small_patch32_1024.pth``, key ``teacher``): ``backbone.*`` (with
  ``backbone.norm.*``) and the DINO projection head ``head.mlp.*`` / ``head.last_layer.*`` (dropped).

``pos_embed`` is resized bicubically to the model's grid, as the reference finetuning does when it
loads a 1,024^2 checkpoint for a larger input (without its float16 round trip).

Prov-GigaPath's slide encoder (``slide_encoder.pth``, key ``model``) runs LongNet over tile
features, not pixels; :func:`gigapath_encoder_state` extracts its LongNet part (``encoder.layers.*``,
``encoder.layer_norm.*``) for a :class:`gigaslide.models.layers.longnet.LongNetEncoder` built with
``normalize_output=True`` and the checkpoint's width.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from gigaslide.models.layers.pos_embed import infer_square_grid
from gigaslide.models.weights import WeightsMismatchError, load_checkpoint, resolve_weights_file, sha256_file

logger = logging.getLogger(__name__)

_DINO_HEAD = ("head.mlp.", "head.last_layer.")


def _layout(sd: Mapping[str, Tensor]) -> str:
    keys = list(sd)
    if any(k.startswith(("backbone.", "module.backbone.")) for k in keys):
        return "pretraining"
    if any(k.startswith("model.encoder.layers.") for k in keys):
        return "finetuned"
    if any(k.startswith("encoder.layers.") for k in keys) and "patch_embed.proj.weight" in sd:
        return "native"
    raise WeightsMismatchError(
        "checkpoint is not a LongViT layout: expected keys under 'backbone.' (DINO pretraining), "
        f"'model.encoder.layers.' (finetuned) or 'encoder.layers.'; first keys: {keys[:5]}"
    )


def _resize_grid(pe: Tensor, grid: tuple[int, int]) -> Tensor:
    side = infer_square_grid(pe.shape[1])
    if (side, side) == grid:
        return pe
    t = pe.reshape(1, side, side, pe.shape[-1]).permute(0, 3, 1, 2).float()
    t = F.interpolate(t, size=grid, mode="bicubic", align_corners=False)
    logger.info("resized LongViT pos_embed from %dx%d to %dx%d", side, side, *grid)
    return t.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1).to(pe.dtype)


def longvit_checkpoint_filter(
    sd: Mapping[str, Tensor], model: nn.Module, init_new_head: bool = False
) -> dict[str, Tensor]:
    """Map a LongViT checkpoint's keys onto :class:`~gigaslide.models.slide.longvit.LongViT`.

    ``init_new_head``: when the checkpoint has no ``fc_norm``/``head`` (DINO pretraining), fill them from
    the model's own initialisation (``fc_norm`` = identity LayerNorm, a freshly initialised ``head``), as
    the reference finetuning does; otherwise they stay missing and a strict load names them.
    """
    layout = _layout(sd)
    out: dict[str, Tensor] = {}
    for key, value in sd.items():
        k = key.removeprefix("module.")
        if layout == "pretraining":
            if k.startswith(_DINO_HEAD):
                continue
            k = k.removeprefix("backbone.")
        elif layout == "finetuned":
            k = k.removeprefix("model.")
        out[k] = value
    own = model.state_dict()
    if "pos_embed" in out and "pos_embed" in own and out["pos_embed"].shape != own["pos_embed"].shape:
        out["pos_embed"] = _resize_grid(out["pos_embed"], tuple(model.grid))
    if getattr(model, "pooling_norm", "fc_norm") == "fc_norm" and "fc_norm.weight" not in out:
        out = {k: v for k, v in out.items() if not k.startswith("norm.")}  # pretraining's token norm
    if init_new_head:  # missing, or a classifier for another number of classes
        added = [
            k
            for k in own
            if k.startswith(("fc_norm.", "head.")) and (k not in out or out[k].shape != own[k].shape)
        ]
        for k in added:
            out[k] = own[k].clone()
        if added:
            logger.info(
                "LongViT checkpoint lacks a fitting %s: kept the model's initialisation", ", ".join(added)
            )
    return out


def load_longvit_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    init_new_head: bool = False,
    checkpoint_key: str | None = None,
) -> dict[str, Any]:
    """Load a local LongViT checkpoint into ``model``; strict by default. Returns a report with the sha256."""
    file = resolve_weights_file(path)
    sd = longvit_checkpoint_filter(load_checkpoint(file, checkpoint_key=checkpoint_key), model, init_new_head)
    own = model.state_dict()
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    mismatched = [k for k in sd if k in own and sd[k].shape != own[k].shape]
    if strict and (missing or unexpected or mismatched):
        raise WeightsMismatchError(
            f"weights {file} do not fit LongViT: missing {missing[:10]}, unexpected {unexpected[:10]}, "
            f"shape mismatches {mismatched[:10]}; for a DINO-pretrained checkpoint pass init_new_head=True "
            "to start fc_norm/head from the model's initialisation"
        )
    model.load_state_dict({k: v for k, v in sd.items() if k in own and k not in mismatched}, strict=False)
    return {"file": str(file), "sha256": sha256_file(file), "missing": missing, "unexpected": unexpected}


def gigapath_encoder_state(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The LongNet part of a Prov-GigaPath slide-encoder state dict, keyed for ``LongNetEncoder``.

    Keeps ``encoder.layers.*`` and ``encoder.layer_norm.*`` without the ``encoder.`` prefix; raises
    when there is none (not a Prov-GigaPath slide encoder).
    """
    out = {
        k.removeprefix("encoder."): v
        for k, v in sd.items()
        if k.startswith(("encoder.layers.", "encoder.layer_norm."))
    }
    if not out:
        raise WeightsMismatchError(
            f"no 'encoder.layers.*' keys: not a Prov-GigaPath slide encoder (first keys: {list(sd)[:5]})"
        )
    return out


def gigapath_encoder_config(sd: Mapping[str, Tensor]) -> dict[str, int | bool]:
    """Width, depth and FFN size of a Prov-GigaPath LongNet read from its state dict shapes."""
    enc = gigapath_encoder_state(sd)
    depth = 1 + max(int(k.split(".")[1]) for k in enc if k.startswith("layers."))
    ffn, dim = enc["layers.0.ffn.fc1.weight"].shape
    return {
        "dim": int(dim),
        "depth": depth,
        "ffn_dim": int(ffn),
        "normalize_output": "layer_norm.weight" in enc,
    }
