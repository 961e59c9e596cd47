"""gigaslide.synth: synthetic H&E-like whole-slide images and labelled cohorts (demo and test data)."""

from gigaslide.synth.tissue_content import SlideLayout, make_layout
from gigaslide.synth.writer import default_n_levels, write_layout_tiff, write_synthetic_slide

__all__ = ["SlideLayout", "default_n_levels", "make_layout", "write_layout_tiff", "write_synthetic_slide"]
