"""Loading pretrained weights from LOCAL files only (nothing is ever downloaded).

* :func:`load_checkpoint` reads a checkpoint into a flat ``{name: tensor}`` state dict: plain
  state dicts, nested training checkpoints (``teacher``/``student``/``state_dict``/``model``/
  ``module``), ``.safetensors`` files, ``.bin/.pth/.pt`` pickles (``torch.load(weights_only=True)``)
  and Hugging-Face-hub-style folders (``model.safetensors`` or ``pytorch_model.bin``).
* :func:`filter_state_dict` adapts checkpoint keys to a model: strips wrapper prefixes
  (``module.``, ``backbone.``, ``_orig_mod.``, ``model.``, ``encoder.``) when that makes keys
  match, drops the documented, model-declared prefixes (DINO ``head.``; ``layer4.``/``fc.`` for
  truncated ResNets; a timm classifier), drops the projection head of a DINO-layout training
  checkpoint (``backbone.*`` + ``head.*``, e.g. from ``gigaslide pretrain dino``) for any encoder,
  and resizes ``pos_embed`` to the model's grid.
* :func:`load_weights` does both, loads strictly by default and reports what happened,
  including the sha256 of the file so outputs can record exactly which weights made them.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from gigaslide.models.layers.pos_embed import infer_square_grid, resize_pos_embed

logger = logging.getLogger(__name__)

#: wrapper keys of nested checkpoints, tried in this order (DINO keeps the teacher for inference)
NESTED_KEYS: tuple[str, ...] = ("teacher", "student", "state_dict", "model", "module", "model_state_dict")
#: key prefixes added by wrappers (DDP, DINO MultiCropWrapper, torch.compile, Lightning, SSL heads)
STRIP_PREFIXES: tuple[str, ...] = ("module.", "_orig_mod.", "backbone.", "model.", "encoder.")
#: longest stack of wrapper prefixes tried (e.g. ``module._orig_mod.backbone.``)
MAX_PREFIX_STACK = 3
#: file names looked for inside a weights folder, in order
FOLDER_WEIGHT_FILES: tuple[str, ...] = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth")
_LIST_LIMIT = 20


class WeightsError(RuntimeError):
    """A weights file cannot be read or does not fit the model."""


class WeightsMismatchError(WeightsError):
    """Strict loading found missing, unexpected or wrongly shaped keys."""


def sha256_file(path: str | os.PathLike[str], chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, hashed in ``chunk_size`` chunks (constant memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(chunk_size):
            h.update(chunk)
    return h.hexdigest()


def resolve_weights_file(path: str | os.PathLike[str]) -> Path:
    """The file holding the tensors: ``path`` itself, or the weights file inside a folder."""
    p = Path(path).expanduser()
    if p.is_dir():
        for name in FOLDER_WEIGHT_FILES:
            if (p / name).is_file():
                return p / name
        raise WeightsError(
            f"weights folder {p} holds none of {', '.join(FOLDER_WEIGHT_FILES)}; "
            "point to the checkpoint file itself or add the weights file to the folder"
        )
    if not p.is_file():
        raise WeightsError(f"weights file not found: {p}; check the path (no weights are ever downloaded)")
    return p


def _safe_globals() -> list[Any]:
    """Harmless non-tensor objects found in common checkpoints that weights_only loading may accept."""
    allowed: list[Any] = [argparse.Namespace]
    try:
        import numpy as np

        allowed += [np.dtype, type(np.dtype("float32")), type(np.dtype("float64")), type(np.dtype("int64"))]
        core = getattr(np, "_core", None) or np.core
        allowed.append(core.multiarray.scalar)
    except (ImportError, AttributeError):  # pragma: no cover - numpy layout differs
        pass
    return allowed


_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8"  # pickled torch.save magic number


def _looks_like_torch_save(path: Path) -> bool:
    """True when ``path`` has the structure of a ``torch.save`` file (zip archive or legacy pickle)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
        with path.open("rb") as f:
            return f.read(len(_LEGACY_MAGIC)) == _LEGACY_MAGIC
    except (OSError, zipfile.BadZipFile):
        return False


def _load_error_reason(e: BaseException) -> str:
    """The informative part of a torch.load error, on one line."""
    text = str(e)
    marker = "WeightsUnpickler error:"
    if marker in text:  # skip torch's multi-paragraph preamble about weights_only
        text = text[text.index(marker) + len(marker) :].strip().split("\n\n")[0]
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return f"{type(e).__name__}: {line}" if line else type(e).__name__


