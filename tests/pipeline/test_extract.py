"""`extract_features`: real slide tiles through a tile encoder, equal to running it by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.transforms import TileTransform
from gigaslide.pipeline.extract import (
    extract_features,
    is_conv_net,
    warn_half_precision_on_cpu,
)
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.device import resolve_device
from gigaslide.utils.seed import seed_everything


def _grid(spec: TileSpec) -> np.ndarray:
    nx, ny = spec.grid_shape()
    xs = [round(i * spec.level0_stride) for i in range(nx)]
    ys = [round(j * spec.level0_stride) for j in range(ny)]
    return np.array([(x, y) for y in ys for x in xs], dtype=np.int64)  # (N, 2)


@pytest.fixture(scope="module")
def cmu1(shared_data):
    from gigaslide.io import open_slide

    path = shared_data / "cmu-1-small-region.svs"
    with open_slide(path) as slide:
        spec = TileSpec.create(
            tile_size=128,
            target_mpp=2.0,
            slide_mpp=slide.require_mpp(),
            level_downsamples=slide.level_downsamples,
            level0_dims=slide.dimensions,
        )
    return path, spec, _grid(spec)


@pytest.fixture(scope="module")
def resnet18():
    from gigaslide.models.encoders import create_encoder

    seed_everything(0)
    return create_encoder("resnet18_trunc", weights="random")


def test_cmu1_features_equal_direct_encoder_run(cmu1, resnet18):
    path, spec, coords = cmu1
    coords = coords[::3]  # 10 tiles spread over the slide keep the test quick
    feats = extract_features(path, coords, spec, resnet18, batch_size=4, num_workers=1, device="cpu")
    assert feats.shape == (len(coords), 256) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and feats.std() > 0
    # reference: the same tiles read by TileDataset, normalised by hand, encoder called directly
    ds = TileDataset(path, coords, spec)
    mean = torch.tensor(resnet18.meta.mean).view(1, 3, 1, 1)
    std = torch.tensor(resnet18.meta.std).view(1, 3, 1, 1)
    ref = []
    with torch.inference_mode():
        for start in range(0, len(ds), 4):
            x = torch.stack([ds[i][0] for i in range(start, min(start + 4, len(ds)))]).float() / 255.0
            x = torch.nn.functional.interpolate(x, size=256, mode="bilinear", antialias=True)
            ref.append(resnet18((x - mean) / std).numpy())
    np.testing.assert_allclose(feats, np.concatenate(ref), rtol=1e-4, atol=1e-5)


def test_open_slide_object_and_bf16(cmu1, resnet18):
    from gigaslide.io import open_slide

    path, spec, coords = cmu1
    coords = coords[:6]
    ref = extract_features(path, coords, spec, resnet18, batch_size=3)
    with open_slide(path) as slide:
        same = extract_features(slide, coords, spec, resnet18, batch_size=6)
    np.testing.assert_allclose(same, ref, rtol=1e-4, atol=1e-5)
    low = extract_features(path, coords, spec, resnet18, batch_size=3, precision="bf16")
    assert low.dtype == np.float32
    cos = (low * ref).sum(1) / (np.linalg.norm(low, axis=1) * np.linalg.norm(ref, axis=1))
    assert cos.min() > 0.98  # bf16 autocast approximates fp32


def test_custom_transform_and_empty_coords(cmu1, resnet18):
    path, spec, coords = cmu1
    small = TileTransform(64, resnet18.meta.mean, resnet18.meta.std)
    feats = extract_features(path, coords[:4], spec, resnet18, transform=small)
    assert feats.shape == (4, 256)
    empty = extract_features(path, np.zeros((0, 2), np.int64), spec, resnet18)
    assert empty.shape == (0, 256)


def test_transform_matches_formula():
    rng = np.random.default_rng(0)
    tile = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    tf = TileTransform(32, (0.5, 0.4, 0.3), (0.2, 0.25, 0.5))
    want = (tile.transpose(2, 0, 1) / 255.0 - np.array([0.5, 0.4, 0.3])[:, None, None]) / np.array(
        [0.2, 0.25, 0.5]
    )[:, None, None]
    np.testing.assert_allclose(tf(tile).numpy(), want, rtol=1e-5, atol=1e-6)
    up = TileTransform(48)(tile)
    assert up.shape == (3, 48, 48) and up.dtype == torch.float32
    with pytest.raises(ValueError, match="uint8"):
        tf(torch.zeros(3, 32, 32))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        tf(tile[..., :2])


def test_half_precision_on_cpu_warns(cmu1, resnet18, caplog):
    path, spec, _ = cmu1
    with caplog.at_level("WARNING", logger="gigaslide.pipeline.extract"):
        feats = extract_features(path, np.zeros((0, 2), np.int64), spec, resnet18, precision="fp16")
    assert feats.shape == (0, 256)
    assert "fp16 on a CPU device" in caplog.text and "use --precision fp32" in caplog.text
    assert warn_half_precision_on_cpu(torch.device("cpu"), "bf16")
    assert not warn_half_precision_on_cpu(torch.device("cpu"), "fp32")
    assert not warn_half_precision_on_cpu(torch.device("cuda", 0), "fp16")  # no CUDA needed: a device name


def test_errors_and_helpers(cmu1, resnet18):
    path, spec, coords = cmu1
    with pytest.raises(ValueError, match="precision must be one of"):
        extract_features(path, coords[:2], spec, resnet18, precision="int8")
    with pytest.raises(ValueError, match=r"no `\.meta`"):
        extract_features(path, coords[:2], spec, torch.nn.Identity())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_device("cpu").type == "cpu"
    assert is_conv_net(resnet18)
    patch_embed = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 16, stride=16), torch.nn.Flatten())
    assert not is_conv_net(patch_embed)


def test_weights_identity(resnet18):
    from gigaslide.pipeline.extract import weights_identity

    name, sha, random_init = weights_identity(resnet18)
    assert (name, random_init) == ("RANDOM-INIT", True) and len(sha) == 64
    assert weights_identity(resnet18) == (name, sha, True)  # stable
    other = torch.nn.Linear(2, 2)
    other.weights_info = {"path": "/w/enc.pth", "sha256": "ab" * 32}
    assert weights_identity(other) == ("/w/enc.pth", "ab" * 32, False)
    with pytest.raises(ValueError, match="no `weights_info`"):
        weights_identity(torch.nn.Linear(2, 2))
