"""gigaslide.experiments: experiment runners above ``train`` and ``eval`` (cross-validation, reports).

``train`` knows nothing of folds and ``eval`` only scores; this layer builds models, trains each
fold, selects checkpoints and writes the reports.
"""
