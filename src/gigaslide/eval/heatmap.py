"""Attention / score heatmaps over slide thumbnails, and the per-slide attention files they read.

Attention file (``attention/<slide_id>.h5``, written by cross-validation)::

    coords  (N, 2) int64 level-0 tile corners   attrs: the tile spec (same names as coordinate files)
    scores  (N,)   float32 per-tile score        attrs: slide_id, model, fold, kind

``slide_id`` lets :func:`check_scores_match_slide` refuse scores drawn over another slide.

Rendering follows CLAM: scores are converted to percentiles (rank / N) so the map shows the
relative ordering of tiles within the slide; each tile is painted over its level-0 footprint
(overlapping tiles are averaged) and alpha-blended on the thumbnail.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from PIL import Image
from scipy.stats import rankdata

from gigaslide.io.base import Slide
from gigaslide.preprocess.coords_io import _plain
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.atomic import atomic_path


@dataclass
class TileScores:
    """Per-tile scores of one slide with the level-0 tile footprint."""

    coords: np.ndarray  # (N, 2) int64 level-0 corners
    scores: np.ndarray  # (N,) float
    tile_size_level0: int | None  # None when the file carries no tile geometry
    attrs: dict[str, Any]


class ScoresMismatchError(ValueError):
    """The score file does not belong to the slide it is drawn over."""


def write_attention(
    path: str | os.PathLike[str],
    coords: np.ndarray,
    scores: np.ndarray,
    spec: TileSpec | None = None,
    coords_attrs: dict[str, Any] | None = None,
    meta: dict[str, Any] | None = None,
    slide_id: str | None = None,
) -> Path:
    """Atomically write an attention file; ``spec`` (or raw ``coords_attrs``) records the tile geometry.

    ``slide_id`` (or ``meta["slide_id"]``) is stored on ``scores`` so a heatmap can check the slide.
    """
    if slide_id is not None:
        meta = {**(meta or {}), "slide_id": slide_id}
    coords = np.asarray(coords, dtype=np.int64).reshape(-1, 2)
    scores = np.asarray(scores, dtype=np.float32).reshape(-1)
    if coords.shape[0] != scores.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates for {scores.shape[0]} scores")
    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        cd = f.create_dataset("coords", data=coords)
        for k, v in {**(coords_attrs or {}), **(spec.to_attrs() if spec is not None else {})}.items():
            cd.attrs[k] = v
        sd = f.create_dataset("scores", data=scores)
        for k, v in (meta or {}).items():
            sd.attrs[k] = v
    return Path(path)


def read_scores(path: str | os.PathLike[str], slide_mpp: float | None = None) -> TileScores:
    """Read an attention/score file (``coords`` + ``scores`` datasets; ``attention_scores`` also accepted)."""
    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            key = next((k for k in ("scores", "attention_scores", "attention") if k in f), None)
            if key is None or "coords" not in f:
                raise ValueError(
                    f"{path}: needs 'coords' and 'scores' datasets (found {list(f.keys())}); for a feature "
                    "file pass --model CHECKPOINT to compute attention"
                )
            coords = np.asarray(f["coords"][:], dtype=np.int64).reshape(-1, 2)
            scores = np.asarray(f[key][:], dtype=np.float64).reshape(-1)
            cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()}
            attrs = {k: _plain(v) for k, v in f[key].attrs.items()}
    except OSError as e:
        raise ValueError(f"{path}: not a readable HDF5 score file ({e})") from e
    if coords.shape[0] != scores.shape[0]:
        raise ValueError(f"{path}: {coords.shape[0]} coords but {scores.shape[0]} scores")
    return TileScores(coords, scores, tile_size_from_attrs(cattrs, slide_mpp), {**cattrs, **attrs})


def tile_size_from_attrs(attrs: dict[str, Any], slide_mpp: float | None = None) -> int | None:
    """Level-0 tile side from coordinate attributes (gigaslide, TRIDENT or CLAM names), or None."""
    if "patch_size_level0" in attrs:
        return int(attrs["patch_size_level0"])
    try:
        return int(TileSpec.from_attrs(attrs, slide_mpp=slide_mpp).level0_size) if attrs else None
    except (ValueError, KeyError, TypeError):
        return None


def check_scores_match_slide(
    scores: TileScores,
    slide_dims: tuple[int, int],
    slide_path: str | os.PathLike[str],
    scores_path: str | os.PathLike[str],
    force: bool = False,
) -> None:
    """Refuse scores that belong to another slide.

    Two checks: (1) the score file's ``slide_id`` attribute (when present) must equal the slide's
    file stem, or its ``slide_path`` attribute must name the same file; ``force`` skips this one,
    for slide ids that legitimately differ from the file name. (2) Every tile corner must lie
    inside the slide's level-0 ``slide_dims`` (width, height); never skipped, since such tiles
    cannot be placed.

    Raises:
        ScoresMismatchError: naming both files and the fix.
    """
    slide_path, scores_path = Path(slide_path), Path(scores_path)
    sid = scores.attrs.get("slide_id")
    recorded = scores.attrs.get("slide_path")
    same_file = bool(recorded) and Path(str(recorded)).name == slide_path.name
    if not force and sid not in (None, "") and str(sid) != slide_path.stem and not same_file:
        raise ScoresMismatchError(
            f"{scores_path} holds scores of slide {str(sid)!r} but the slide is {slide_path} "
            f"(slide id {slide_path.stem!r}); pass the matching --scores file, or --force if the "
            "slide id differs from the file name on purpose"
        )
    coords = np.asarray(scores.coords).reshape(-1, 2)  # (N, 2)
    w, h = int(slide_dims[0]), int(slide_dims[1])
    outside = (coords[:, 0] < 0) | (coords[:, 1] < 0) | (coords[:, 0] >= w) | (coords[:, 1] >= h)
    if outside.any():
        i = int(np.argmax(outside))
        raise ScoresMismatchError(
            f"{scores_path}: {int(outside.sum())} of {len(coords)} tile(s) lie outside {slide_path} "
            f"(level-0 size {w} x {h}; e.g. a tile at ({coords[i, 0]}, {coords[i, 1]})): these scores "
            "belong to another slide or another scan; pass the matching --slide/--scores pair"
        )


def percentile_scores(scores: np.ndarray) -> np.ndarray:
    """Scores -> percentiles in (0, 1]: average rank / N (ties share a value; the top tile gets 1.0)."""
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        return s
    if not np.all(np.isfinite(s)):
        raise ValueError(f"{int((~np.isfinite(s)).sum())} score(s) are NaN/inf")
    return rankdata(s, method="average") / s.size


def _parse_region(
    region: tuple[int, int, int, int] | None, dims: tuple[int, int]
) -> tuple[int, int, int, int]:
    if region is None:
        return 0, 0, int(dims[0]), int(dims[1])
    x, y, w, h = (int(v) for v in region)
    if w <= 0 or h <= 0:
        raise ValueError(f"region width/height must be positive, got {region}")
    if x >= dims[0] or y >= dims[1] or x + w <= 0 or y + h <= 0:
        raise ValueError(f"region {region} lies outside the slide (level-0 size {dims})")
    return x, y, w, h


def _background(slide: Slide, region: tuple[int, int, int, int], max_size: int) -> tuple[np.ndarray, float]:
    """RGB image of ``region`` whose longer side is at most ``max_size``; returns (image, px per level-0 px)."""
    x, y, w, h = region
    scale = min(1.0, max_size / float(max(w, h)))
    out_w, out_h = max(1, round(w * scale)), max(1, round(h * scale))
    if (x, y, w, h) == (0, 0, *slide.dimensions) and scale < 1.0:
        img = slide.thumbnail(max(out_w, out_h))
    else:
        level = slide.best_level_for_downsample(1.0 / scale)
        ds = slide.level_downsamples[level]
        img = slide.read_region((x, y), level, (max(1, round(w / ds)), max(1, round(h / ds))))
    if img.shape[:2] != (out_h, out_w):
        img = np.asarray(Image.fromarray(img).resize((out_w, out_h), Image.Resampling.BILINEAR))
    return img, out_w / float(w)


def render_heatmap(
    slide: Slide,
    coords: np.ndarray,
    scores: np.ndarray,
    tile_size_level0: int,
    out_path: str | os.PathLike[str],
    max_size: int = 2048,
    region: tuple[int, int, int, int] | None = None,
    alpha: float = 0.5,
    cmap: str = "jet",
) -> Path:
    """Paint per-tile ``scores`` (percentile-normalised) over the slide and write a PNG atomically.

    Args:
        slide: the opened slide.
        coords: (N, 2) level-0 top-left tile corners; scores: (N,) one score per tile.
        tile_size_level0: tile side in level-0 pixels (``patch_size_level0`` of the tile spec).
        max_size: longest side of the output image in pixels.
        region: optional level-0 ``(x, y, w, h)``: render only that area, read at the finest level the
            output size needs (a zoomed, higher-resolution view).
        alpha: opacity of the colour overlay on tiles (0 = slide only, 1 = colours only).
        cmap: matplotlib colormap name; the highest percentile gets the colormap's top colour.
    """
    import matplotlib

    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 2)
    scores = np.asarray(scores).reshape(-1)
    if coords.shape[0] != scores.shape[0]:
        raise ValueError(f"{coords.shape[0]} coordinates for {scores.shape[0]} scores")
    if coords.shape[0] == 0:
        raise ValueError("no tiles to paint (empty coords)")
    if tile_size_level0 <= 0:
        raise ValueError(f"tile_size_level0 must be positive, got {tile_size_level0}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    try:
        colormap = matplotlib.colormaps[cmap]
    except KeyError:
        raise ValueError(f"unknown colormap {cmap!r} (see matplotlib.colormaps)") from None
    box = _parse_region(region, slide.dimensions)
    image, scale = _background(slide, box, max_size)
    h, w = image.shape[:2]
    pct = percentile_scores(scores)
    total = np.zeros((h, w), dtype=np.float64)
    count = np.zeros((h, w), dtype=np.float64)
    x0 = np.floor((coords[:, 0] - box[0]) * scale).astype(np.int64)
    y0 = np.floor((coords[:, 1] - box[1]) * scale).astype(np.int64)
    x1 = np.ceil((coords[:, 0] + tile_size_level0 - box[0]) * scale).astype(np.int64)
    y1 = np.ceil((coords[:, 1] + tile_size_level0 - box[1]) * scale).astype(np.int64)
    x0, y0, x1, y1 = np.clip(x0, 0, w), np.clip(y0, 0, h), np.clip(x1, 0, w), np.clip(y1, 0, h)
    for i in np.nonzero((x1 > x0) & (y1 > y0))[0]:
        total[y0[i] : y1[i], x0[i] : x1[i]] += pct[i]
        count[y0[i] : y1[i], x0[i] : x1[i]] += 1.0
    painted = count > 0
    value = np.divide(total, count, out=np.zeros_like(total), where=painted)
    colours = (colormap(value)[..., :3] * 255.0).astype(np.float64)  # (H, W, 3)
    out = image.astype(np.float64)
    out[painted] = (1.0 - alpha) * out[painted] + alpha * colours[painted]
    result = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    with atomic_path(out_path) as tmp:
        result.save(tmp, format="PNG")
    return Path(out_path)


def attention_from_checkpoint(
    features_path: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str],
    device: str = "cpu",
    slide_mpp: float | None = None,
) -> TileScores:
    """Attention of a trained slide model (checkpoint from ``gigaslide train``) over one feature file."""
    import torch

    from gigaslide.data.bags import BagBatch
    from gigaslide.data.features_io import read_features
    from gigaslide.models.slide import slide_inputs
    from gigaslide.train.mil import load_slide_model

    bag = read_features(features_path, slide_mpp=slide_mpp)
    if bag.coords is None:
        raise ValueError(f"{features_path}: the feature file has no tile coordinates; cannot place tiles")
    model, meta = load_slide_model(checkpoint, device=device)
    if bag.item_shape[-1] != meta["in_dim"]:
        raise ValueError(
            f"{features_path}: features have dimension {bag.item_shape[-1]} but {checkpoint} was trained on "
            f"{meta['in_dim']}"
        )
    x = torch.from_numpy(np.asarray(bag.features, dtype=np.float32)).unsqueeze(0)  # (1, N, ...)
    batch = BagBatch(
        x=x,
        coords=torch.from_numpy(bag.coords).unsqueeze(0),
        mask=torch.ones(x.shape[:2], dtype=torch.bool),
        samples=[],
        bags=[],
        item_mask=None if bag.mask is None else torch.from_numpy(bag.mask).unsqueeze(0),
    ).to(device)
    with torch.no_grad():
        out = model(**slide_inputs(model, batch))
    if out.attention is None:
        raise ValueError(f"{checkpoint}: model {meta['model']!r} produces no attention map to draw")
    with h5py.File(features_path, "r") as f:
        cattrs = {k: _plain(v) for k, v in f["coords"].attrs.items()} if "coords" in f else {}
    scores = out.attention[0].float().cpu().numpy()
    attrs = {**cattrs, **{k: bag.attrs[k] for k in ("slide_id",) if k in bag.attrs}}
    return TileScores(bag.coords, scores, tile_size_from_attrs(cattrs, slide_mpp), attrs)
