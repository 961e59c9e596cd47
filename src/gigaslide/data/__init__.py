"""gigaslide.data: tile datasets, feature files, cohorts and splits.

Submodules are imported on first use (``from gigaslide.data import TileDataset`` works) so that
importing the package stays cheap.
"""

from __future__ import annotations

from gigaslide._lazy import lazy_getattr

_LAZY = {
    "TileDataset": "gigaslide.data.tile_dataset",
    "TileLoader": "gigaslide.data.tile_loader",
    "SlideEmbeddings": "gigaslide.data.embeddings",
    "load_slide_embeddings": "gigaslide.data.embeddings",
    "read_embeddings": "gigaslide.data.embeddings",
    "write_embeddings": "gigaslide.data.embeddings",
    "read_features": "gigaslide.data.features_io",
    "write_features": "gigaslide.data.features_io",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_getattr(__name__, _LAZY)
