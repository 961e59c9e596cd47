"""Multi-crop views (shapes, determinism, DINO's rules) and the MultiCropWrapper."""

from __future__ import annotations

import pytest
import torch

from gigaslide.ssl.crop_data import MultiCropData, item_generator
from gigaslide.ssl.multicrop import MultiCrop, MultiCropConfig, MultiCropWrapper, crop_box

torch.set_num_threads(1)


def _tiles(n: int, size: int = 64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g) for _ in range(n)]


def test_views_shapes_order_and_normalisation() -> None:
    cfg = MultiCropConfig(
        global_size=32, local_size=16, n_local=3, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)
    )
    views = MultiCrop(cfg)(_tiles(1)[0], torch.Generator().manual_seed(1))
    assert cfg.n_crops == 5 and len(views) == 5
    assert [tuple(v.shape) for v in views] == [(3, 32, 32)] * 2 + [(3, 16, 16)] * 3
    for v in views:  # [0, 1] pixels normalised with mean 0.5, std 0.25 -> [-2, 2]
        assert v.dtype == torch.float32 and float(v.min()) >= -2.0 - 1e-5 and float(v.max()) <= 2.0 + 1e-5


def test_views_are_a_function_of_the_generator_seed() -> None:
    aug = MultiCrop(MultiCropConfig(global_size=24, local_size=12, n_local=2))
    tile = _tiles(1)[0]
    a = aug(tile, torch.Generator().manual_seed(5))
    b = aug(tile, torch.Generator().manual_seed(5))
    c = aug(tile, torch.Generator().manual_seed(6))
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_identity_settings_reproduce_the_tile() -> None:
    """With crop scale 1, no flip/jitter/blur/solarise, a view is the normalised tile itself."""
    cfg = MultiCropConfig(global_size=64, local_size=64, n_local=0, global_scale=(1.0, 1.0), flip_p=0.0,
                          jitter_p=0.0, grayscale_p=0.0, solarize_p=0.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))  # fmt: skip
    aug = MultiCrop(cfg)
    tile = _tiles(1)[0]
    for seed in range(20):
        v = aug(tile, torch.Generator().manual_seed(seed))[1]
        if torch.allclose(v, tile.float() / 255, atol=1e-5):
            return
    pytest.fail("no unblurred second global view in 20 draws reproduced the tile")


def test_crop_box_area_and_ratio() -> None:
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        top, left, h, w = crop_box(g, 100, 100, (0.05, 0.4), (3 / 4, 4 / 3))
        assert 0 <= top <= 100 - h and 0 <= left <= 100 - w
        assert 0.04 * 1e4 <= h * w <= 0.42 * 1e4
        assert 0.7 <= w / h <= 1.4


def test_batches_are_deterministic_and_resume_mid_epoch() -> None:
    aug = MultiCrop(MultiCropConfig(global_size=16, local_size=8, n_local=2))
    data = MultiCropData(_tiles(10, 32), aug, batch_size=3, seed=7)
    assert len(data) == 3  # 10 tiles -> 3 full batches (drop last)
    full = list(data.batches(epoch=1))
    assert len(full) == 3 and len(full[0]) == 4 and tuple(full[0][0].shape) == (3, 3, 16, 16)
    resumed = list(data.batches(epoch=1, start=2))
    assert all(torch.equal(x, y) for x, y in zip(full[2], resumed[0]))
    other_epoch = list(data.batches(epoch=2))
    assert not torch.equal(full[0][0], other_epoch[0][0])
    # two ranks see disjoint tiles, covering the epoch's first global batches
    r0 = MultiCropData(_tiles(10, 32), aug, batch_size=2, seed=7, rank=0, world_size=2)
    r1 = MultiCropData(_tiles(10, 32), aug, batch_size=2, seed=7, rank=1, world_size=2)
    i0 = {int(i) for b in range(len(r0)) for i in r0.batch_indices(0, b)}
    i1 = {int(i) for b in range(len(r1)) for i in r1.batch_indices(0, b)}
    assert len(r0) == 2 and not i0 & i1 and len(i0 | i1) == 8
    assert item_generator(1, 2, 3).initial_seed() == item_generator(1, 2, 3).initial_seed()


def test_worker_processes_give_the_same_batches() -> None:
    aug = MultiCrop(MultiCropConfig(global_size=16, local_size=8, n_local=1))
    a = list(MultiCropData(_tiles(6, 32), aug, batch_size=2, seed=3).batches(0))
    b = list(MultiCropData(_tiles(6, 32), aug, batch_size=2, seed=3, num_workers=2).batches(0))
    assert all(torch.equal(x, y) for xa, xb in zip(a, b) for x, y in zip(xa, xb))


def test_too_few_tiles_is_explained() -> None:
    with pytest.raises(ValueError, match="lower --batch-size"):
        MultiCropData(_tiles(3), MultiCrop(), batch_size=4)


def test_wrapper_runs_backbone_per_resolution_and_head_once() -> None:
    calls: list[tuple[int, ...]] = []

    class Backbone(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            calls.append(tuple(x.shape))
            return x.mean(dim=(2, 3))  # (B, 3)

    wrapper = MultiCropWrapper(Backbone(), torch.nn.Linear(3, 5))
    crops = [torch.randn(2, 3, 16, 16)] * 2 + [torch.randn(2, 3, 8, 8)] * 3
    out = wrapper(crops)
    assert calls == [(4, 3, 16, 16), (6, 3, 8, 8)]
    assert out.shape == (10, 5)
    torch.testing.assert_close(out[4:6], wrapper.head(crops[2].mean(dim=(2, 3))))
    assert sorted(n.split(".")[0] for n, _ in wrapper.named_parameters()) == ["head", "head"]


@pytest.mark.parametrize("sigma", [0.1, 0.7, 2.0])
def test_separable_blur_equals_torchvision(sigma: float) -> None:
    import math

    import torchvision.transforms.v2.functional as TF

    from gigaslide.ssl.multicrop import gaussian_blur

    x = torch.rand(3, 40, 33, generator=torch.Generator().manual_seed(0))
    k = 2 * math.ceil(3.0 * sigma) + 1
    torch.testing.assert_close(
        gaussian_blur(x, sigma), TF.gaussian_blur(x, [k, k], [sigma, sigma]), rtol=1e-5, atol=1e-5
    )
