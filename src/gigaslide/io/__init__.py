"""Reading whole-slide images: :func:`open_slide` and the reader backends behind it.

>>> from gigaslide.io import open_slide
>>> with open_slide("slide.svs") as slide:                     # doctest: +SKIP
...     tile = slide.read_region((1024, 2048), 0, (256, 256))  # (256, 256, 3) uint8 RGB

Backends (automatic choice in this order): ``tiff-direct`` (direct JPEG-tile decoding of
tiled TIFF/SVS), ``cucim`` (only when installed), ``openslide``, ``tiffslide``, ``image``
(PNG/JPEG/plain TIFF).
"""

from gigaslide.io.base import BACKGROUND, MissingMPPError, Slide, SlideReadError, composite_on_white
from gigaslide.io.registry import (
    BackendUnavailableError,
    available_backends,
    backend_unavailable_reason,
    list_backends,
    open_slide,
    register_backend,
    unregister_backend,
)

__all__ = [
    "BACKGROUND",
    "BackendUnavailableError",
    "MissingMPPError",
    "Slide",
    "SlideReadError",
    "available_backends",
    "backend_unavailable_reason",
    "composite_on_white",
    "list_backends",
    "open_slide",
    "register_backend",
    "unregister_backend",
]
