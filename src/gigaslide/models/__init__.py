"""gigaslide.models: tile encoders (``models.encoders``), ViT layers (``models.layers``), weight loading
(``models.weights``) and slide-level models (``models.slide``).

Submodules are imported on first use so ``import gigaslide.models`` stays cheap.
"""

from __future__ import annotations

from gigaslide._lazy import lazy_getattr

_LAZY = {
    "create_encoder": "gigaslide.models.encoders",
    "list_encoders": "gigaslide.models.encoders",
    "get_encoder_meta": "gigaslide.models.encoders",
    "EncoderMeta": "gigaslide.models.encoders",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
