"""Sparse convolution equals dense conv2d on the densified map at the output sites (values and gradients)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.layers.sparse_conv import (
    SparseBatchNorm,
    SparseConv2d,
    SparseMap,
    SparseReLU,
    build_rules,
    sparse_add,
    sparse_global_avg_pool,
)

torch.set_num_threads(1)
H, W = 13, 11


def random_map(b: int, n: int, c: int, seed: int, lo: int = -3) -> SparseMap:
    """b maps with n distinct random sites each in [lo, lo+H) x [lo, lo+W), random features."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(b):
        flat = torch.randperm(H * W, generator=g)[:n]
        rows.append(torch.stack([torch.full((n,), i), flat // W + lo, flat % W + lo], dim=1))
    coords = torch.cat(rows)
    feats = torch.randn(coords.shape[0], c, generator=g, dtype=torch.float64)
    return SparseMap(feats, coords, b)


def dense_at(dense: torch.Tensor, coords: torch.Tensor, origin: tuple[int, int]) -> torch.Tensor:
    """Rows (M, C) of a (B, C, H, W) dense map at (batch, y, x) sites relative to ``origin``."""
    return dense[coords[:, 0], :, coords[:, 1] - origin[0], coords[:, 2] - origin[1]]


@pytest.mark.parametrize(
    ("kernel", "stride", "padding"), [(3, 1, 1), (1, 1, 0), (5, 1, 2), (3, 2, 1), (1, 2, 0), (2, 2, 0)]
)
@pytest.mark.parametrize(("bias", "algorithm"), [(False, "gather"), (True, "gather"), (True, "scatter")])
def test_equals_dense_conv2d_at_output_sites_with_gradients(
    kernel: int, stride: int, padding: int, bias: bool, algorithm: str
) -> None:
    torch.manual_seed(0)
    sparse = random_map(2, 40, 4, seed=kernel * 10 + stride)
    conv = SparseConv2d(4, 6, kernel, stride, padding, bias=bias, algorithm=algorithm).double()
    feats = sparse.features.clone().requires_grad_(True)
    out = conv(sparse.replace(feats))
    # dense reference on a window starting at a multiple of the stride, so output (oy, ox) <-> input oy*s
    origin = (-3, -3)  # lo of random_map; -3 is not a multiple of 2: shift the origin down to -4
    origin = (origin[0] - origin[0] % stride, origin[1] - origin[1] % stride)
    size = (H + 4, W + 4)
    dense_in = sparse.replace(feats).to_dense(origin, size)
    dense_out = F.conv2d(dense_in, conv.weight, conv.bias, stride=stride, padding=padding)
    out_origin = (origin[0] // stride, origin[1] // stride)
    expected = dense_at(dense_out, out.coords, out_origin)
    torch.testing.assert_close(out.features, expected, rtol=1e-10, atol=1e-10)
    if stride == 1:
        assert torch.equal(out.coords, sparse.coords)  # submanifold: same sites, same order
    else:
        down = torch.cat(
            [sparse.coords[:, :1], torch.div(sparse.coords[:, 1:], stride, rounding_mode="floor")], 1
        )
        assert set(map(tuple, out.coords.tolist())) == set(map(tuple, down.tolist()))
        assert len(out.coords) == len(set(map(tuple, out.coords.tolist())))
    # gradients: the same upstream gradient on the output sites, through both paths
    g = torch.randn_like(out.features)
    (gs_feats, gs_w) = torch.autograd.grad((out.features * g).sum(), [feats, conv.weight])
    feats2 = sparse.features.clone().requires_grad_(True)
    w2 = conv.weight.detach().clone().requires_grad_(True)
    dense2 = F.conv2d(
        sparse.replace(feats2).to_dense(origin, size), w2, conv.bias, stride=stride, padding=padding
    )
    (gd_feats, gd_w) = torch.autograd.grad((dense_at(dense2, out.coords, out_origin) * g).sum(), [feats2, w2])
    torch.testing.assert_close(gs_feats, gd_feats, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gs_w, gd_w, rtol=1e-10, atol=1e-10)


def test_duplicates_are_averaged_into_one_site() -> None:
    feats = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 5.0], [7.0, 0.0]])
    coords = torch.tensor([[0, 2, 3], [0, 2, 3], [1, 2, 3], [0, -1, 4]])
    m = SparseMap.from_points(feats, coords, batch_size=2)
    assert m.coords.shape == (3, 3)
    got = {tuple(c): f.tolist() for c, f in zip(m.coords.tolist(), m.features)}
    assert got == {(0, 2, 3): [2.0, 4.0], (1, 2, 3): [5.0, 5.0], (0, -1, 4): [7.0, 0.0]}
    with pytest.raises(ValueError, match=r"batch indices must lie in \[0, 2\)"):
        SparseMap.from_points(feats, coords + torch.tensor([1, 0, 0]), batch_size=2)


def test_rules_are_cached_and_shared_by_derived_maps() -> None:
    sparse = random_map(1, 30, 4, seed=3)
    rules = build_rules(sparse, 3, 1, 1)
    assert build_rules(sparse.replace(sparse.features * 2), 3, 1, 1) is rules
    # centre offset of a submanifold conv pairs every site with itself
    rows_in, rows_out = rules[2][4]
    assert torch.equal(rows_in, rows_out) and rows_in.numel() == 30
    table = rules[1]
    assert table.shape == (30, 9) and torch.equal(table[:, 4], torch.arange(30))
    assert ((table == 30).sum(1) < 9).all()  # 30 marks an inactive neighbour
    with pytest.raises(ValueError, match="algorithm must be one of"):
        SparseConv2d(4, 4, algorithm="dense")


def test_batch_norm_relu_pool_and_add() -> None:
    sparse = random_map(3, 20, 5, seed=4)
    sparse = sparse.replace(sparse.features.float())
    bn = SparseBatchNorm(5).train()
    out = bn(sparse)
    torch.testing.assert_close(out.features.mean(0), torch.zeros(5), atol=1e-5, rtol=0)
    assert set(bn.state_dict()) == set(torch.nn.BatchNorm2d(5).state_dict())
    relu = SparseReLU()(out)
    assert (relu.features >= 0).all() and torch.equal(relu.features, out.features.clamp_min(0))
    pooled = sparse_global_avg_pool(sparse)
    for b in range(3):
        torch.testing.assert_close(pooled[b], sparse.features[sparse.coords[:, 0] == b].mean(0))
    empty_map = SparseMap(sparse.features[:20], sparse.coords[:20], batch_size=2)  # map 1 has no site
    assert torch.equal(sparse_global_avg_pool(empty_map)[1], torch.zeros(5))
    torch.testing.assert_close(sparse_add(sparse, sparse).features, 2 * sparse.features)
    other = SparseMap(sparse.features, sparse.coords.flip(0), 3)
    with pytest.raises(ValueError, match="same sites"):
        sparse_add(sparse, other)


def test_channel_mismatch_and_bad_points_raise() -> None:
    sparse = random_map(1, 5, 4, seed=5)
    with pytest.raises(ValueError, match="expects 3 channels, got 4"):
        SparseConv2d(3, 2)(sparse)
    with pytest.raises(ValueError, match=r"features \(P, C\) and coords \(P, 3\)"):
        SparseMap.from_points(torch.zeros(4, 2), torch.zeros(4, 2, dtype=torch.long), 1)


def test_thousands_of_sites_match_dense() -> None:
    """A realistic size: 4000 sites on a 100 x 100 grid, 3x3 submanifold conv, float32."""
    g = torch.Generator().manual_seed(6)
    flat = torch.randperm(100 * 100, generator=g)[:4000]
    coords = torch.stack([torch.zeros_like(flat), flat // 100, flat % 100], 1)
    sparse = SparseMap(torch.randn(4000, 16, generator=g), coords, 1)
    conv = SparseConv2d(16, 16, 3, 1)
    out = conv(sparse)
    dense = F.conv2d(sparse.to_dense((0, 0), (100, 100)), conv.weight, padding=1)
    torch.testing.assert_close(out.features, dense_at(dense, coords, (0, 0)), rtol=1e-4, atol=1e-4)
