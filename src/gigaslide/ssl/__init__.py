"""gigaslide.ssl: self-supervised pretraining (DINO, SimCLR's NT-Xent), one concept per file.

``dino_head`` (DINOHead), ``dino_loss`` (DINOLoss), ``ema`` (teacher EMA and DINO's gradient
hooks), ``multicrop`` (DINO's multi-crop views, MultiCropWrapper), ``crop_data`` (multi-crop
batches over tiles read from slides), ``ntxent`` (NTXentLoss) and ``dino`` (the DINO recipe on
``gigaslide.train.engine``, :func:`pretrain_dino`). Names are exported lazily.
"""

from __future__ import annotations

from gigaslide._lazy import lazy_getattr

_LAZY: dict[str, str] = {
    "DINOHead": "gigaslide.ssl.dino_head",
    "DINOLoss": "gigaslide.ssl.dino_loss",
    "ema_update": "gigaslide.ssl.ema",
    "momentum_schedule": "gigaslide.ssl.ema",
    "cancel_last_layer_grads": "gigaslide.ssl.ema",
    "MultiCrop": "gigaslide.ssl.multicrop",
    "MultiCropConfig": "gigaslide.ssl.multicrop",
    "MultiCropWrapper": "gigaslide.ssl.multicrop",
    "MultiCropData": "gigaslide.ssl.crop_data",
    "tiles_from_tiling": "gigaslide.ssl.crop_data",
    "NTXentLoss": "gigaslide.ssl.ntxent",
    "DINOConfig": "gigaslide.ssl.dino",
    "DINOObjective": "gigaslide.ssl.dino",
    "pretrain_dino": "gigaslide.ssl.dino",
}

__all__ = list(_LAZY)

__getattr__ = lazy_getattr(__name__, _LAZY)
