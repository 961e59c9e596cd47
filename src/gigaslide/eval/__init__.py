"""gigaslide.eval: metrics (sklearn/lifelines-equal), bootstrap CIs, KNN/linear probes, reports.

Submodules are imported explicitly (``from gigaslide.eval.metrics import roc_auc``) to keep this light.
"""
