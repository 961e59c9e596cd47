"""predict() keeps SlideOutput.embedding; an embedding-only model (n_classes=0) predicts embeddings only."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.data.bags import BagDataset, collate_bags
from gigaslide.data.cohort import Cohort
from gigaslide.models.slide import create_slide_model
from gigaslide.train.mil import predict


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_predict_returns_the_models_embeddings(tmp_path: Path, feature_cohort) -> None:
    cohort = Cohort(feature_cohort(tmp_path, n_cases=4), tmp_path)
    bags = BagDataset(cohort, cohort.samples())
    for n_classes in (2, 0):
        torch.manual_seed(0)
        model = create_slide_model("gated_abmil", cohort.dim, n_classes, hidden_dims=(12, 6)).eval()
        pred = predict(model, bags, "cpu")
        assert pred.embeddings.shape == (len(bags), 12) and pred.logits.shape == (len(bags), n_classes)
        with torch.no_grad():
            want = np.concatenate(
                [model(collate_bags([bags[i]]).x).embedding.numpy() for i in range(len(bags))]
            )
        np.testing.assert_allclose(pred.embeddings, want, rtol=1e-6, atol=1e-7)
        assert (pred.probs is None) == (n_classes == 0) and pred.risk is None
        assert set(pred.attention) == set(cohort.slide_ids)  # attention still split per slide
