"""`TileSpec`: the exact geometry of a tile grid, stored beside its level-0 coordinates.

One spec covers every use in gigaslide: 256 px tiles at 0.5 um/px for tile encoders,
4096 px regions for HIPT, 224 px tiles read on the fly for end-to-end training.
Resolution is exact: a 256 px tile at 0.5 um/px covers ``256 * 0.5 / slide_mpp`` level-0
pixels (483 px on a 0.265 um/px slide), never a rounded 'nominal magnification'.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any


def mpp_to_magnification(mpp: float) -> float:
    """Conventional objective magnification of a resolution (20x ~ 0.5 um/px, 40x ~ 0.25 um/px)."""
    return 10.0 / mpp


def magnification_to_mpp(magnification: float) -> float:
    """Resolution of a conventional objective magnification (inverse of :func:`mpp_to_magnification`)."""
    return 10.0 / magnification


@dataclass(frozen=True)
class TileSpec:
    """Geometry of a tile grid on one slide.

    Attributes:
        tile_size: output tile side in pixels at ``target_mpp``.
        stride: grid step in output pixels (``tile_size`` = no overlap).
        target_mpp: output resolution in microns per pixel.
        slide_mpp: level-0 resolution of the slide.
        read_level: pyramid level read from (the coarsest one at least as fine as the target).
        read_downsample: downsample of ``read_level`` relative to level 0.
        read_size: side of the region read at ``read_level`` before resizing to ``tile_size``.
        level0_size: side of a tile in level-0 pixels.
        level0_stride: grid step in level-0 pixels (float: coordinates are ``round(i * level0_stride)``).
        level0_dims: (width, height) of level 0.
        min_tissue: minimum tissue fraction for a tile to be kept.
    """

    tile_size: int
    stride: int
    target_mpp: float
    slide_mpp: float
    read_level: int
    read_downsample: float
    read_size: int
    level0_size: int
    level0_stride: float
    level0_dims: tuple[int, int]
    min_tissue: float = 0.25
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @classmethod
    def create(
        cls,
        *,
        tile_size: int,
        target_mpp: float,
        slide_mpp: float,
        level_downsamples: tuple[float, ...] | list[float],
        level0_dims: tuple[int, int],
        stride: int | None = None,
        min_tissue: float = 0.25,
        read_level: int | None = None,
    ) -> TileSpec:
        """Derive the full spec from the slide geometry and the requested output.

        The read level is the coarsest level whose resolution is at least as fine as
        ``target_mpp`` (1% tolerance), so reading never upsamples unless even level 0 is
        coarser than the target.
        """
        if tile_size <= 0:
            raise ValueError(f"tile_size must be positive, got {tile_size}")
        if target_mpp <= 0 or slide_mpp <= 0:
            raise ValueError(f"mpp values must be positive (target {target_mpp}, slide {slide_mpp})")
        stride = tile_size if stride is None else int(stride)
        if stride <= 0:
            raise ValueError(f"stride must be positive, got {stride}")
        if not 0.0 <= min_tissue <= 1.0:
            raise ValueError(f"min_tissue must be in [0, 1], got {min_tissue}")
        scale = target_mpp / slide_mpp  # level-0 pixels per output pixel
        if read_level is None:
            read_level = 0
            for level, ds in enumerate(level_downsamples):
                if ds <= scale * 1.01 and ds >= level_downsamples[read_level]:
                    read_level = level
        ds = float(level_downsamples[read_level])
        level0_size = max(1, round(tile_size * scale))
        read_size = max(1, round(tile_size * scale / ds))
        return cls(
            tile_size=int(tile_size),
            stride=stride,
            target_mpp=float(target_mpp),
            slide_mpp=float(slide_mpp),
            read_level=int(read_level),
            read_downsample=ds,
            read_size=int(read_size),
            level0_size=int(level0_size),
            level0_stride=float(stride * scale),
            level0_dims=(int(level0_dims[0]), int(level0_dims[1])),
            min_tissue=float(min_tissue),
        )

    @property
    def scale(self) -> float:
        """Level-0 pixels per output pixel."""
        return self.target_mpp / self.slide_mpp

    @property
    def target_magnification(self) -> float:
        return mpp_to_magnification(self.target_mpp)

    @property
    def overlap(self) -> int:
        """Overlap between neighbouring tiles in output pixels."""
        return max(0, self.tile_size - self.stride)

    def grid_shape(self) -> tuple[int, int]:
        """(n_cols, n_rows) of the full grid over level 0 (tiles may hang over the right/bottom edge)."""
        w, h = self.level0_dims
        nx = max(1, math.ceil(max(w - self.level0_size, 0) / self.level0_stride) + 1)
        ny = max(1, math.ceil(max(h - self.level0_size, 0) / self.level0_stride) + 1)
        return nx, ny

    # -- persistence (CLAM / TRIDENT compatible attribute names) ----------------------
    def to_attrs(self) -> dict[str, Any]:
        """Attributes of ``coords`` in gigaslide's (= CLAM's) layout.

        CLAM reads ``patch_size`` as the size read at ``patch_level`` (``read_size``), with
        ``downsample``/``level_dim``; ``patch_size_level0`` is the same in every tool. TRIDENT's
        magnification attributes are left out on purpose: TRIDENT reads ``patch_size`` as the size
        at the TARGET resolution whenever they are present, so here (where ``patch_size`` is the
        read size) their absence makes TRIDENT take its CLAM reading path, which reads the right
        region. A TRIDENT file has its own attributes (:meth:`trident_attrs`).
        """
        w, h = self.level0_dims
        return {
            "patch_size": int(self.read_size),
            "patch_level": int(self.read_level),
            "downsample": [float(self.read_downsample), float(self.read_downsample)],
            # CLAM's meaning: both are the dimensions of `patch_level`, not of level 0
            "downsampled_level_dim": [round(w / self.read_downsample), round(h / self.read_downsample)],
            "level_dim": [round(w / self.read_downsample), round(h / self.read_downsample)],
            "level0_dim": [int(w), int(h)],
            "patch_size_level0": int(self.level0_size),
            "overlap": int(self.overlap),
            "tile_size": int(self.tile_size),
            "stride": int(self.stride),
            "target_mpp": float(self.target_mpp),
            "slide_mpp": float(self.slide_mpp),
            "level0_stride": float(self.level0_stride),
            "min_tissue": float(self.min_tissue),
            "gigaslide_spec": json.dumps(self.to_dict()),
        }

    def trident_attrs(self) -> dict[str, Any]:
        """Attributes of ``coords`` in TRIDENT's layout (``patches/<name>_patches.h5``).

        TRIDENT reads a tile as ``patch_size`` px at the target resolution covering
        ``round(patch_size * level0_magnification / target_magnification)`` level-0 px. The
        magnifications are written unrounded (``10 / mpp``) so that ratio is exactly the tile's
        level-0 size; ``level0_width``/``level0_height`` let a reader check the slide. Without a
        known mpp (CLAM-origin coordinates) the magnifications are left out.
        """
        w, h = self.level0_dims
        attrs: dict[str, Any] = {
            "patch_size": int(self.tile_size),
            "patch_size_level0": int(self.level0_size),
            "overlap": int(self.overlap),
            "level0_width": int(w),
            "level0_height": int(h),
            "tile_size": int(self.tile_size),
            "stride": int(self.stride),
            "min_tissue": float(self.min_tissue),
            "gigaslide_spec": json.dumps(self.to_dict()),
        }
        if math.isfinite(self.slide_mpp) and self.slide_mpp > 0:
            attrs.update(
                level0_magnification=float(mpp_to_magnification(self.slide_mpp)),
                target_magnification=float(mpp_to_magnification(self.slide_mpp * self.scale_exact)),
                target_mpp=float(self.slide_mpp * self.scale_exact),
                slide_mpp=float(self.slide_mpp),
            )
        return attrs

    @property
    def scale_exact(self) -> float:
        """Level-0 pixels per output pixel, from the level-0 tile size when the mpp is unknown."""
        if math.isfinite(self.target_mpp) and math.isfinite(self.slide_mpp) and self.slide_mpp > 0:
            return self.scale
        return self.level0_size / self.tile_size

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["level0_dims"] = list(self.level0_dims)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TileSpec:
        d = dict(d)
        d["level0_dims"] = tuple(d["level0_dims"])
        d.setdefault("extra", {})
        return cls(**d)

    @classmethod
    def from_attrs(cls, attrs: dict[str, Any], slide_mpp: float | None = None) -> TileSpec:
        """Rebuild a spec from coordinate-file attributes (ours, CLAM's or TRIDENT's).

        CLAM/TRIDENT files carry no physical resolution; ``slide_mpp`` (or the
        ``level0_magnification`` TRIDENT stores) is used to recover it.
        """
        if "gigaslide_spec" in attrs:
            raw = attrs["gigaslide_spec"]
            return cls.from_dict(json.loads(raw.decode() if isinstance(raw, bytes) else raw))
        level_dim = attrs.get("level_dim")
        if "patch_size_level0" in attrs and "patch_level" not in attrs:  # TRIDENT
            level0_size = int(attrs["patch_size_level0"])
            patch_size = int(attrs["patch_size"])
            overlap = int(attrs.get("overlap", 0))
            extra: dict[str, Any] = {"source": "trident"}
            if slide_mpp is None and "level0_magnification" in attrs:
                # only a nominal value (20x -> 0.5 um/px, while the slide may say 0.499): readers
                # that have the slide pass its mpp instead
                slide_mpp = 10.0 / float(attrs["level0_magnification"])
                extra["mpp_source"] = "magnification"
            mpp = float(slide_mpp) if slide_mpp is not None else float("nan")
            if "level0_width" in attrs and "level0_height" in attrs:
                level_dim = [attrs["level0_width"], attrs["level0_height"]]
            else:
                level_dim = attrs.get("level0_dim")
            scale = level0_size / patch_size
            return cls(
                tile_size=patch_size,
                stride=patch_size - overlap,
                target_mpp=mpp * scale,
                slide_mpp=mpp,
                read_level=0,
                read_downsample=1.0,
                read_size=level0_size,
                level0_size=level0_size,
                level0_stride=float((patch_size - overlap) * scale),
                level0_dims=(int(level_dim[0]), int(level_dim[1])) if level_dim is not None else (0, 0),
                min_tissue=0.0,
                extra=extra,
            )
        if "patch_level" in attrs:  # CLAM
            patch_size = int(attrs["patch_size"])
            level = int(attrs["patch_level"])
            ds_attr = attrs.get("downsample", [1.0, 1.0])
            ds_xy = [float(v) for v in ds_attr] if hasattr(ds_attr, "__len__") else [float(ds_attr)] * 2
            ds = ds_xy[0]
            level0_size = round(patch_size * ds)
            if attrs.get("level0_dim") is not None:  # exact, when the writer stored it
                level_dim = attrs["level0_dim"]
            elif level_dim is not None:
                # CLAM's level_dim is the size of `patch_level`: scaled to level 0 it may be off by up
                # to one downsample (e.g. 4442 x 3566 for 4443 x 3567); TileDataset tolerates that
                level_dim = [level_dim[0] * ds_xy[0], level_dim[1] * ds_xy[-1]]
            mpp = float(slide_mpp) if slide_mpp is not None else float("nan")
            return cls(
                tile_size=patch_size,
                stride=patch_size,
                target_mpp=mpp * ds,
                slide_mpp=mpp,
                read_level=level,
                read_downsample=ds,
                read_size=patch_size,
                level0_size=level0_size,
                level0_stride=float(level0_size),
                level0_dims=(round(level_dim[0]), round(level_dim[1])) if level_dim is not None else (0, 0),
                min_tissue=0.0,
                extra={"source": "clam"},
            )
        raise ValueError(f"unrecognised coordinate attributes: {sorted(attrs)}")