def _not_a_checkpoint(path: Path, e: BaseException) -> WeightsError:
    try:
        size = path.stat().st_size
    except OSError:
        size = -1
    reason = "the file is empty" if size == 0 else _load_error_reason(e)
    return WeightsError(
        f"{path} is not a readable PyTorch checkpoint ({reason}). Expected a file written by "
        "torch.save (.pth/.pt/.bin) or a .safetensors file; it may be truncated or corrupt (download it "
        "again), or another format saved under a checkpoint name (e.g. an HTML page from a failed download)."
    )


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    if trust_pickle:
        logger.warning(
            "loading %s with full pickle support (trust_pickle=True): only do this for trusted files", path
        )
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e:
            raise _not_a_checkpoint(path, e) from e
    try:
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle.UnpicklingError and friends
        reason = _load_error_reason(e)
        if not _looks_like_torch_save(path) or "Unsupported global" not in reason:
            raise _not_a_checkpoint(path, e) from e
        raise WeightsError(
            f"cannot load {path} with torch.load(weights_only=True): {reason}. "
            "The file holds Python objects besides tensors. If you trust its origin, pass "
            "trust_pickle=True, or re-save just the state dict (torch.save(ckpt['model'], 'clean.pth'))."
        ) from e


def _is_tensor_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and any(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_checkpoint(
    obj: Any, checkpoint_key: str | None = None, source: str = "checkpoint"
) -> dict[str, torch.Tensor]:
    """Descend through wrapper keys (``teacher``, ``state_dict``, ...) down to the tensors.

    ``checkpoint_key`` forces one top-level key. Non-tensor entries at the final level are dropped.
    """
    if not isinstance(obj, Mapping):
        raise WeightsError(f"{source}: expected a dict of tensors, got {type(obj).__name__}")
    if checkpoint_key is not None:
        if checkpoint_key not in obj:
            raise WeightsError(
                f"{source}: checkpoint key {checkpoint_key!r} not found; top-level keys: {_preview(list(obj))}"
            )
        obj = obj[checkpoint_key]
        logger.debug("%s: using checkpoint entry %r", source, checkpoint_key)
    # state dicts are flat (values are tensors), so a Mapping under a wrapper key is always a wrapper
    while isinstance(obj, Mapping):
        nxt = next((k for k in NESTED_KEYS if isinstance(obj.get(k), Mapping)), None)
        if nxt is None:
            break
        logger.debug("%s: descending into checkpoint entry %r", source, nxt)
        obj = obj[nxt]
    if not _is_tensor_dict(obj):
        keys = list(obj) if isinstance(obj, Mapping) else []
        raise WeightsError(
            f"{source}: found no tensors and none of the wrapper keys {list(NESTED_KEYS)}; "
            f"keys: {_preview(keys)}. Pass checkpoint_key to choose the entry."
        )
    return {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_checkpoint(
    path: str | os.PathLike[str], checkpoint_key: str | None = None, trust_pickle: bool = False
) -> dict[str, torch.Tensor]:
    """Read a local checkpoint (file or HF-style folder) into a flat CPU state dict."""
    file = resolve_weights_file(path)
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(file), device="cpu")
        except Exception as e:
            raise WeightsError(f"cannot read safetensors file {file}: {e}") from e
    else:
        obj = _torch_load(file, trust_pickle)
    return unwrap_checkpoint(obj, checkpoint_key=checkpoint_key, source=str(file))


def _preview(keys: Sequence[str], limit: int = _LIST_LIMIT) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:limit])
    return f"[{shown}{', ...' if len(keys) > limit else ''}] ({len(keys)} total)"


def _n_matching(keys: Sequence[str], target: set[str]) -> int:
    return sum(k in target for k in keys)


def _strip_prefixes(sd: dict[str, torch.Tensor], model_keys: set[str]) -> dict[str, torch.Tensor]:
    """Strip the stack of wrapper prefixes that makes the most keys match the model.

    Wrappers stack (``module._orig_mod.`` from DDP around ``torch.compile``, ``module.backbone.`` from a
    DINO student, ``model.encoder.``), and stripping only the outer one matches no key yet, so every
    chain of up to :data:`MAX_PREFIX_STACK` prefixes is scored; ties go to the shorter chain.
    """
    best_sd, best = sd, _n_matching(list(sd), model_keys)
    best_chain: tuple[str, ...] = ()
    frontier: list[tuple[tuple[str, ...], dict[str, torch.Tensor]]] = [((), sd)]
    for _ in range(MAX_PREFIX_STACK):
        nxt = []
        for chain, cur in frontier:
            for prefix in STRIP_PREFIXES:
                if not any(k.startswith(prefix) for k in cur):
                    continue
                cand = {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in cur.items()}
                if len(cand) != len(cur):
                    continue  # stripping would merge two keys
                score = _n_matching(list(cand), model_keys)
                if score > best:
                    best_sd, best, best_chain = cand, score, (*chain, prefix)
                nxt.append(((*chain, prefix), cand))
        frontier = nxt
    if best_chain:
        logger.debug("stripped checkpoint key prefixes %r (%d keys now match the model)", best_chain, best)
    return best_sd


