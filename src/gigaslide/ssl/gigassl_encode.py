"""Giga-SSL inference (paper, section 4.2 "Default settings"): one L2-normalised embedding per slide.

For each slide, R views (default 50) of T non-augmented tiles (T = the training T) are drawn at
random, placed on their sparse map without slide-level augmentation, embedded by the pretrained
aggregator (the projector is dropped, as in SimCLR), averaged, and the mean is L2-normalised.

Non-augmented tiles come from either
* a plain feature folder of ``gigaslide embed`` (``h5_files/<slide_id>.h5``, features (N, D) with
  coords and tile spec): the views draw from all of the slide's tiles; or
* a Giga-SSL bank: its identity views (``BANK/identity/h5_files/<slide_id>.h5``, all the slide's
  tiles without augmentation, written by ``gigaslide gigassl bank --identity-view``), read exactly
  as a feature folder, so that encoding a bank equals encoding the ``gigaslide embed`` folder of the
  same slides and encoder; else its identity augmentations (recorded parameters with no crop, flip,
  rotation, jitter, grayscale or blur), views drawn among their ``n_tiles`` tiles. A bank with neither
  is refused unless ``use_augmented=True``, which draws each view from one of the bank's
  augmentations at random (not the paper's protocol).

Draws come from ``np.random.default_rng([seed, hash(slide_id)])``: a slide's embedding does not
depend on the other slides. Unreadable slides are recorded in ``failed`` and skipped. The output,
an ``.npz`` with ``embeddings`` (N, E) float32 and ``slide_ids`` (N,), is what ``gigaslide probe
--embeddings`` reads; it is written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import h5py
import numpy as np
import torch
from tqdm.auto import tqdm

from gigaslide.data.features_io import read_features
from gigaslide.data.gigassl_bank import BANK_SUBDIR, GigaSSLBank
from gigaslide.data.gigassl_views import tile_cells
from gigaslide.ssl.simclr import GigaSSLModel, load_gigassl_model
from gigaslide.utils.atomic import atomic_path

log = logging.getLogger(__name__)

#: a view source: rng -> (features (T, D), cells (T, 2))
ViewFn = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray]]


@dataclass
class EncodeResult:
    """Slide embeddings (N, E), their ids, the output file and the slides that failed (id -> reason)."""

    embeddings: np.ndarray
    slide_ids: list[str]
    path: Path | None
    failed: dict[str, str] = field(default_factory=dict)


def _slide_rng(seed: int, slide_id: str) -> np.random.Generator:
    h = int.from_bytes(hashlib.sha256(slide_id.encode()).digest()[:8], "little")
    return np.random.default_rng([int(seed), h])


def is_identity_augmentation(params: dict[str, float | int | bool]) -> bool:
    """Whether recorded tile-augmentation parameters change nothing (full crop, no flip/rotation/colour/blur)."""
    return (
        abs(float(params.get("crop_w", 0.0)) - 1.0) < 1e-9
        and abs(float(params.get("crop_h", 0.0)) - 1.0) < 1e-9
        and abs(float(params.get("crop_cx", 1.0))) < 1e-9
        and abs(float(params.get("crop_cy", 1.0))) < 1e-9
        and not params.get("flip_x", True)
        and not params.get("flip_y", True)
        and int(params.get("rot90", 1)) == 0
        and not params.get("jitter_on", True)
        and not params.get("gray", True)
        and not params.get("blur_on", True)
    )


def identity_augmentations(attrs: dict[str, object]) -> list[int]:
    """Indices of the identity augmentations recorded in a bank file's ``augmentations`` attribute."""
    raw = attrs.get("augmentations")
    if raw is None:
        return []
    try:
        rows = json.loads(raw if isinstance(raw, str) else str(raw))
    except json.JSONDecodeError:
        return []
    return [i for i, p in enumerate(rows) if isinstance(p, dict) and is_identity_augmentation(p)]


def _draw(n: int, t: int, rng: np.random.Generator) -> np.ndarray:
    """T distinct row indices (all n when n < T), increasing."""
    return np.sort(rng.choice(n, size=min(t, n), replace=False))


