"""gigaslide.synth: synthetic H&E-like whole-slide images and labelled cohorts (demo and test data).

>>> from gigaslide.synth import make_cohort, write_synthetic_slide
>>> write_synthetic_slide("slide.tiff", width=2048, height=2048, mpp=0.5, seed=0)  # doctest: +SKIP
>>> labels = make_cohort("cohort", n_slides=24, signal="local")                    # doctest: +SKIP
"""

from gigaslide.synth.cohort import SIGNALS, make_cohort
from gigaslide.synth.tissue_content import TUMOR_PATTERNS, SlideLayout, make_layout
from gigaslide.synth.writer import default_n_levels, write_layout_tiff, write_synthetic_slide

__all__ = [
    "SIGNALS",
    "TUMOR_PATTERNS",
    "SlideLayout",
    "default_n_levels",
    "make_cohort",
    "make_layout",
    "write_layout_tiff",
    "write_synthetic_slide",
]
