"""gigaslide.data: tile datasets, feature files, cohorts and splits.

Submodules are imported on first use (``from gigaslide.data import TileDataset`` works) so that
importing the package stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TileDataset": "gigaslide.data.tile_dataset",
    "TileLoader": "gigaslide.data.tile_loader",
    "read_features": "gigaslide.data.features_io",
    "write_features": "gigaslide.data.features_io",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'gigaslide.data' has no attribute {name!r}")
