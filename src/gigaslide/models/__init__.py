"""gigaslide.models: tile encoders (``models.encoders``), ViT layers (``models.layers``), weight loading
(``models.weights``) and slide-level models (``models.slide``).

Submodules are imported on first use so ``import gigaslide.models`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "create_encoder": "gigaslide.models.encoders",
    "list_encoders": "gigaslide.models.encoders",
    "get_encoder_meta": "gigaslide.models.encoders",
    "EncoderMeta": "gigaslide.models.encoders",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gigaslide.models' has no attribute {name!r}")