def describe_dropped(dropped: Sequence[str]) -> str:
    """``'layer4.* (60 keys), fc.* (2 keys)'``: the dropped keys grouped by their first component."""
    groups: dict[str, int] = {}
    for k in dropped:
        head = k.split(".", 1)[0]
        groups[head] = groups.get(head, 0) + 1
    return ", ".join(f"{h}.* ({n} key{'s' if n > 1 else ''})" for h, n in groups.items())


def _is_timm_model(model: nn.Module) -> bool:
    return type(model).__module__.startswith("timm.")


def _resize_pos_embed_for(model: nn.Module, ckpt_pe: torch.Tensor) -> torch.Tensor:
    model_pe = model.state_dict()["pos_embed"]
    if ckpt_pe.ndim != 3 or model_pe.ndim != 3 or ckpt_pe.shape[-1] != model_pe.shape[-1]:
        return ckpt_pe  # not an absolute (1, N, D) table of the same width: leave for the shape check
    n_prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    grid = getattr(model, "grid", None)
    if grid is None:
        pe_mod = getattr(model, "patch_embed", None)
        grid = getattr(pe_mod, "grid_size", None)
    if grid is None:
        side = infer_square_grid(model_pe.shape[1] - n_prefix)
        grid = (side, side)
    grid = (int(grid[0]), int(grid[1]))
    old_side = infer_square_grid(ckpt_pe.shape[1] - n_prefix)
    if _is_timm_model(model):
        from timm.layers import resample_abs_pos_embed

        out = resample_abs_pos_embed(
            ckpt_pe, new_size=list(grid), old_size=[old_side, old_side], num_prefix_tokens=n_prefix
        )
    else:
        out = resize_pos_embed(ckpt_pe, grid, n_prefix, old_grid=(old_side, old_side))
    logger.info("resized checkpoint pos_embed from a %dx%d to a %dx%d grid", old_side, old_side, *grid)
    return out


