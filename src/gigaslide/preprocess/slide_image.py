"""A whole slide (or its tissue bounding box) as one large image, streamed by bands into a uint8 cache.

LongViT reads the slide, resizes it to a fixed size (1,024^2 .. 32,768^2) and cuts it into 32 x 32
patches. Here the image is produced band by band (a few hundred output rows at a time): each band is
read from the pyramid level that is just fine enough, resized with PIL (bicubic, antialiased, with a
source margin so that bands join seamlessly) and written into a ``.npy`` file opened as a memory map.
No full-resolution read and no float copy of the image ever exists; the cache is reused by later epochs.

    spec = SlideImageSpec(target_size=4096, region="tissue")
    img = render_slide_image(slide, spec, "cache/slide-1.npy", tissue=detect_tissue(slide))
    img.pixels      # (H, W, 3) uint8 memmap, H and W multiples of 32
    img.token_mask  # (H/32, W/32) bool tissue tokens (None without a tissue mask)
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from gigaslide.io.base import BACKGROUND, Slide
from gigaslide.preprocess.tissue import TissueMask
from gigaslide.utils.atomic import atomic_path, atomic_write_text

REGIONS = ("tissue", "whole")


@dataclass(frozen=True)
class SlideImageSpec:
    """How to turn a slide into one image.

    Attributes:
        target_size: output side in pixels (the longer side when ``keep_aspect``), 1,024 .. 32,768.
        region: ``tissue`` (bounding box of the tissue mask plus ``margin``) or ``whole`` (the slide).
        keep_aspect: False = squash the region to ``target_size`` x ``target_size`` as LongViT's reference
            conversion does; True = keep the aspect ratio (the shorter side shrinks) and pad to 32.
        patch_size: the output is padded (white) to a multiple of this.
        margin: fraction of the tissue box added on every side (``region="tissue"``).
        band_rows: output rows produced per band (memory: ``band_rows * scale * region width * 3`` bytes).
        min_tissue: fraction of a token that must be tissue for ``token_mask`` to keep it.
    """

    target_size: int = 4096
    region: str = "tissue"
    keep_aspect: bool = False
    patch_size: int = 32
    margin: float = 0.02
    band_rows: int = 512
    min_tissue: float = 0.05

    def __post_init__(self) -> None:
        if not 32 <= self.target_size <= 65536:
            raise ValueError(f"target_size must be in [32, 65536] pixels, got {self.target_size}")
        if self.region not in REGIONS:
            raise ValueError(f"region must be one of {REGIONS}, got {self.region!r}")
        if self.patch_size < 1 or self.band_rows < 1:
            raise ValueError("patch_size and band_rows must be >= 1")


@dataclass
class SlideImage:
    """A rendered slide image: uint8 pixels (memmap), token mask and where they came from."""

    pixels: np.ndarray  # (H, W, 3) uint8, H and W multiples of patch_size
    token_mask: np.ndarray | None  # (H / p, W / p) bool
    box: tuple[float, float, float, float]  # level-0 region (x0, y0, x1, y1) drawn into the image
    content_size: tuple[int, int]  # (width, height) of the resized region before padding
    level: int  # pyramid level read
    patch_size: int

    @property
    def grid(self) -> tuple[int, int]:
        """(rows, cols) of patch tokens."""
        return self.pixels.shape[0] // self.patch_size, self.pixels.shape[1] // self.patch_size


def region_box(
    slide: Slide, spec: SlideImageSpec, tissue: TissueMask | None
) -> tuple[float, float, float, float]:
    """Level-0 box (x0, y0, x1, y1) to render: the tissue bounding box plus margin, or the whole slide."""
    w0, h0 = slide.dimensions
    if spec.region == "whole":
        return 0.0, 0.0, float(w0), float(h0)
    if tissue is None:
        raise ValueError(
            f"{slide.path}: region='tissue' needs a tissue mask; pass tissue=detect_tissue(slide)"
        )
    ys, xs = np.nonzero(tissue.mask)
    if len(xs) == 0:
        raise ValueError(
            f"{slide.path}: the tissue mask is empty; use region='whole' or check tissue detection"
        )
    sx, sy = tissue.downsample
    x0, x1 = xs.min() * sx, (xs.max() + 1) * sx
    y0, y1 = ys.min() * sy, (ys.max() + 1) * sy
    mx, my = (x1 - x0) * spec.margin, (y1 - y0) * spec.margin
    return max(0.0, x0 - mx), max(0.0, y0 - my), min(float(w0), x1 + mx), min(float(h0), y1 + my)


def output_size(box: tuple[float, float, float, float], spec: SlideImageSpec) -> tuple[int, int, int, int]:
    """(content width, content height, padded width, padded height) of the output image."""
    bw, bh = box[2] - box[0], box[3] - box[1]
    if spec.keep_aspect:
        s = spec.target_size / max(bw, bh)
        cw, ch = max(1, round(bw * s)), max(1, round(bh * s))
    else:
        cw = ch = spec.target_size
    p = spec.patch_size
    return cw, ch, -(-cw // p) * p, -(-ch // p) * p


def _render_into(
    out: np.ndarray,
    slide: Slide,
    box: tuple[float, float, float, float],
    cw: int,
    ch: int,
    level: int,
    band: int,
) -> None:
    """Fill ``out[:ch, :cw]`` with the resized box, band by band (white elsewhere)."""
    ds = slide.level_downsamples[level]
    bx0, by0 = box[0] / ds, box[1] / ds  # box in level pixels
    sx, sy = (box[2] - box[0]) / ds / cw, (box[3] - box[1]) / ds / ch  # level pixels per output pixel
    pad_x, pad_y = math.ceil(3 * max(sx, 1.0)) + 2, math.ceil(3 * max(sy, 1.0)) + 2  # filter support
    rx0 = math.floor(bx0) - pad_x
    rw = math.ceil(bx0 + cw * sx) + pad_x - rx0
    out[:] = BACKGROUND
    for oy0 in range(0, ch, band):
        oy1 = min(ch, oy0 + band)
        ry0 = math.floor(by0 + oy0 * sy) - pad_y
        ry1 = math.ceil(by0 + oy1 * sy) + pad_y
        src = slide.read_region((round(rx0 * ds), round(ry0 * ds)), level, (rw, ry1 - ry0))
        crop = (bx0 - rx0, by0 + oy0 * sy - ry0, bx0 - rx0 + cw * sx, by0 + oy1 * sy - ry0)
        img = Image.fromarray(src).resize((cw, oy1 - oy0), Image.Resampling.BICUBIC, box=crop)
        out[oy0:oy1, :cw] = np.asarray(img)


def token_mask_from_tissue(
    tissue: TissueMask, box: tuple[float, float, float, float], cw: int, ch: int, spec: SlideImageSpec
) -> np.ndarray:
    """(H/p, W/p) bool: tokens whose area is at least ``min_tissue`` tissue (padding tokens are False)."""
    p = spec.patch_size
    gh, gw = -(-ch // p), -(-cw // p)
    sx, sy = tissue.downsample
    m = Image.fromarray(tissue.mask.astype(np.float32))
    # token grid over the content, in mask pixels; area-average the mask over each token
    crop = (
        box[0] / sx,
        box[1] / sy,
        box[0] / sx + gw * p * (box[2] - box[0]) / cw / sx,
        box[1] / sy + gh * p * (box[3] - box[1]) / ch / sy,
    )
    frac = np.asarray(m.resize((gw, gh), Image.Resampling.BOX, box=crop))
    return frac >= spec.min_tissue


def render_slide_image(
    slide: Slide, spec: SlideImageSpec, out_path: str | Path, tissue: TissueMask | None = None
) -> SlideImage:
    """Render ``slide`` per ``spec`` into ``out_path`` (.npy, uint8) and its sidecars; reuse a complete cache.

    Writes ``out_path`` (pixels), ``<stem>.tokens.npy`` (token mask, when ``tissue`` is given) and
    ``<stem>.json`` (spec, box, level, slide path) atomically, the JSON last: a cache counts as complete
    only when its JSON matches ``spec`` and the slide file, so an interrupted render is redone.
    """
    out_path = Path(out_path)
    meta_path, tok_path = out_path.with_suffix(".json"), out_path.with_suffix(".tokens.npy")
    box = region_box(slide, spec, tissue)
    cw, ch, pw, ph = output_size(box, spec)
    level = slide.best_level_for_downsample(min((box[2] - box[0]) / cw, (box[3] - box[1]) / ch))
    stat = slide.path.stat() if slide.path.exists() else None
    meta = {
        "spec": asdict(spec),
        "slide": str(slide.path),
        "slide_size_bytes": stat.st_size if stat else None,
        "slide_mtime_ns": stat.st_mtime_ns if stat else None,
        "box": list(box),
        "content_size": [cw, ch],
        "level": level,
        "has_tokens": tissue is not None,
    }
    cached = load_slide_image(out_path, expect=meta)
    if cached is not None:
        return cached
    with atomic_path(out_path, suffix=".npy") as tmp:
        arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(ph, pw, 3))
        _render_into(arr, slide, box, cw, ch, level, spec.band_rows)
        arr.flush()
        del arr
    if tissue is not None:
        tokens = token_mask_from_tissue(tissue, box, cw, ch, spec)
        full = np.zeros((ph // spec.patch_size, pw // spec.patch_size), dtype=bool)
        full[: tokens.shape[0], : tokens.shape[1]] = tokens
        with atomic_path(tok_path, suffix=".npy") as tmp, open(tmp, "wb") as fh:
            np.save(fh, full)
    atomic_write_text(meta_path, json.dumps(meta, indent=1))
    loaded = load_slide_image(out_path, expect=meta)
    assert loaded is not None
    return loaded


def load_slide_image(path: str | Path, expect: dict | None = None) -> SlideImage | None:
    """Open a rendered image (memmap) with its token mask; None when absent, incomplete or stale."""
    path = Path(path)
    meta_path, tok_path = path.with_suffix(".json"), path.with_suffix(".tokens.npy")
    if not (path.is_file() and meta_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if expect is not None and meta != json.loads(json.dumps(expect)):
        return None
    if meta.get("has_tokens") and not tok_path.is_file():
        return None
    pixels = np.load(path, mmap_mode="r")
    tokens = np.load(tok_path) if meta.get("has_tokens") else None
    return SlideImage(
        pixels=pixels,
        token_mask=tokens,
        box=tuple(meta["box"]),
        content_size=tuple(meta["content_size"]),
        level=int(meta["level"]),
        patch_size=int(meta["spec"]["patch_size"]),
    )
