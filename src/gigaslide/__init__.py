"""gigaslide: representation learning and slide-level models for gigapixel whole-slide images."""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
