"""``timm:<architecture>`` encoders: any timm model as a tile encoder, weights from local files only.

Pathology foundation models such as UNI, Virchow or Prov-GigaPath are timm ViTs distributed as
Hugging-Face-hub-style folders: ``config.json`` (``architecture``, ``model_args``,
``pretrained_cfg`` with ``mean``/``std``/``input_size``) next to ``model.safetensors`` or
``pytorch_model.bin``. Pointing ``weights`` at such a folder builds the model with its
``model_args`` and takes the normalisation from its ``pretrained_cfg``. ``pretrained=True`` is
never used: nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigaslide.data.transforms import IMAGENET_MEAN, IMAGENET_STD
from gigaslide.models.encoders.meta import TIMM_PREFIX, EncoderMeta

logger = logging.getLogger(__name__)

#: tile resolution assumed for timm encoders (20x): the convention of the pathology foundation models
DEFAULT_TIMM_MPP = 0.5


def _check_arch(arch: str) -> None:
    import timm

    if not arch:
        raise ValueError(
            "empty timm architecture: use 'timm:<architecture>', e.g. timm:vit_large_patch16_224"
        )
    if not timm.is_model(arch):
        close = timm.list_models(f"*{arch.split('.')[0][:12]}*")[:8]
        hint = f"; similar names: {', '.join(close)}" if close else ""
        raise ValueError(f"timm has no architecture {arch!r}{hint}")


def read_timm_config(folder: str | Path) -> dict[str, Any]:
    """Parse a timm/HF-hub ``config.json``: ``{"architecture", "model_args", "pretrained_cfg"}``."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read timm config {path}: {e}") from e
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise ValueError(f"timm config {path} has no 'architecture' field; is this a timm model folder?")
    if "pretrained_cfg" in cfg:
        pretrained_cfg = dict(cfg["pretrained_cfg"] or {})
    else:  # legacy single-dict layout: the pretrained config is the top level itself
        pretrained_cfg = {k: v for k, v in cfg.items() if k not in ("architecture", "model_args")}
    model_args = dict(cfg.get("model_args") or {})
    if "global_pool" in cfg:
        model_args.setdefault("global_pool", cfg["global_pool"])
    return {
        "architecture": str(cfg["architecture"]),
        "model_args": model_args,
        "pretrained_cfg": pretrained_cfg,
    }


def _side(input_size: Any) -> int:
    size = tuple(input_size) if isinstance(input_size, list | tuple) else (input_size,)
    return int(size[-1])


def _meta_from_model(
    arch: str, model: nn.Module, cfg: dict[str, Any] | None, img_size: Any = None
) -> EncoderMeta:
    pcfg: dict[str, Any] = dict(getattr(model, "pretrained_cfg", {}) or {})
    if cfg is not None:
        pcfg.update({k: v for k, v in cfg["pretrained_cfg"].items() if v is not None})
    mean = tuple(float(v) for v in pcfg.get("mean", IMAGENET_MEAN))
    std = tuple(float(v) for v in pcfg.get("std", IMAGENET_STD))
    side = _side(img_size) if img_size is not None else _side(pcfg.get("input_size", (3, 224, 224)))
    source = f" (config from {cfg['source']})" if cfg and "source" in cfg else ""
    return EncoderMeta(
        name=f"{TIMM_PREFIX}{arch}",
        embed_dim=int(model.num_features),
        input_size=side,
        mean=mean,  # type: ignore[arg-type]
        std=std,  # type: ignore[arg-type]
        mpp=DEFAULT_TIMM_MPP,
        paper=str(pcfg.get("paper_ids") or pcfg.get("origin_url") or "timm"),
        description=f"timm {arch}, pooled features (num_classes=0){source}; "
        f"mpp {DEFAULT_TIMM_MPP} assumed (20x), set the tiling resolution to the model's",
    )


def timm_meta(arch: str) -> EncoderMeta:
    """Metadata of ``timm:<arch>`` from timm's defaults (model built on the meta device, no memory)."""
    import timm

    _check_arch(arch)
    try:
        with torch.device("meta"):
            model = timm.create_model(arch, pretrained=False, num_classes=0)
    except Exception:  # some constructors compute values eagerly; build it for real
        model = timm.create_model(arch, pretrained=False, num_classes=0)
    return _meta_from_model(arch, model, None)


def build_timm_encoder(
    arch: str, weights_path: Path | None = None, **kw: Any
) -> tuple[nn.Module, EncoderMeta]:
    """Create ``timm.create_model(arch, pretrained=False, num_classes=0, **model_args, **kw)``.

    When ``weights_path`` is a folder with ``config.json``, its ``architecture`` must match ``arch``
    (tags after a dot are ignored) and its ``model_args`` are used (``kw`` wins on conflicts).
    The classifier named by the model's ``pretrained_cfg`` is declared droppable, so checkpoints
    that still carry it load strictly.
    """
    import timm

    cfg: dict[str, Any] | None = None
    if weights_path is not None and weights_path.is_dir() and (weights_path / "config.json").is_file():
        cfg = read_timm_config(weights_path)
        cfg["source"] = str(weights_path / "config.json")
        if arch and cfg["architecture"].split(".")[0] != arch.split(".")[0]:
            raise ValueError(
                f"encoder timm:{arch} does not match {cfg['source']}, which is for "
                f"architecture {cfg['architecture']!r}; use timm:{cfg['architecture']}"
            )
    _check_arch(arch)
    args: dict[str, Any] = dict(cfg["model_args"]) if cfg else {}
    args.update(kw)
    args["num_classes"] = 0
    args.pop("pretrained", None)
    model = timm.create_model(arch, pretrained=False, **args)
    if getattr(model, "global_pool", None) == "":
        raise ValueError(
            f"timm:{arch} is configured with global_pool='' and would return token maps, not (B, D) "
            "embeddings; pass global_pool='token' (CLS) or global_pool='avg'"
        )
    classifier = (getattr(model, "pretrained_cfg", {}) or {}).get("classifier")
    classifiers = classifier if isinstance(classifier, list | tuple) else [classifier] if classifier else []
    model.checkpoint_drop_prefixes = tuple(f"{c}." for c in classifiers)
    img_size = args.get("img_size")
    return model, _meta_from_model(arch, model, cfg, img_size=img_size)
