"""Parse a tiled pyramidal TIFF / Aperio SVS into plain level descriptors for direct tile decoding.

:func:`parse_tiff_pyramid` uses tifffile only to walk the file structure once; the result
(:class:`TiffPyramid`) holds tile offsets, byte counts, JPEG tables and colour-space
decisions as plain numbers, so readers can decode tiles with ``os.pread`` + imagecodecs
in any process. Files the direct reader cannot serve exactly raise
:class:`TiffLayoutUnsupported` (a :class:`SlideReadError`) with the reason, so automatic
backend choice moves on to OpenSlide / tiffslide.

Level list: the tiled images of the main IFD chain, largest first, which is what OpenSlide
reports for Aperio SVS (thumbnail, label and macro are stripped images and are skipped) and
for generic tiled TIFF. A file whose only tiled main image keeps its reduced levels in
SubIFDs (tifffile/OME style) uses those SubIFDs as levels, as tiffslide does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from gigaslide.io.backend_utils import openslide_downsamples
from gigaslide.io.base import SlideReadError
from gigaslide.io.metadata import (
    mpp_from_properties,
    mpp_from_tiff_page,
    objective_from_properties,
    parse_aperio_description,
)

# TIFF Compression values served through tifffile's own segment decoder (no colour-space ambiguity):
# none, LZW, Adobe deflate, deflate, zstd, WebP, Aperio JPEG 2000 RGB.
TIFFFILE_CODECS = frozenset({1, 5, 8, 32946, 50000, 50001, 33005})
JPEG = 7
# Layouts OpenSlide reads with vendor-specific level rules (or that are not slides at all): refuse them.
_FOREIGN_LAYOUTS = (
    "ndpi",
    "scn",
    "philips",
    "bif",
    "qpi",
    "ome",
    "lsm",
    "stk",
    "imagej",
    "mmstack",
    "ndtiff",
)
# photometric values
_MINISBLACK, _RGB, _YCBCR = 1, 2, 6


class TiffLayoutUnsupported(SlideReadError):
    """The file is not a tiled TIFF pyramid that the direct reader can decode exactly."""


@dataclass(frozen=True)
class TiledLevel:
    """One pyramid level stored as a grid of tiles (arrays are (tiles_down * tiles_across,))."""

    page_path: tuple[int, ...]  # (main-chain index,) or (main-chain index, SubIFD index)
    width: int
    height: int
    tile_width: int
    tile_height: int
    tiles_across: int
    tiles_down: int
    offsets: np.ndarray
    counts: np.ndarray
    compression: int
    photometric: int
    samples: int  # samples per pixel: 1 grey, 3 RGB, 4 RGB + alpha
    jpeg_tables: bytes | None
    jpeg_colorspace: int | None  # forced JPEG colour space (2 = RGB, Aperio style) or None = stream's own
    jpeg_outcolorspace: int | None  # 2 = RGB output; None for grey

    @property
    def codec(self) -> str:
        return "jpeg" if self.compression == JPEG else "tifffile"


@dataclass(frozen=True)
class TiffPyramid:
    """The levels and metadata of a tiled TIFF, enough to read it without tifffile."""

    levels: tuple[TiledLevel, ...]
    downsamples: tuple[float, ...]
    vendor: str
    metadata_mpp: float | None
    objective_power: float | None
    properties: dict[str, str] = field(default_factory=dict)


def _level_from_page(path: Path, page: Any, page_path: tuple[int, ...]) -> TiledLevel:
    """Describe one tiled page, or raise :class:`TiffLayoutUnsupported` saying why it cannot be served."""
    where = f"{path}: image {'/'.join(map(str, page_path))}"
    compression, photometric = int(page.compression), int(page.photometric)
    samples = int(page.samplesperpixel)
    if int(page.bitspersample) != 8 or int(page.sampleformat) != 1:
        raise TiffLayoutUnsupported(f"{where}: {page.bitspersample}-bit samples (only 8-bit unsigned served)")
    if int(page.tiledepth) != 1 or page.imagedepth != 1:
        raise TiffLayoutUnsupported(f"{where}: volumetric tiles are not served")
    if samples > 1 and int(page.planarconfig) != 1:
        raise TiffLayoutUnsupported(f"{where}: planar (separate) sample layout is not served")
    colorspace: int | None = None
    outcolorspace: int | None = _RGB
    if compression == JPEG:
        if page.extrasamples:
            raise TiffLayoutUnsupported(f"{where}: JPEG tiles with extra samples are not served")
        if photometric == _YCBCR and samples == 3:
            pass  # libjpeg converts YCbCr -> RGB (any chroma subsampling)
        elif photometric == _RGB and samples == 3:
            # RGB photometric with a plain JPEG stream (no JFIF marker): the components are R, G, B
            # without a colour transform (Aperio SVS). OpenSlide decodes them the same way.
            colorspace = None if page.is_jfif else _RGB
        elif photometric == _MINISBLACK and samples == 1:
            outcolorspace = None
        else:
            raise TiffLayoutUnsupported(f"{where}: JPEG with photometric {photometric} is not served")
    elif compression in TIFFFILE_CODECS:
        ok = (photometric == _RGB and samples in (3, 4)) or (photometric == _MINISBLACK and samples in (1, 2))
        if not ok:
            raise TiffLayoutUnsupported(
                f"{where}: photometric {photometric} with {samples} samples is not served uncompressed"
            )
        if samples in (2, 4) and tuple(int(e) for e in page.extrasamples) not in ((1,), (2,)):
            raise TiffLayoutUnsupported(f"{where}: extra samples {page.extrasamples} are not alpha")
        outcolorspace = None
    else:
        raise TiffLayoutUnsupported(f"{where}: compression {compression} is not served")
    tw, th = int(page.tilewidth), int(page.tilelength)
    height, width = int(page.imagelength), int(page.imagewidth)
    across, down = -(-width // tw), -(-height // th)
    offsets = np.asarray(page.dataoffsets, dtype=np.int64)
    counts = np.asarray(page.databytecounts, dtype=np.int64)
    if offsets.shape != (across * down,) or counts.shape != offsets.shape:
        raise TiffLayoutUnsupported(f"{where}: {offsets.size} tile offsets for a {across}x{down} tile grid")
    return TiledLevel(
        page_path=page_path,
        width=width,
        height=height,
        tile_width=tw,
        tile_height=th,
        tiles_across=across,
        tiles_down=down,
        offsets=offsets,
        counts=counts,
        compression=compression,
        photometric=photometric,
        samples=samples,
        jpeg_tables=bytes(page.jpegtables) if page.jpegtables else None,
        jpeg_colorspace=colorspace,
        jpeg_outcolorspace=outcolorspace,
    )


def _pyramid_pages(tf: Any) -> list[tuple[tuple[int, ...], Any]]:
    """The tiled pages that form the pyramid, as (page_path, page), largest first."""
    pages: list[tuple[tuple[int, ...], Any]] = []
    for i, page in enumerate(tf.pages):
        if getattr(page, "is_tiled", False):
            pages.append(((i,), page))
    if len(pages) == 1 and pages[0][1].subifds:
        (i,), main = pages[0]
        for j, sub in enumerate(main.pages):
            if getattr(sub, "is_tiled", False):
                pages.append(((i, j), sub))
    pages.sort(key=lambda item: (-int(item[1].imagewidth), -int(item[1].imagelength)))
    return pages


def parse_tiff_pyramid(path: str | Path) -> TiffPyramid:
    """Describe the tiled pyramid in ``path`` or raise :class:`SlideReadError` / :class:`TiffLayoutUnsupported`."""
    import tifffile

    path = Path(path)
    try:
        tf = tifffile.TiffFile(path)
    except Exception as exc:
        raise TiffLayoutUnsupported(f"{path}: not a TIFF file tifffile can parse ({exc})") from exc
    with tf:
        try:
            foreign = [name for name in _FOREIGN_LAYOUTS if getattr(tf, f"is_{name}", False)]
            if foreign:
                raise TiffLayoutUnsupported(
                    f"{path}: {foreign[0].upper()} layout is left to OpenSlide/tiffslide"
                )
            pages = _pyramid_pages(tf)
            if not pages:
                raise TiffLayoutUnsupported(f"{path}: no tiled image (strip-based TIFF)")
            levels = tuple(_level_from_page(path, page, pp) for pp, page in pages)
            first = pages[0][1]
            description = str(first.description or "")
            aperio = parse_aperio_description(description) if tf.is_svs else {}
        except SlideReadError:
            raise
        except Exception as exc:  # a damaged IFD surfaces while walking pages
            raise TiffLayoutUnsupported(f"{path}: TIFF structure cannot be read ({exc})") from exc
    dims = [(lv.width, lv.height) for lv in levels]
    properties = {f"aperio.{k}": v for k, v in aperio.items()}
    if aperio:
        vendor = "aperio"
        mpp = mpp_from_properties(properties, ("aperio.MPP",))
        objective = objective_from_properties(properties, ("aperio.AppMag",))
    else:
        vendor = "generic-tiff"
        mpp = mpp_from_tiff_page(first)
        objective = None
    properties["tiff.ImageDescription"] = description
    properties["tiff-direct.vendor"] = vendor
    for k, lv in enumerate(levels):
        properties[f"tiff-direct.level[{k}].compression"] = str(lv.compression)
        properties[f"tiff-direct.level[{k}].tile-width"] = str(lv.tile_width)
        properties[f"tiff-direct.level[{k}].tile-height"] = str(lv.tile_height)
    return TiffPyramid(
        levels=levels,
        downsamples=openslide_downsamples(dims),
        vendor=vendor,
        metadata_mpp=mpp,
        objective_power=objective,
        properties=properties,
    )
