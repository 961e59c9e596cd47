"""gigaslide.train: training of slide-level models.

Submodules are imported explicitly (this package imports nothing on its own), e.g.
``from gigaslide.train.losses import NLLSurvLoss, CoxPHLoss, make_time_bins``.
"""
