"""Tile augmentations of the Giga-SSL bank: exact geometric cases, sharing, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.data.tile_augment import TileAugment, params_row

IDENTITY = TileAugment(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip=False,
    rotate90=False,
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=0.0,
)


def images(n: int = 4, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def with_(params: dict[str, np.ndarray], **values: object) -> dict[str, np.ndarray]:
    out = {k: v.copy() for k, v in params.items()}
    for k, v in values.items():
        out[k][:] = v
    return out


def test_identity_parameters_leave_tiles_unchanged() -> None:
    x = images()
    p = IDENTITY.sample(4, np.random.default_rng(0))
    torch.testing.assert_close(IDENTITY(x, p), x, atol=1e-6, rtol=0)


def test_flips_and_quarter_turns_are_exact() -> None:
    x = images()
    base = IDENTITY.sample(4, np.random.default_rng(0))
    torch.testing.assert_close(IDENTITY(x, with_(base, flip_x=True)), x.flip(-1), atol=1e-6, rtol=0)
    torch.testing.assert_close(IDENTITY(x, with_(base, flip_y=True)), x.flip(-2), atol=1e-6, rtol=0)
    torch.testing.assert_close(IDENTITY(x, with_(base, rot90=2)), x.flip(-1).flip(-2), atol=1e-6, rtol=0)
    r1, r3 = IDENTITY(x, with_(base, rot90=1)), IDENTITY(x, with_(base, rot90=3))
    candidates = [torch.rot90(x, 1, dims=(2, 3)), torch.rot90(x, -1, dims=(2, 3))]
    assert any(torch.allclose(r1, c, atol=1e-6) for c in candidates)
    assert any(torch.allclose(r3, c, atol=1e-6) for c in candidates) and not torch.allclose(r1, r3)


def test_grayscale_blur_and_jitter() -> None:
    x = images()
    base = IDENTITY.sample(4, np.random.default_rng(0))
    g = IDENTITY(x, with_(base, gray=True))
    assert torch.allclose(g[:, 0], g[:, 1]) and torch.allclose(g[:, 1], g[:, 2])
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    torch.testing.assert_close(g[:, 0], lum, atol=1e-6, rtol=0)
    blurred = IDENTITY(x, with_(base, blur_on=True, sigma=1.0))
    assert blurred.var() < 0.6 * x.var()  # white noise loses most of its variance
    torch.testing.assert_close(blurred.mean(), x.mean(), atol=0.02, rtol=0)
    bright = IDENTITY(x, with_(base, jitter_on=True, brightness=0.5, contrast=1.0, saturation=1.0, hue=0.0))
    torch.testing.assert_close(bright, x * 0.5, atol=1e-5, rtol=0)
    hue0 = IDENTITY(x, with_(base, jitter_on=True, brightness=1.0, contrast=1.0, saturation=1.0, hue=0.0))
    torch.testing.assert_close(hue0, x, atol=1e-5, rtol=0)


def test_shared_parameters_transform_every_tile_alike() -> None:
    aug = TileAugment()
    x = images(1).expand(6, -1, -1, -1).contiguous()  # six copies of one tile
    shared = aug.sample(6, np.random.default_rng(1), shared=True)
    assert all(len(set(v.tolist())) == 1 for v in shared.values())
    out = aug(x, shared)
    assert torch.allclose(out, out[:1].expand_as(out), atol=1e-6)
    independent = aug.sample(6, np.random.default_rng(1), shared=False)
    out_ns = aug(x, independent)
    assert not torch.allclose(out_ns, out_ns[:1].expand_as(out_ns), atol=1e-3)
    assert out.min() >= 0 and out.max() <= 1
    # same seed, same parameters; JSON-able rows
    again = aug.sample(6, np.random.default_rng(1), shared=True)
    assert all(np.array_equal(shared[k], again[k]) for k in shared)
    row = params_row(shared, 0)
    assert (
        isinstance(row["crop_w"], float) and isinstance(row["gray"], bool) and isinstance(row["rot90"], int)
    )


def test_bad_batches_raise() -> None:
    p = IDENTITY.sample(2, np.random.default_rng(0))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\) float batch"):
        IDENTITY(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), p)
    with pytest.raises(ValueError, match="parameters for 2 tiles, batch of 3"):
        IDENTITY(images(3, 8), p)
