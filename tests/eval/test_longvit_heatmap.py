"""LongViT relevance heatmaps: gradient x input per patch, placed on the slide."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.data.slide_images import SlideImageDataset, normalize_images, prepare_slide_images
from gigaslide.eval.heatmap import render_heatmap
from gigaslide.eval.longvit_heatmap import longvit_relevance, relevance_tile_scores
from gigaslide.io.registry import open_slide
from gigaslide.models.slide import create_slide_model
from gigaslide.preprocess.slide_image import SlideImageSpec
from gigaslide.synth import write_synthetic_slide

torch.set_num_threads(1)
TINY = dict(img_size=128, embed_dim=16, depth=1, num_heads=2, segment_lengths=(4, 16), dilated_ratios=(1, 2))


def _model(n_classes=2):
    torch.manual_seed(0)
    return create_slide_model("longvit", in_dim=3, n_classes=n_classes, **TINY)


def test_relevance_is_gradient_times_input_of_the_target_logit():
    model = _model()
    x = torch.randn(1, 3, 128, 128)
    rel = longvit_relevance(model, x, target=1)
    assert rel.shape == (4, 4)
    tokens = model.tokens(x).detach().requires_grad_(True)
    logit = model.head(model.pool(model.encoder(tokens)))[0, 1]
    (g,) = torch.autograd.grad(logit, tokens)
    np.testing.assert_allclose(rel.ravel(), (g * tokens).sum(-1)[0].detach().numpy(), rtol=1e-5, atol=1e-7)
    assert model.training  # the model's mode is restored
    with pytest.raises(ValueError, match="target class 5"):
        longvit_relevance(model, x, target=5)


def test_masked_tokens_get_zero_and_embedding_models_work():
    model = _model(n_classes=0)
    x = torch.randn(1, 3, 128, 128)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 0] = False
    rel = longvit_relevance(model, x, mask=mask, absolute=True)
    assert (rel[0] == 0).all() and (rel[1:] > 0).all()


def test_heatmap_on_a_rendered_slide(tmp_path):
    slide_path = write_synthetic_slide(tmp_path / "s.tiff", width=1024, height=768, mpp=0.5, seed=1)
    report = prepare_slide_images([slide_path], SlideImageSpec(target_size=128), tmp_path / "c")
    ds = SlideImageDataset(report.images)
    item, image = ds[0], ds.image(0)
    rel = longvit_relevance(_model(), normalize_images(item["image"][None]), mask=item["token_mask"][None])
    scores = relevance_tile_scores(image, rel, only_tissue=True)
    assert len(scores.scores) == int(image.token_mask.sum())
    x0, y0, x1, y1 = image.box
    assert (scores.coords[:, 0] >= x0 - 1).all() and (scores.coords[:, 0] < x1).all()
    assert (scores.coords[:, 1] >= y0 - 1).all() and (scores.coords[:, 1] < y1).all()
    with open_slide(slide_path) as slide:
        out = render_heatmap(
            slide, scores.coords, scores.scores, scores.tile_size_level0, tmp_path / "h.png", max_size=256
        )
    assert out.exists() and out.stat().st_size > 1000
    with pytest.raises(ValueError, match="does not match the image's token grid"):
        relevance_tile_scores(image, rel[:2])
