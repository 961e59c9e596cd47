"""Top-k instance MIL (Campanella et al. 2019) by hand, and the honest name of feature-wise max pooling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.data.cohort import Sample
from gigaslide.models.slide import create_slide_model, get_slide_model_info
from gigaslide.models.slide.pooling import MaxPoolMIL
from gigaslide.train.config import TrainConfig
from gigaslide.train.mil import Objective

X = np.array([[0.0, 1.0], [3.0, 0.0], [1.0, 1.0], [-2.0, 0.5], [2.0, 2.0]])  # (N=5, D=2)
W = np.array([[0.0, 0.0], [1.0, -0.5]])  # tile logits: class 0 -> 0, class 1 -> x0 - 0.5 x1
B = np.array([0.0, 0.2])


def _model(k: int) -> torch.nn.Module:
    model = create_slide_model("topk_mil", 2, 2, k=k).eval()
    with torch.no_grad():
        model.classifier.weight.copy_(torch.tensor(W, dtype=torch.float32))
        model.classifier.bias.copy_(torch.tensor(B, dtype=torch.float32))
    return model


@pytest.mark.parametrize("k", [1, 2, 3])
def test_slide_prediction_from_the_top_k_tiles(k: int) -> None:
    tile_logits = X @ W.T + B  # (N, C)
    p1 = 1 / (1 + np.exp(-(tile_logits[:, 1] - tile_logits[:, 0])))  # positive-class probability
    order = np.argsort(-p1)  # tiles 1, 4, 2, 0, 3
    assert order.tolist() == [1, 4, 2, 0, 3]
    with torch.no_grad():
        out = _model(k)(torch.tensor(X, dtype=torch.float32).unsqueeze(0))
    np.testing.assert_allclose(out.logits[0].numpy(), tile_logits[order[:k]].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out.attention[0].numpy(), p1 / p1.sum(), rtol=1e-6)  # heatmap = tile scores
    # training: each top tile is an instance with the slide label (mean of the k tile losses)
    y = 0
    expected = np.mean([np.log(np.exp(tile_logits[i]).sum()) - tile_logits[i, y] for i in order[:k]])
    loss = Objective(TrainConfig(), None, _model(k)).bag_loss(out, [Sample("s", "c", ("s",), label=y)])
    assert abs(float(loss) - expected) < 1e-5


def test_padding_never_selected_and_short_bags() -> None:
    model = _model(3)
    x = torch.zeros(2, 5, 2)
    x[0] = torch.tensor(X, dtype=torch.float32)
    x[1, :2] = torch.tensor(X[[0, 3]], dtype=torch.float32)
    x[1, 2:] = 100.0  # padding that would win the ranking
    mask = torch.tensor([[True] * 5, [True, True, False, False, False]])
    with torch.no_grad():
        out = model(x, mask=mask)
        single = model(x[1:, :2])
    torch.testing.assert_close(out.logits[1], single.logits[0])  # mean of its 2 tiles, not of 3
    assert float(out.attention[1, 2:].abs().sum()) == 0.0


def test_feature_max_is_the_honest_name_and_max_warns() -> None:
    info = get_slide_model_info("feature_max")
    assert "Campanella" not in info.paper and "topk_mil" in info.paper
    assert "Campanella" in get_slide_model_info("topk_mil").paper
    with pytest.warns(FutureWarning, match="'max' is deprecated, use 'feature_max'.*topk_mil"):
        model = create_slide_model("max", 4, 2)
    assert isinstance(model, MaxPoolMIL)


def test_topk_mil_learns_a_few_signal_tiles(tmp_path) -> None:
    import pandas as pd

    from gigaslide.data.bags import BagDataset
    from gigaslide.data.cohort import Cohort
    from gigaslide.data.features_io import write_features
    from gigaslide.eval.metrics import classification_metrics
    from gigaslide.train.mil import predict, train_model

    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(60):  # positives hold 2 tiles shifted by 3 in dimension 0 among 20-30
        n = int(rng.integers(20, 30))
        feats = rng.normal(size=(n, 8)).astype(np.float32)
        feats[:2, 0] += 3.0 * (i % 2)
        write_features(tmp_path / "h5_files" / f"s{i:02d}.h5", feats, np.zeros((n, 2)))
        rows.append({"slide_id": f"s{i:02d}", "case_id": f"c{i:02d}", "label": ["neg", "pos"][i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    cohort = Cohort(tmp_path / "labels.csv", tmp_path)
    s = cohort.samples()
    torch.manual_seed(0)
    model = create_slide_model("topk_mil", 8, 2)
    cfg = TrainConfig(epochs=10, lr=1e-2, warmup_epochs=0)
    train_model(model, BagDataset(cohort, s[:40], train=True), None, cfg, "cpu")
    pred = predict(model, BagDataset(cohort, s[40:]), "cpu")
    auc = classification_metrics([x.label for x in pred.samples], pred.probs)["auc"]
    assert auc > 0.9, f"top-k MIL test AUC {auc:.3f}"
    pos = next(x for x in pred.samples if x.label == 1)
    assert int(np.argmax(pred.attention[pos.slide_ids[0]]["scores"])) < 2  # the heatmap finds them
