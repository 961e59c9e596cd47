"""gigaslide.preprocess: tissue detection, tile grids and coordinate files.

Public names are imported on first use so that importing the package stays cheap.
"""

from __future__ import annotations

from gigaslide._lazy import lazy_getattr

_LAZY = {
    "TileSpec": "gigaslide.preprocess.tiling_spec",
    "read_coords": "gigaslide.preprocess.coords_io",
    "write_coords": "gigaslide.preprocess.coords_io",
    "CoordsFile": "gigaslide.preprocess.coords_io",
    "tile_slide": "gigaslide.preprocess.tiling",
    "TilingResult": "gigaslide.preprocess.tiling",
    "NoTissueError": "gigaslide.preprocess.tiling",
    "grid_coords": "gigaslide.preprocess.tiling",
    "subtile_coords": "gigaslide.preprocess.tiling",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
