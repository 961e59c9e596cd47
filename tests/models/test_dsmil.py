"""DS-MIL computed by hand: critical instance, bag stream, and the reference training loss."""

from __future__ import annotations

import math

import numpy as np
import torch

from gigaslide.data.cohort import Sample
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig
from gigaslide.train.mil import Objective


def _model() -> torch.nn.Module:
    """D=3, C=2, linear query of width 2, every weight set by hand."""
    model = create_slide_model("dsmil", 3, 2, q_dim=2, nonlinear_q=False).eval()
    with torch.no_grad():
        model.instance_classifier.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, -1.0, 0.5]]))
        model.instance_classifier.bias.copy_(torch.tensor([0.1, -0.2]))
        model.q.weight.copy_(torch.tensor([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]]))
        model.q.bias.copy_(torch.tensor([0.0, 0.3]))
        model.bag_classifier.weight.copy_(torch.arange(12, dtype=torch.float32).reshape(2, 2, 3) / 10 - 0.5)
        model.bag_classifier.bias.copy_(torch.tensor([0.05, -0.05]))
    return model


X = np.array([[2.0, 0.0, 1.0], [-1.0, 1.0, 0.0], [0.5, -2.0, 1.0], [0.0, 0.5, -1.0]])  # (N=4, D=3)


def _by_hand(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(critical tile per class, max-instance logits, bag logits) from the DS-MIL formulas."""
    w_i, b_i = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.5]]), np.array([0.1, -0.2])
    inst = x @ w_i.T + b_i  # (N, C)
    critical = inst.argmax(axis=0)  # the highest-scoring tile of each class
    q = x @ np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -1.0]]).T + np.array([0.0, 0.3])  # (N, 2)
    scores = q @ q[critical].T / math.sqrt(2)  # (N, C)
    attn = np.exp(scores - scores.max(axis=0)) / np.exp(scores - scores.max(axis=0)).sum(axis=0)
    bag = attn.T @ x  # (C, D)
    w_b = np.arange(12, dtype=np.float64).reshape(2, 2, 3) / 10 - 0.5
    bag_logits = np.einsum("ocd,cd->o", w_b, bag) + np.array([0.05, -0.05])
    return critical, inst.max(axis=0), bag_logits


def test_bag_stream_by_hand() -> None:
    critical, max_logits, bag_logits = _by_hand(X)
    inst = X @ np.array([[1.0, 0.0, 0.0], [0.0, -1.0, 0.5]]).T
    assert critical.tolist() == [0, 2] and inst.argmin(axis=0).tolist() != critical.tolist()
    with torch.no_grad():
        out = _model()(torch.tensor(X, dtype=torch.float32).unsqueeze(0))
    np.testing.assert_allclose(out.extras["max_instance_logits"][0].numpy(), max_logits, rtol=1e-5)
    np.testing.assert_allclose(out.extras["bag_logits"][0].numpy(), bag_logits, rtol=1e-5)
    np.testing.assert_allclose(out.logits[0].numpy(), bag_logits, rtol=1e-5)  # predicts from the bag stream


def test_training_loss_is_half_bce_bag_plus_half_bce_max() -> None:
    model = _model()
    with torch.no_grad():
        out = model(torch.tensor(X, dtype=torch.float32).unsqueeze(0))
    _, max_logits, bag_logits = _by_hand(X)
    y = np.array([0.0, 1.0])  # class 1 as a one-hot target

    def bce(z: np.ndarray) -> float:
        p = 1 / (1 + np.exp(-z))
        return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())

    expected = 0.5 * bce(bag_logits) + 0.5 * bce(max_logits)
    objective = Objective(TrainConfig(), None, model)
    loss = objective.bag_loss(out, [Sample("s", "c", ("s",), label=1)])
    assert float(loss) == np.float32(expected) or abs(float(loss) - expected) < 1e-6
    # a model without a declared recipe keeps cross-entropy on its logits
    plain = Objective(TrainConfig(), None).bag_loss(out, [Sample("s", "c", ("s",), label=1)])
    z = bag_logits
    assert abs(float(plain) - (np.log(np.exp(z).sum()) - z[1])) < 1e-6


def test_predict_gives_per_class_sigmoids_like_the_reference(tmp_path, feature_cohort) -> None:
    from gigaslide.data.bags import BagDataset
    from gigaslide.data.cohort import Cohort
    from gigaslide.train.mil import predict

    labels = feature_cohort(tmp_path, n_cases=4)
    cohort = Cohort(labels, tmp_path, "classification")
    torch.manual_seed(0)
    model = create_slide_model("dsmil", cohort.dim, 2)
    pred = predict(model, BagDataset(cohort, cohort.samples()), "cpu")
    # the reference predicts sigmoid(bag logits) per class (BCE training), not a softmax over classes
    np.testing.assert_allclose(pred.probs, 1 / (1 + np.exp(-pred.logits)), rtol=1e-6)
    assert not np.allclose(pred.probs.sum(axis=1), 1.0)
