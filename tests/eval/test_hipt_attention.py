"""HIPT attention maps: both levels against the models' own attention, factorised map, PNGs on real data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide.eval.heatmap import render_heatmap
from gigaslide.eval.hipt_attention import (
    factorised_map,
    hierarchical_attention,
    patch_level_map,
    region_level_map,
    write_attention_pngs,
)
from gigaslide.models.encoders import create_encoder, create_hipt_vit4k

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def models() -> tuple[torch.nn.Module, torch.nn.Module]:
    torch.manual_seed(0)
    return create_encoder("hipt_vit256", weights="random"), create_hipt_vit4k().eval()


def _normalise(rgb: np.ndarray) -> torch.Tensor:
    return (
        torch.from_numpy(rgb.copy()).permute(2, 0, 1).float() / 255.0 - 0.5
    ) / 0.5  # HIPT: mean = std = 0.5


def test_both_levels_equal_the_models_attention(models) -> None:
    vit256, vit4k = models
    image = torch.randn(3, 512, 512)
    mask = torch.tensor([[True, True], [True, False]])  # the bottom-right patch lies outside the slide
    att = hierarchical_attention(vit256, vit4k, image, patch_mask=mask, batch_size=3)
    assert att.patch.shape == (4, 6, 16, 16) and att.region.shape == (6, 2, 2) and att.grid == (2, 2)
    with torch.no_grad():
        patches = [
            image[:, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] for r in range(2) for c in range(2)
        ]
        batch = torch.stack(patches)
        ref256 = vit256.get_last_selfattention(batch)[:, :, 0, 1:].reshape(4, 6, 16, 16)
        grid = vit256(batch).T.reshape(1, 384, 2, 2)
        ref4k = vit4k.get_last_selfattention(grid, mask.unsqueeze(0))[0, :, 0, 1:].reshape(6, 2, 2)
    np.testing.assert_allclose(att.patch, ref256.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(att.region, ref4k.numpy(), rtol=1e-4, atol=1e-6)
    assert float(np.abs(att.region[:, 1, 1]).max()) == 0.0  # padded patch: no attention
    fine, coarse, both = patch_level_map(att), region_level_map(att), factorised_map(att)
    assert fine.shape == both.shape == (32, 32) and coarse.shape == (2, 2)
    np.testing.assert_allclose(both, fine * np.repeat(np.repeat(coarse, 16, 0), 16, 1))
    assert fine[16:, 16:].max() == 0.0 and coarse[1, 1] == 0.0 and coarse.max() == 1.0
    # token (i, j) of patch (r, c) sits at pixel-token (16 r + i, 16 c + j); percentiles within each patch
    top = np.unravel_index(np.argmax(att.patch[2].mean(0)), (16, 16))
    assert fine[16 + top[0], top[1]] == 1.0


def test_identical_patches_run_once_and_get_the_same_maps(models) -> None:
    vit256, vit4k = models
    image = torch.ones(3, 512, 768)  # white (normalised) everywhere but two patches
    image[:, :256, :256] = torch.randn(3, 256, 256)
    image[:, 256:, 512:] = torch.randn(3, 256, 256)
    seen: list[int] = []
    hook = vit256.patch_embed.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].shape[0]))
    try:
        att = hierarchical_attention(vit256, vit4k, image, batch_size=4)
    finally:
        hook.remove()
    assert att.patch.shape == (6, 6, 16, 16)
    with torch.no_grad():
        batch = torch.stack(
            [image[:, r * 256 : (r + 1) * 256, c * 256 : (c + 1) * 256] for r in range(2) for c in range(3)]
        )
        ref256 = vit256.get_last_selfattention(batch)[:, :, 0, 1:].reshape(6, 6, 16, 16)
        grid = vit256(batch).T.reshape(1, 384, 2, 3)
        ref4k = vit4k.get_last_selfattention(grid)[0, :, 0, 1:].reshape(6, 2, 3)
    np.testing.assert_allclose(att.patch, ref256.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(att.region, ref4k.numpy(), rtol=1e-4, atol=1e-6)
    assert seen == [3]  # two tissue patches and one white one went through ViT_256


def test_patch_maps_on_a_real_he_patch(models, shared_data: Path, tmp_path: Path) -> None:
    vit256, _ = models
    rgb = np.asarray(Image.open(shared_data / "he-patch-256.png").convert("RGB"))
    att = hierarchical_attention(vit256, None, _normalise(rgb))
    paths = write_attention_pngs(rgb, att, tmp_path, "he")
    assert [p.name for p in paths] == [f"he_vit256_head{i}.png" for i in range(6)]
    img = np.asarray(Image.open(paths[0]))
    assert img.shape == (256, 256, 3) and not np.array_equal(img, rgb)


def test_hierarchical_maps_on_a_partial_cmu1_region(models, shared_data: Path, tmp_path: Path) -> None:
    from gigaslide.io import open_slide

    vit256, vit4k = models
    with open_slide(shared_data / "cmu-1-small-region.svs") as slide:  # 2220 x 2967 px, smaller than a region
        rgb = slide.read_region((1536, 2304), 0, (1024, 1024))  # white beyond the slide's edge
        w, h = slide.dimensions
    xs, ys = 1536 + 256 * np.arange(4), 2304 + 256 * np.arange(4)
    mask = torch.from_numpy((ys[:, None] < h) & (xs[None, :] < w))  # (4, 4): 3 x 3 real patches
    att = hierarchical_attention(vit256, vit4k, _normalise(rgb), patch_mask=mask)
    paths = write_attention_pngs(rgb, att, tmp_path, "cmu1")
    assert len(paths) == 6 + 6 + 1 and paths[-1].name == "cmu1_factorised.png"
    factor = np.asarray(Image.open(paths[-1]))
    assert factor.shape == (1024, 1024, 3)
    assert region_level_map(att)[3].max() == 0.0 and region_level_map(att)[:3, :3].min() > 0.0


def test_slide_level_attention_over_regions_on_the_thumbnail(shared_data: Path, tmp_path: Path) -> None:
    from gigaslide.data.region_features import read_region_features
    from gigaslide.io import open_slide
    from gigaslide.models.slide import create_slide_model
    from gigaslide.pipeline.inputs import SlideInput
    from gigaslide.pipeline.region_embed import run_region_embedding
    from gigaslide.pipeline.tile_job import run_tiling

    slide_path = shared_data / "cmu-1-small-region.svs"
    tiles = tmp_path / "tiles"
    # regions of 768 px (3 x 3 patches) at 1 um/px: a 2 x 2 grid, the right column partly outside
    run_tiling([SlideInput("cmu1", slide_path)], tiles, target_mpp=1.0, tile_size=256, region_size=768,
               region_min_tissue=0.0, progress=False)  # fmt: skip
    torch.manual_seed(0)
    run_region_embedding(
        tiles, "hipt_vit256", tmp_path / "feats", weights="random", device="cpu", progress=False
    )
    rf = read_region_features(tmp_path / "feats" / "h5_files" / "cmu1.h5")
    assert rf.n_regions == 4 and rf.patch_mask.shape == (4, 9)
    assert rf.patch_mask.sum(1).tolist() == [9, 6, 9, 6]  # the third patch column lies outside the slide
    model = create_slide_model("hipt", 384, 2).eval()
    with torch.no_grad():
        out = model(
            torch.from_numpy(rf.features).unsqueeze(0), mask=torch.from_numpy(rf.patch_mask).unsqueeze(0)
        )
    scores = out.attention[0].numpy()
    assert scores.shape == (rf.n_regions,) and abs(scores.sum() - 1.0) < 1e-5
    with open_slide(slide_path) as slide:
        png = render_heatmap(
            slide, rf.coords, scores, rf.spec.level0_size, tmp_path / "slide.png", max_size=512
        )
    assert np.asarray(Image.open(png)).shape[:2] == (512, round(2220 * 512 / 2967))


def test_hipt_attention_cli_on_cmu1(shared_data: Path, tmp_path: Path) -> None:
    from gigaslide.cli.main import main

    slide = str(shared_data / "cmu-1-small-region.svs")
    args = ["hipt-attention", slide, "--x", "1536", "--y", "2304", "--region-size", "1024", "--scale", "2"]
    assert (
        main([*args, "--weights", "random", "--vit4k-weights", "random", "--out", str(tmp_path / "maps")])
        == 0
    )
    names = sorted(p.name for p in (tmp_path / "maps").glob("*.png"))
    assert len(names) == 13 and "cmu-1-small-region_x1536_y2304_factorised.png" in names
    assert np.asarray(Image.open(tmp_path / "maps" / names[0])).shape == (512, 512, 3)
    assert main([*args[:3], "99999", *args[4:], "--weights", "random", "--out", str(tmp_path / "bad")]) == 1
