"""SparseConvMIL: ResNet-18 layer4 fidelity, invariances, padding, n_classes=0, layer4 initialisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.slide import create_slide_model, get_slide_model_info
from gigaslide.models.slide.sparseconvmil import SparseConvMIL
from gigaslide.models.weights import WeightsMismatchError

torch.set_num_threads(1)
D = 16
SMALL = {"width": 24}


def build(n_classes: int = 3, seed: int = 0, **kw: object) -> SparseConvMIL:
    torch.manual_seed(seed)
    model = create_slide_model("sparseconvmil", in_dim=D, n_classes=n_classes, **{**SMALL, **kw})
    _randomise_bn(model)
    return model.eval()


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval-mode BN is not the identity."""
    g = torch.Generator().manual_seed(99)
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean.copy_(0.2 * torch.randn(n, generator=g))
            m.running_var.copy_(0.5 + torch.rand(n, generator=g))
            m.weight.data.copy_(1 + 0.1 * torch.randn(n, generator=g))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=g))


def grid_bag(n: int, seed: int, side: int = 12, unit: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """One bag of n tiles on distinct cells of a side x side grid; coords (x, y) in multiples of ``unit``."""
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(side * side, generator=g)[:n]
    coords = torch.stack([flat % side, flat // side], dim=1).double() * unit
    return torch.randn(1, n, D, generator=g), coords[None]


def test_registry_entry() -> None:
    info = get_slide_model_info("sparseconvmil")
    assert info.input_kind == "features_coords" and info.needs_coords and not info.produces_attention
    model = build()
    assert model.embed_dim == 24
    with pytest.raises(ValueError, match="needs tile coordinates"):
        model(torch.randn(1, 4, D))
    with pytest.raises(ValueError, match="grid_unit must be positive"):
        create_slide_model("sparseconvmil", in_dim=D, n_classes=0, grid_unit=0)


def test_fully_active_map_equals_torchvision_layer4(tmp_path) -> None:
    """On a dense grid the sparse stage IS ResNet-18's layer4, loaded from a full ResNet-18 checkpoint."""
    from torchvision.models import resnet18

    torch.manual_seed(1)
    resnet = resnet18(weights=None).eval()
    _randomise_bn(resnet)
    path = tmp_path / "resnet18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in resnet.state_dict().items()}}, path)
    model = SparseConvMIL(256, 0, layer4_weights=path).eval()
    assert model.layer4_info is not None and model.layer4_info["n_tensors"] > 0
    side = 6
    dense = torch.randn(1, 256, side, side)
    ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    coords = torch.stack([xs.flatten(), ys.flatten()], 1)[None] * 512  # level-0 px, stride 512
    x = dense[0].flatten(1).t()[None]  # (1, 36, 256) in row-major (y, x) order
    model.grid_unit = 512.0
    with torch.no_grad():
        out = model(x, coords=coords)
        expected = resnet.avgpool(resnet.layer4(dense)).flatten(1)
    assert out.logits.shape == (1, 0)
    torch.testing.assert_close(out.embedding, expected, rtol=1e-4, atol=1e-5)


def test_layer4_weights_mismatch_is_an_error(tmp_path) -> None:
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    with pytest.raises(WeightsMismatchError, match="shape mismatches"):
        SparseConvMIL(D, 0, width=24, layer4_weights=path)


def test_invariant_to_tile_order_and_whole_cell_translation_not_to_rearrangement() -> None:
    model = build(grid_unit=224.0)
    x, coords = grid_bag(40, seed=2, unit=224.0)
    with torch.no_grad():
        ref = model(x, coords=coords).embedding
        perm = torch.randperm(40, generator=torch.Generator().manual_seed(3))
        permuted = model(x[:, perm], coords=coords[:, perm]).embedding
        shifted = model(x, coords=coords + torch.tensor([5 * 224.0, -3 * 224.0])).embedding
        # same tiles, same set of positions, but tiles swapped between positions
        rearranged = model(x, coords=coords[:, perm]).embedding
    torch.testing.assert_close(permuted, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shifted, ref, rtol=1e-5, atol=1e-6)
    assert (rearranged - ref).abs().max() > 1e-3


def test_tiles_on_one_cell_are_averaged() -> None:
    model = build()
    x, coords = grid_bag(10, seed=4)
    dup_x = torch.cat([x, x[:, :1] + 1.0], dim=1)  # an 11th tile on the cell of tile 0
    dup_c = torch.cat([coords, coords[:, :1] + 0.5], dim=1)  # same cell (floor), x-offset half a cell
    merged = x.clone()
    merged[:, 0] = x[:, 0] + 0.5
    with torch.no_grad():
        torch.testing.assert_close(
            model(dup_x, coords=dup_c).embedding, model(merged, coords=coords).embedding
        )


@pytest.mark.parametrize("n", [1, 7, 300])
def test_variable_tile_counts(n: int) -> None:
    model = build()
    x, coords = grid_bag(n, seed=n, side=20)
    with torch.no_grad():
        out = model(x, coords=coords)
    assert out.logits.shape == (1, 3) and out.embedding.shape == (1, 24)
    assert torch.isfinite(out.logits).all() and torch.isfinite(out.embedding).all()


def test_padding_with_mask_equals_single_bags() -> None:
    model = build()
    (x1, c1), (x2, c2) = grid_bag(11, seed=5), grid_bag(5, seed=6)
    x = torch.full((2, 14, D), float("nan"))
    coords = torch.full((2, 14, 2), -1e6, dtype=torch.float64)  # garbage coords on padding
    mask = torch.zeros(2, 14, dtype=torch.bool)
    pos1 = torch.tensor([0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13])
    pos2 = torch.arange(5)
    for i, (xi, ci, pos) in enumerate([(x1, c1, pos1), (x2, c2, pos2)]):
        x[i, pos], coords[i, pos], mask[i, pos] = xi[0], ci[0], True
    with torch.no_grad():
        padded = model(x, coords=coords, mask=mask)
        singles = [model(x1, coords=c1), model(x2, coords=c2)]
    for i, single in enumerate(singles):
        torch.testing.assert_close(padded.logits[i], single.logits[0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(padded.embedding[i], single.embedding[0], rtol=1e-4, atol=1e-5)


def test_training_gradients_reach_every_parameter_and_seed_determinism() -> None:
    outs = []
    for _ in range(2):
        model = build(seed=7).train()
        xs, cs = zip(*(grid_bag(9, seed=s) for s in (8, 9)))
        x, coords = torch.cat(xs), torch.cat(cs)
        out = model(x, coords=coords)
        F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
        for name, p in model.named_parameters():
            assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
        outs.append(out.logits.detach())
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)


@pytest.mark.parametrize("name", ["sparseconvmil", "mean", "abmil"])
def test_embedding_only_with_zero_classes(name: str) -> None:
    """The Giga-SSL aggregators and their ablations (mean pooling, attention MIL) with n_classes=0."""
    torch.manual_seed(10)
    model = create_slide_model(name, in_dim=D, n_classes=0).eval()
    x, coords = grid_bag(6, seed=11)
    with torch.no_grad():
        out = model(x.expand(2, -1, -1), coords=coords.expand(2, -1, -1))
    assert out.logits.shape == (2, 0)
    assert out.embedding.shape == (2, model.embed_dim) and torch.isfinite(out.embedding).all()


@pytest.mark.parametrize("algorithm", ["scatter", "gather"])
def test_runs_under_autocast_close_to_fp32(algorithm: str) -> None:
    """Mixed precision (here CPU bf16 autocast; CUDA fp16/bf16 take the same path): matmuls in half
    precision, sums and batch norm in float32."""
    model = build(n_classes=2)
    for m in model.modules():
        if hasattr(m, "algorithm"):
            m.algorithm = algorithm
    x, coords = grid_bag(50, seed=12)
    with torch.no_grad():
        ref = model(x, coords=coords).embedding
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, coords=coords)
    assert out.embedding.dtype == torch.float32
    torch.testing.assert_close(out.embedding, ref, rtol=0.05, atol=0.05)
