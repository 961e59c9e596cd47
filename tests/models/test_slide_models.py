"""Contract tests for every registered slide model, plus model-specific behaviour."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.slide import (
    SlideOutput,
    create_slide_model,
    get_slide_model_info,
    list_slide_models,
    masked_softmax,
    register_slide_model,
)
from gigaslide.models.slide.transmil import NystromAttention, iterative_pinv

D, C = 32, 3
# small widths keep the suite fast; TransMIL with dim 32 has 16 landmarks, so N=300 uses Nystrom
SMALL = {
    "abmil": {"hidden_dims": (24, 16)},
    "gated_abmil": {"hidden_dims": (24, 16)},
    "clam_sb": {"hidden_dims": (24, 16), "k_sample": 4},
    "transmil": {"dim": 32, "heads": 4},
    "dsmil": {"q_dim": 16},
    "mean": {"hidden_dim": 24},
    "feature_max": {"hidden_dim": 24},
    "topk_mil": {"hidden_dim": 24, "k": 2},
}
# the generic contract runs on bags of features; models of other input kinds test it in their own files
MODELS = [m for m in list_slide_models() if get_slide_model_info(m).input_kind == "features"]


def build(name: str, seed: int = 0, **kw: object) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_slide_model(name, in_dim=D, n_classes=C, **{**SMALL.get(name, {}), **kw})


def bag(b: int, n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, D, generator=g)
    coords = torch.randint(0, 10_000, (b, n, 2), generator=g)
    return x, coords


def test_registry_lists_all_required_models_with_metadata() -> None:
    assert {"mean", "feature_max", "topk_mil", "abmil", "gated_abmil", "clam_sb", "transmil", "dsmil"} <= set(
        MODELS
    )
    for name in MODELS:
        info = get_slide_model_info(name)
        assert info.name == name and info.description and info.paper
    assert get_slide_model_info("abmil").produces_attention
    assert not get_slide_model_info("transmil").produces_attention


def test_registry_errors_name_the_problem() -> None:
    with pytest.raises(KeyError, match=r"unknown slide model 'nope'.*abmil"):
        create_slide_model("nope", 8, 2)
    with pytest.raises(TypeError, match=r"'abmil' got unknown argument.*hidden_dim.*accepts: hidden_dims"):
        create_slide_model("abmil", 8, 2, hidden_dim=4)
    with pytest.raises(ValueError, match="already registered"):
        register_slide_model("abmil", description="d", paper="p", produces_attention=False)(lambda **k: None)


def test_registry_passes_kwargs_through_and_tags_model() -> None:
    model = create_slide_model("gated_abmil", 16, 2, hidden_dims=(8, 4), dropout=0.5)
    assert model.embed_dim == 8 and model.project[2].p == 0.5
    assert model.slide_model_info.name == "gated_abmil"
    assert create_slide_model("clam_sb", 16, 2).project[2].p == 0.25  # CLAM default dropout


@pytest.mark.parametrize("name", MODELS)
def test_forward_backward_shapes_and_gradients(name: str) -> None:
    model = build(name).train()
    x, coords = bag(3, 20)
    labels = torch.tensor([0, 1, 2])  # every class present: each CLAM instance classifier is trained
    out = model(x, coords=coords, labels=labels)
    assert isinstance(out, SlideOutput)
    assert out.logits.shape == (3, C)
    assert out.embedding.shape == (3, model.embed_dim)
    assert (out.attention is not None) == get_slide_model_info(name).produces_attention
    # the model's declared training streams (DS-MIL trains its max-instance stream too)
    loss = sum(w * F.cross_entropy(logits, labels) for w, logits in model.loss_streams(out))
    if out.aux_loss is not None:
        loss = loss + out.aux_loss
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{name}.{pname} received no gradient"
        assert torch.isfinite(p.grad).all(), f"{name}.{pname} has non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{name}.{pname} has an all-zero gradient"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("n", [1, 7, 300])
def test_variable_bag_sizes(name: str, n: int) -> None:
    model = build(name).eval()
    x, _ = bag(1, n, seed=n)
    with torch.no_grad():
        out = model(x, labels=torch.tensor([1]))
    assert out.logits.shape == (1, C) and torch.isfinite(out.logits).all()
    assert torch.isfinite(out.embedding).all()
    if out.attention is not None:
        assert out.attention.shape == (1, n)
        assert torch.allclose(out.attention.sum(1), torch.ones(1), atol=1e-5)
        assert (out.attention >= 0).all()


@pytest.mark.parametrize("name", MODELS)
def test_padding_with_mask_equals_unpadded_bags(name: str) -> None:
    """Two bags of different sizes padded (with NaN garbage, padding also in the middle) into one batch."""
    model = build(name).eval()
    x1, c1 = bag(1, 11, seed=3)
    x2, c2 = bag(1, 5, seed=4)
    n_pad = 14
    x = torch.full((2, n_pad, D), float("nan"))
    coords = torch.zeros(2, n_pad, 2, dtype=torch.long)
    mask = torch.zeros(2, n_pad, dtype=torch.bool)
    pos1 = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13])  # holes at 3, 7, 11
    pos2 = torch.arange(5)
    for i, (xi, ci, pos) in enumerate([(x1, c1, pos1), (x2, c2, pos2)]):
        x[i, pos], coords[i, pos], mask[i, pos] = xi[0], ci[0], True
    with torch.no_grad():
        padded = model(x, coords=coords, mask=mask)
        singles = [model(x1, coords=c1), model(x2, coords=c2)]
    assert torch.isfinite(padded.logits).all()
    for i, (single, pos) in enumerate(zip(singles, [pos1, pos2])):
        torch.testing.assert_close(padded.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(padded.embedding[i], single.embedding[0], atol=1e-5, rtol=1e-4)
        if single.attention is not None:
            torch.testing.assert_close(padded.attention[i, pos], single.attention[0], atol=1e-6, rtol=1e-5)
            holes = ~mask[i]
            assert (padded.attention[i, holes] == 0).all()
            assert torch.allclose(padded.attention[i].sum(), torch.tensor(1.0), atol=1e-6)


@pytest.mark.parametrize("name", MODELS)
def test_batch_equals_individual_bags(name: str) -> None:
    model = build(name).eval()
    x, coords = bag(3, 9, seed=5)
    with torch.no_grad():
        batched = model(x, coords=coords)
        for i in range(3):
            single = model(x[i : i + 1], coords=coords[i : i + 1])
            torch.testing.assert_close(batched.logits[i], single.logits[0], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", MODELS)
def test_deterministic_under_seed(name: str) -> None:
    x, _ = bag(2, 16, seed=6)
    outs = []
    for _ in range(2):
        model = build(name, seed=123).train()  # dropout active: the seed must fix it too
        torch.manual_seed(7)
        outs.append(model(x).logits)
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    other = build(name, seed=124).eval()(x).logits
    assert not torch.allclose(other, build(name, seed=123).eval()(x).logits)


@pytest.mark.parametrize("name", MODELS)
def test_input_validation_messages(name: str) -> None:
    model = build(name)
    with pytest.raises(ValueError, match=r"in_dim=32"):
        model(torch.randn(1, 4, D + 1))
    with pytest.raises(ValueError, match=r"\(B, N, D\)"):
        model(torch.randn(4, D))
    with pytest.raises(ValueError, match="no valid tile"):
        model(torch.randn(2, 4, D), mask=torch.tensor([[True] * 4, [False] * 4]))
    with pytest.raises(ValueError, match="mask must have shape"):
        model(torch.randn(1, 4, D), mask=torch.ones(1, 5, dtype=torch.bool))


def test_masked_softmax_zero_on_mask_and_matches_softmax_on_valid() -> None:
    scores = torch.tensor([[1.0, 2.0, 100.0, 3.0]])
    mask = torch.tensor([[True, True, False, True]])
    out = masked_softmax(scores, mask)
    assert out[0, 2] == 0
    torch.testing.assert_close(out[0, [0, 1, 3]], torch.softmax(torch.tensor([1.0, 2.0, 3.0]), 0))


def test_abmil_attention_formula() -> None:
    """a_k = softmax(w^T tanh(V h_k)) with h_k = ReLU(W x_k), z = sum a_k h_k."""
    model = build("abmil").eval()
    x, _ = bag(1, 6, seed=8)
    with torch.no_grad():
        out = model(x)
        h = torch.relu(model.project[0](x[0]))
        v, w = model.attention.V[0], model.attention.w
        a = torch.softmax(w(torch.tanh(v(h))).squeeze(-1), 0)
        gated = build("gated_abmil").eval()
        u, vg, wg = gated.attention.U[0], gated.attention.V[0], gated.attention.w
        hg = torch.relu(gated.project[0](x[0]))
        ag = torch.softmax(wg(torch.tanh(vg(hg)) * torch.sigmoid(u(hg))).squeeze(-1), 0)
        out_g = gated(x)
    torch.testing.assert_close(out.attention[0], a)
    torch.testing.assert_close(out.embedding[0], (a[:, None] * h).sum(0))
    torch.testing.assert_close(out_g.attention[0], ag)


def test_clam_instance_loss_with_and_without_labels() -> None:
    model = build("clam_sb").train()
    x, _ = bag(2, 30, seed=9)
    assert model(x).aux_loss is None
    out = model(x, labels=torch.tensor([0, 1]))
    inst = out.extras["instance_loss"]
    assert torch.isfinite(out.aux_loss) and out.aux_loss > 0
    torch.testing.assert_close(out.aux_loss, inst * 0.3 / 0.7)
    # a single-tile bag has no top/bottom pseudo-labels: zero instance loss, still differentiable
    single = model(x[:1, :1], labels=torch.tensor([0]))
    assert single.aux_loss == 0
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 2\]"):
        model(x, labels=torch.tensor([0, 3]))


def test_clam_instance_loss_matches_manual_top_bottom_k() -> None:
    model = build("clam_sb", k_sample=2).eval()
    x, _ = bag(1, 9, seed=10)
    with torch.no_grad():
        out = model(x, labels=torch.tensor([2]))
        h = model.project(x)[0]
        scores = model.attention(h)
        order = torch.argsort(scores, descending=True)
        inst = torch.cat([h[order[:2]], h[order[-2:]]])
        expected = F.cross_entropy(model.instance_classifiers[2](inst), torch.tensor([1, 1, 0, 0]))
    torch.testing.assert_close(out.extras["instance_loss"], expected)


def test_dsmil_predicts_from_the_bag_stream() -> None:
    model = build("dsmil").eval()
    x, _ = bag(2, 12, seed=11)
    with torch.no_grad():
        out = model(x)
        inst = model.instance_classifier(x)
        model.average_streams = True
        averaged = model(x).logits
    max_logits = inst.max(dim=1).values
    torch.testing.assert_close(out.extras["max_instance_logits"], max_logits)
    torch.testing.assert_close(out.logits, out.extras["bag_logits"])
    torch.testing.assert_close(averaged, 0.5 * (max_logits + out.extras["bag_logits"]))
    torch.testing.assert_close(out.extras["class_attention"].sum(1), torch.ones(2, C))


def test_iterative_pinv_matches_linalg_pinv() -> None:
    g = torch.Generator().manual_seed(12)
    a = torch.softmax(4 * torch.eye(8) + 0.5 * torch.randn(2, 8, 8, generator=g), dim=-1)
    torch.testing.assert_close(iterative_pinv(a, 6), torch.linalg.pinv(a), atol=1e-4, rtol=1e-3)


def test_nystrom_attention_approximates_exact_attention() -> None:
    torch.manual_seed(13)
    approx = NystromAttention(32, heads=4, num_landmarks=32, dropout=0.0).eval()
    exact = NystromAttention(32, heads=4, num_landmarks=32, dropout=0.0, mode="full").eval()
    exact.load_state_dict(approx.state_dict())
    x = torch.randn(1, 65, 32)  # longer than num_landmarks: the Nystrom path runs
    short = torch.randn(1, 20, 32)  # not longer: exact attention by construction
    with torch.no_grad():
        err = (approx(x) - exact(x)).abs().mean()
        scale = exact(x).abs().mean()
        torch.testing.assert_close(approx(short), exact(short))
    assert 0 < err < 0.1 * scale
    with pytest.raises(ValueError, match="must be one of"):
        NystromAttention(32, heads=4, mode="sparse")


def test_transmil_squares_sequence() -> None:
    """With n tokens the grid side is ceil(sqrt(n)); PPEG receives exactly side*side tokens."""
    model = build("transmil").eval()
    seen: list[int] = []
    model.ppeg.register_forward_hook(lambda m, args, out: seen.append(args[1]))
    for n in (1, 2, 5, 9, 10):
        with torch.no_grad():
            model(torch.randn(1, n, D))
    assert seen == [math.ceil(math.sqrt(n)) for n in (1, 2, 5, 9, 10)]


@pytest.mark.parametrize("name", MODELS)
def test_n_classes_zero_gives_an_embedding_only_model(name: str) -> None:
    """As timm's num_classes=0: logits (B, 0), the same trunk as the classifier model, no head weights."""
    torch.manual_seed(0)
    model = create_slide_model(name, in_dim=D, n_classes=0, **SMALL.get(name, {})).eval()
    x, coords = bag(3, 12, seed=9)
    with torch.no_grad():
        out = model(x, coords=coords)
    assert out.logits.shape == (3, 0) and out.embedding.shape == (3, model.embed_dim)
    assert torch.isfinite(out.embedding).all() and model.n_classes == 0
    full = build(name).eval()
    sd0, sd = model.state_dict(), full.state_dict()
    if all(k in sd and sd[k].shape == v.shape for k, v in sd0.items()):
        assert not any(k.startswith("classifier.") for k in sd0)  # the head is dropped
        model.load_state_dict({k: sd[k] for k in sd0})  # the classifier model's trunk, strictly
        with torch.no_grad():
            torch.testing.assert_close(model(x, coords=coords).embedding, full(x, coords=coords).embedding)
    else:  # instance-level models keep one tile-scoring stream to select tiles (documented per model)
        assert name in ("dsmil", "topk_mil")
    model.train()
    model(x, coords=coords).embedding.pow(2).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    with pytest.raises(ValueError, match="n_classes must be >= 0"):
        create_slide_model(name, in_dim=D, n_classes=-1)
