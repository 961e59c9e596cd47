"""Slide-level aggregators over bags of tile features, built by name from a registry.

from gigaslide.models.slide import create_slide_model, list_slide_models
model = create_slide_model("gated_abmil", in_dim=1024, n_classes=2)
out = model(x, coords=None, mask=mask)  # SlideOutput(logits, embedding, attention, aux_loss)
out = model(**slide_inputs(model, batch))  # what harnesses do: the batch served by the model's input kind
"""

from __future__ import annotations

from gigaslide.models.slide import (  # noqa: F401  (registration)
    abmil,
    clam,
    dsmil,
    hipt,
    longvit,
    pooling,
    sparseconvmil,
    topk_mil,
    transmil,
)
from gigaslide.models.slide.abmil import ABMIL
from gigaslide.models.slide.base import (
    SlideModel,
    SlideOutput,
    masked_max,
    masked_mean,
    masked_softmax,
)
from gigaslide.models.slide.clam import CLAMSB
from gigaslide.models.slide.dsmil import DSMIL
from gigaslide.models.slide.hipt import HIPT, HIPTAttentionPooling
from gigaslide.models.slide.inputs import slide_inputs
from gigaslide.models.slide.longvit import LongViT
from gigaslide.models.slide.pooling import MaxPoolMIL, MeanPoolMIL
from gigaslide.models.slide.registry import (
    INPUT_KINDS,
    SlideModelInfo,
    create_slide_model,
    get_slide_model_info,
    list_slide_models,
    register_slide_model,
    slide_model_info,
)
from gigaslide.models.slide.sparseconvmil import SparseConvMIL
from gigaslide.models.slide.topk_mil import TopKMIL
from gigaslide.models.slide.transmil import TransMIL

__all__ = [
    "ABMIL",
    "CLAMSB",
    "DSMIL",
    "HIPT",
    "INPUT_KINDS",
    "HIPTAttentionPooling",
    "LongViT",
    "MaxPoolMIL",
    "MeanPoolMIL",
    "SlideModel",
    "SlideModelInfo",
    "SlideOutput",
    "SparseConvMIL",
    "TopKMIL",
    "TransMIL",
    "create_slide_model",
    "get_slide_model_info",
    "list_slide_models",
    "masked_max",
    "masked_mean",
    "masked_softmax",
    "register_slide_model",
    "slide_inputs",
    "slide_model_info",
]