def _drop_ssl_head(
    sd: dict[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """A DINO ``MultiCropWrapper`` state (every key under ``backbone.`` or ``head.``, possibly behind
    ``module.``) loaded into a plain encoder: the projection head is not part of the encoder, drop it."""
    if any(k.startswith(("backbone.", "head.")) for k in model_keys):
        return sd, []
    ddp = "module." if sd and all(k.startswith("module.") for k in sd) else ""
    inner = [k[len(ddp) :] for k in sd]
    if not any(k.startswith("backbone.") for k in inner) or not all(
        k.startswith(("backbone.", "head.")) for k in inner
    ):
        return sd, []
    head = [k for k in sd if k[len(ddp) :].startswith("head.")]
    if head:
        logger.debug(
            "dropped the %d keys of the SSL projection head (DINO layout: backbone.* + head.*)", len(head)
        )
    return {k: v for k, v in sd.items() if not k[len(ddp) :].startswith("head.")}, head


def adapt_state_dict(
    sd: Mapping[str, torch.Tensor],
    model: nn.Module,
    drop_prefixes: Sequence[str] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Adapt checkpoint keys to ``model``; returns (state dict, keys dropped on purpose).

    A model may declare ``checkpoint_filter(sd) -> sd``, applied first, to rename the keys of a foreign
    layout it recognises (e.g. HIPT's ``local_vit.module.`` written by ``nn.DataParallel``).
    ``drop_prefixes`` defaults to the model's ``checkpoint_drop_prefixes`` attribute: key prefixes the
    model documents as expected extras (e.g. ``("layer4.", "fc.")`` for a truncated ResNet, ``("head.",)``
    for a DINO backbone). Keys under those prefixes are dropped only when the checkpoint is that declared
    layout, i.e. every other key then matches the model and none is missing; otherwise nothing is
    dropped and the strict check in :func:`load_weights` lists every key that does not fit.
    """
    model_sd = model.state_dict()
    model_keys = set(model_sd)
    out = dict(sd)
    model_filter = getattr(model, "checkpoint_filter", None)
    if callable(model_filter):  # a layout filter declared beside the model (timm's checkpoint_filter_fn)
        out = dict(model_filter(out))
    out, dropped = _drop_ssl_head(out, model_keys)
    out = _strip_prefixes(out, model_keys)
    if drop_prefixes is None:
        drop_prefixes = tuple(getattr(model, "checkpoint_drop_prefixes", ()))
    declared = [k for k in out if k not in model_keys and any(k.startswith(p) for p in drop_prefixes)]
    kept = set(out) - set(declared)
    missing = [k for k in model_keys if k not in kept and not k.endswith(".num_batches_tracked")]
    if declared and (missing or any(k not in model_keys for k in kept)):
        # not the layout the model declares (a full checkpoint of this very model minus the declared
        # extras): keep every key so that the strict check lists them all
        logger.debug("checkpoint is not a declared layout of %s: nothing dropped", type(model).__name__)
        declared = []
    for k in declared:
        del out[k]
    dropped += declared
    if (
        "pos_embed" in out
        and "pos_embed" in model_sd
        and out["pos_embed"].shape != model_sd["pos_embed"].shape
    ):
        out["pos_embed"] = _resize_pos_embed_for(model, out["pos_embed"])
    return out, dropped


def filter_state_dict(
    sd: Mapping[str, torch.Tensor],
    model: nn.Module,
    drop_prefixes: Sequence[str] | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`adapt_state_dict` without the list of dropped keys (those are logged at DEBUG level)."""
    return adapt_state_dict(sd, model, drop_prefixes)[0]


def load_weights(
    model: nn.Module,
    path: str | os.PathLike[str],
    strict: bool = True,
    checkpoint_key: str | None = None,
    trust_pickle: bool = False,
) -> dict[str, Any]:
    """Load a local checkpoint into ``model`` (in place) and describe what was loaded.

    Strict (default): any missing, unexpected or wrongly shaped key raises :class:`WeightsMismatchError`
    listing them. Non-strict: such keys are skipped with a warning and reported.
    Returns ``{"path", "file", "sha256", "n_tensors", "missing", "unexpected", "mismatched", "dropped"}``.
    """
    file = resolve_weights_file(path)
    sd = load_checkpoint(file, checkpoint_key=checkpoint_key, trust_pickle=trust_pickle)
    sd, dropped = adapt_state_dict(sd, model)
    model_sd = model.state_dict()
    # BatchNorm step counters are not weights (many exports drop them): they keep their initial 0
    missing = [k for k in model_sd if k not in sd and not k.endswith(".num_batches_tracked")]
    declared = tuple(getattr(model, "checkpoint_drop_prefixes", ()))
    # keys the model does not declare as expected extras first: they tell why the layout differs
    unexpected = sorted((k for k in sd if k not in model_sd), key=lambda k: k.startswith(declared))
    mismatched = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(model_sd[k].shape)}"
        for k, v in sd.items()
        if k in model_sd and v.shape != model_sd[k].shape
    ]
    if missing or unexpected or mismatched:
        msg = (
            f"weights {file} do not fit {type(model).__name__}: "
            f"{len(missing)} missing keys {_preview(missing)}, "
            f"{len(unexpected)} unexpected keys {_preview(unexpected)}, "
            f"{len(mismatched)} shape mismatches {_preview(mismatched)}"
        )
        if strict:
            raise WeightsMismatchError(
                msg + ". Check that the file belongs to this encoder, or pass strict=False."
            )
        logger.warning("%s; loading the rest (strict=False)", msg)
    bad = {m.split(":", 1)[0] for m in mismatched}
    to_load = {k: v for k, v in sd.items() if k in model_sd and k not in bad}
    model.load_state_dict(to_load, strict=False)
    digest = sha256_file(file)
    note = f"; dropped {describe_dropped(dropped)}, declared unused by the model" if dropped else ""
    logger.info("loaded %d tensors from %s (sha256 %s)%s", len(to_load), file, digest[:12], note)
    return {
        "path": str(Path(path).expanduser().resolve()),
        "file": str(file.resolve()),
        "sha256": digest,
        "n_tensors": len(to_load),
        "missing": missing,
        "unexpected": unexpected,
        "mismatched": mismatched,
        "dropped": dropped,
    }
