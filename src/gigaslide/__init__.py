"""gigaslide: representation learning and slide-level models for gigapixel whole-slide images.

The most used entry points are importable from the top level (loaded lazily, so
``import gigaslide`` stays cheap)::

    import gigaslide as gs
    slide = gs.open_slide("slide.svs")
    result = gs.tile_slide(slide, target_mpp=0.5, tile_size=256)
    encoder = gs.create_encoder("resnet50_trunc", weights="/path/to/weights.pth")
    feats = gs.extract_features(slide, result.coords, result.spec, encoder)
    model = gs.create_slide_model("abmil", in_dim=1024, n_classes=2)
"""

from __future__ import annotations

from gigaslide._lazy import lazy_getattr

__version__ = "0.1.0"

# public name -> module that defines it
_LAZY: dict[str, str] = {
    "open_slide": "gigaslide.io",
    "list_backends": "gigaslide.io",
    "Slide": "gigaslide.io.base",
    "SlideReadError": "gigaslide.io.base",
    "MissingMPPError": "gigaslide.io.base",
    "TileSpec": "gigaslide.preprocess.tiling_spec",
    "detect_tissue": "gigaslide.preprocess.tissue",
    "TissueParams": "gigaslide.preprocess.tissue",
    "tile_slide": "gigaslide.preprocess.tiling",
    "tile_regions": "gigaslide.preprocess.tiling",
    "read_coords": "gigaslide.preprocess.coords_io",
    "write_coords": "gigaslide.preprocess.coords_io",
    "TileDataset": "gigaslide.data.tile_dataset",
    "read_features": "gigaslide.data.features_io",
    "write_features": "gigaslide.data.features_io",
    "create_encoder": "gigaslide.models.encoders",
    "list_encoders": "gigaslide.models.encoders",
    "create_slide_model": "gigaslide.models.slide",
    "list_slide_models": "gigaslide.models.slide",
    "extract_features": "gigaslide.pipeline.extract",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_getattr(__name__, _LAZY)


def __dir__() -> list[str]:
    return sorted(__all__)