def _feature_views(path: Path, grid_unit: float | None) -> tuple[str, Callable[[int], ViewFn]]:
    bag = read_features(path)
    if bag.coords is None or bag.spec is None:
        raise ValueError(
            f"{path}: Giga-SSL encoding needs tile coords and the tile spec (a gigaslide feature file)"
        )
    if bag.n_tiles == 0:
        raise ValueError(f"{path}: no tiles")

    def make(t: int) -> ViewFn:
        def view(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            rows = _draw(bag.n_tiles, t, rng)
            assert bag.coords is not None and bag.spec is not None
            return bag.features[rows].astype(np.float32), tile_cells(bag.coords[rows], bag.spec, grid_unit)

        return view

    return str(bag.attrs.get("slide_id", path.stem)), make


def _bank_views(
    bank: GigaSSLBank, i: int, grid_unit: float | None, use_augmented: bool
) -> tuple[str, Callable[[int], ViewFn]]:
    meta = bank.slides[i]
    identity = bank.identity_file(i)
    if identity is not None:
        return _feature_views(identity, grid_unit)
    augs = identity_augmentations(meta.attrs)
    if not augs:
        if not use_augmented:
            raise ValueError(
                f"{meta.path}: the bank has no non-augmented (identity) view ({bank.identity_dir / meta.path.name} "
                "is missing); add it by rerunning `gigaslide gigassl bank` with the same options and --out plus "
                "--identity-view (finished augmentations are kept), or encode the plain features of "
                "`gigaslide embed`, or pass --use-augmented to draw views from the augmented ones"
            )
        augs = list(range(meta.n_aug))
    if meta.spec is None:
        raise ValueError(f"{meta.path}: bank file without a tile spec; rebuild it with gigaslide")

    def make(t: int) -> ViewFn:
        def view(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
            aug = augs[int(rng.integers(len(augs)))]
            rows = _draw(meta.n_tiles, t, rng)
            feats, coords = bank.view(i, aug, rows)
            assert meta.spec is not None
            return feats, tile_cells(coords, meta.spec, grid_unit)

        return view

    return meta.slide_id, make


@torch.no_grad()
def embed_views(model: GigaSSLModel, view: ViewFn, n_views: int, rng: np.random.Generator,
                device: torch.device) -> np.ndarray:  # fmt: skip
    """Mean of the aggregator embeddings of ``n_views`` views, L2-normalised: (E,) float32."""
    drawn = [view(rng) for _ in range(n_views)]
    feats = torch.from_numpy(np.stack([f for f, _ in drawn])).to(device)  # (R, T, D)
    cells = torch.from_numpy(np.stack([c for _, c in drawn])).to(device)  # (R, T, 2)
    emb = model.embed(feats, cells).float().mean(dim=0)  # (E,)
    return torch.nn.functional.normalize(emb, dim=0).cpu().numpy().astype(np.float32)


def _sources(source: Path, grid_unit: float | None, use_augmented: bool) -> list[tuple[str, Callable[[], tuple[str, Callable[[int], ViewFn]]]]]:  # fmt: skip
    """(name, loader) per slide of a bank or a feature folder."""
    folder = source / BANK_SUBDIR if (source / BANK_SUBDIR).is_dir() else source
    if not folder.is_dir():
        raise FileNotFoundError(f"{source}: no such folder (a Giga-SSL bank or a `gigaslide embed` output)")
    files = sorted(p for p in folder.glob("*.h5") if not p.name.startswith("."))
    if not files:
        raise ValueError(f"{folder}: no .h5 files; give a Giga-SSL bank or a `gigaslide embed` output")
    with h5py.File(files[0], "r") as f:
        is_bank = "features" in f and f["features"].ndim == 3
    if is_bank:
        bank = GigaSSLBank(folder)
        return [(s.slide_id, lambda i=i: _bank_views(bank, i, grid_unit, use_augmented))
                for i, s in enumerate(bank.slides)]  # fmt: skip
    return [(p.stem, lambda p=p: _feature_views(p, grid_unit)) for p in files]


def encode_gigassl(
    source: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    *,
    n_views: int = 50,
    n_tiles: int | None = None,
    use_augmented: bool = False,
    device: str | torch.device = "auto",
    seed: int = 0,
    progress: bool = True,
) -> EncodeResult:
    """Encode every slide of a bank or feature folder with a ``pretrain_gigassl`` checkpoint.

    Args:
        source: a Giga-SSL bank folder or a ``gigaslide embed`` output folder.
        checkpoint: ``checkpoint.pth`` of ``gigaslide pretrain gigassl``.
        out: the ``.npz`` to write (None: return only).
        n_views: R views per slide (50 in the paper).
        n_tiles: T tiles per view (default: the training T).
        use_augmented: with a bank lacking an identity augmentation, draw views from its augmentations.
    """
    from gigaslide.utils.device import resolve_device

    if n_views < 1:
        raise ValueError(f"n_views must be >= 1, got {n_views}")
    model, cfg = load_gigassl_model(checkpoint)
    dev = resolve_device(device)
    model.to(dev)
    t = int(n_tiles or cfg.n_tiles)
    rows, ids, failed = [], [], {}
    for name, load in tqdm(_sources(Path(source), cfg.grid_unit, use_augmented), desc="encode",
                           disable=not progress):  # fmt: skip
        try:
            slide_id, make = load()
            rows.append(embed_views(model, make(t), n_views, _slide_rng(seed, slide_id), dev))
            ids.append(slide_id)
        except (ValueError, OSError, KeyError) as e:
            failed[name] = str(e)
            log.warning("slide %s skipped: %s", name, e)
    if not rows:
        raise ValueError(
            f"{source}: no slide could be encoded; first error: {next(iter(failed.values()), '')}"
        )
    X = np.stack(rows)
    path = None
    if out is not None:
        path = Path(out)
        if path.suffix != ".npz":
            raise ValueError(f"{path}: the embeddings file must end in .npz")
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, embeddings=X, slide_ids=np.asarray(ids), n_views=n_views, n_tiles=t,
                     checkpoint=str(checkpoint), aggregator=cfg.aggregator)  # fmt: skip
    return EncodeResult(X, ids, path, failed)
