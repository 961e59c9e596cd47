"""Tile-encoder registry: names -> factories + metadata, and :func:`create_encoder`.

Every encoder takes a normalised float batch (B, 3, H, W) and returns embeddings (B, D) (or
(B, ...) when its ``meta.output_shape`` says so). The module
returned by :func:`create_encoder` carries ``.meta`` (:class:`EncoderMeta`) and ``.weights_info``
(``{"path", "file", "sha256", ...}`` or ``{"random_init": True}``) so callers can record both in
their output files. Names of the form ``timm:<architecture>`` build any timm model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from gigaslide.models.encoders.meta import TIMM_PREFIX, EncoderMeta
from gigaslide.models.encoders.timm_entry import build_timm_encoder, timm_meta
from gigaslide.models.weights import load_weights
from gigaslide.models.weights_registry import lookup_weights, registry_path

logger = logging.getLogger(__name__)

#: ``weights=`` values with a special meaning
WEIGHTS_FROM_REGISTRY = "registry"
WEIGHTS_RANDOM = "random"

WeightsArg = str | os.PathLike[str] | None


EncoderFactory = Callable[..., nn.Module]


@dataclass(frozen=True)
class _Entry:
    meta: EncoderMeta
    factory: EncoderFactory


_REGISTRY: dict[str, _Entry] = {}


def register_encoder(meta: EncoderMeta) -> Callable[[EncoderFactory], EncoderFactory]:
    """Decorator registering ``factory(**kw) -> nn.Module`` under ``meta.name``."""
    if meta.name.startswith(TIMM_PREFIX) or not meta.name:
        raise ValueError(f"invalid encoder name {meta.name!r} (empty, or uses the reserved 'timm:' prefix)")

    def deco(factory: EncoderFactory) -> EncoderFactory:
        if meta.name in _REGISTRY:
            raise ValueError(f"encoder {meta.name!r} is already registered")
        _REGISTRY[meta.name] = _Entry(meta=meta, factory=factory)
        return factory

    return deco


def list_encoders() -> list[str]:
    """Registered encoder names (sorted). Any ``timm:<architecture>`` name is accepted as well."""
    return sorted(_REGISTRY)


def _unknown(name: str) -> ValueError:
    return ValueError(
        f"unknown encoder {name!r}; available: {', '.join(list_encoders())}, "
        "or 'timm:<architecture>' for any timm model (e.g. timm:vit_large_patch16_224)"
    )


def get_encoder_meta(name: str) -> EncoderMeta:
    """Metadata of an encoder without loading weights (timm models are built on the meta device)."""
    if name.startswith(TIMM_PREFIX):
        return timm_meta(name[len(TIMM_PREFIX) :])
    if name not in _REGISTRY:
        raise _unknown(name)
    return _REGISTRY[name].meta


def resolve_weights(name: str, weights: WeightsArg) -> Path | None:
    """Turn the ``weights`` argument into a local path, or ``None`` for random initialisation.

    ``None``: the registry entry if there is one, else random. ``"registry"``: the registry entry,
    which must exist. ``"random"``: random, the registry is not consulted. Anything else is a path.
    """
    if weights is None:
        path = lookup_weights(name, required=False)
        if path is not None:
            logger.info("encoder %s: using weights %s from the registry %s", name, path, registry_path())
        return path
    if isinstance(weights, str) and weights == WEIGHTS_FROM_REGISTRY:
        path = lookup_weights(name, required=True)
        logger.info("encoder %s: using weights %s from the registry %s", name, path, registry_path())
        return path
    if isinstance(weights, str) and weights == WEIGHTS_RANDOM:
        return None
    return Path(weights).expanduser()


def create_encoder(
    name: str,
    weights: WeightsArg = None,
    strict: bool = True,
    *,
    checkpoint_key: str | None = None,
    trust_pickle: bool = False,
    warn_random: bool = True,
    **kw: Any,
) -> nn.Module:
    """Build encoder ``name``, load its weights, return it in eval mode with ``.meta``/``.weights_info``.

    ``weights``: a local file or folder, ``"registry"``, ``"random"``, or ``None`` (registry entry
    if present, otherwise random). Random weights are never silent: a WARNING is logged and
    ``weights_info == {"random_init": True}`` (``warn_random=False``: the caller prints its own
    warning, e.g. `gigaslide embed`'s banner; logged at INFO here). ``strict`` loading raises on
    any key mismatch.
    ``**kw`` go to the factory (for ``timm:`` names, to ``timm.create_model``).
    """
    if not name.startswith(TIMM_PREFIX) and name not in _REGISTRY:
        raise _unknown(name)
    path = resolve_weights(name, weights)
    if name.startswith(TIMM_PREFIX):
        model, meta = build_timm_encoder(name[len(TIMM_PREFIX) :], weights_path=path, **kw)
    else:
        entry = _REGISTRY[name]
        model, meta = entry.factory(**kw), entry.meta
    if path is not None:
        info: dict[str, Any] = load_weights(
            model, path, strict=strict, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle
        )
        info["random_init"] = False
        logger.info("encoder %s: loaded weights %s (sha256 %s)", name, info["file"], info["sha256"])
    else:
        why = (
            "weights='random' requested"
            if weights is not None
            else f"no weights given and no entry in {registry_path()}"
        )
        logger.log(
            logging.WARNING if warn_random else logging.INFO,
            "encoder %s uses RANDOM weights (%s): features are meaningless except for tests; "
            "pass weights=<file> or add '%s: <file>' to the weights registry",
            name,
            why,
            name,
        )
        info = {"random_init": True}
    model.meta = meta
    model.weights_info = info
    return model.eval()
