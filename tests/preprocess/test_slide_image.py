"""Whole-slide image rendering (LongViT input): banded resize, cache, token mask, dataset view."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from gigaslide.data.slide_images import (
    IMAGENET_MEAN,
    SlideImageDataset,
    normalize_images,
    prepare_slide_images,
)
from gigaslide.io import open_slide
from gigaslide.preprocess.slide_image import SlideImageSpec, render_slide_image
from gigaslide.preprocess.tissue import detect_tissue
from gigaslide.synth import write_synthetic_slide


@pytest.fixture(scope="module")
def synth_slide(tmp_path_factory) -> Path:
    return write_synthetic_slide(
        tmp_path_factory.mktemp("wsi") / "s1.tiff", width=2048, height=1536, mpp=0.5, seed=3
    )


def test_bands_join_seamlessly_and_match_one_resize(synth_slide, tmp_path):
    with open_slide(synth_slide) as slide:
        spec_one = SlideImageSpec(target_size=256, region="whole", band_rows=10_000)
        one = render_slide_image(slide, spec_one, tmp_path / "one.npy")
        banded = render_slide_image(
            slide, SlideImageSpec(target_size=256, region="whole", band_rows=37), tmp_path / "b.npy"
        )
        assert one.pixels.shape == (256, 256, 3) and one.pixels.dtype == np.uint8
        np.testing.assert_array_equal(np.asarray(banded.pixels), np.asarray(one.pixels))
        level = one.level
        full = slide.read_region((0, 0), level, slide.level_dimensions[level])
    ref = np.asarray(Image.fromarray(full).resize((256, 256), Image.Resampling.BICUBIC))
    diff = np.abs(ref.astype(int) - np.asarray(one.pixels).astype(int))[6:-6, 6:-6]
    assert diff.max() <= 1  # same filter; only the outer rim differs (slide borders vs white context)


def test_keep_aspect_pads_to_patch_multiple_with_white(synth_slide, tmp_path):
    with open_slide(synth_slide) as slide:
        img = render_slide_image(
            slide, SlideImageSpec(target_size=500, region="whole", keep_aspect=True), tmp_path / "a.npy"
        )
    assert img.content_size == (500, 375)
    assert img.pixels.shape == (384, 512, 3) and img.grid == (12, 16)
    assert (np.asarray(img.pixels)[376:] == 255).all() and (np.asarray(img.pixels)[:, 501:] == 255).all()


def test_tissue_box_token_mask_and_cache_reuse(synth_slide, tmp_path):
    spec = SlideImageSpec(target_size=256, region="tissue")
    out = tmp_path / "t.npy"
    with open_slide(synth_slide) as slide:
        tissue = detect_tissue(slide)
        img = render_slide_image(slide, spec, out, tissue=tissue)
        x0, y0, x1, y1 = img.box
        assert 0 <= x0 < x1 <= 2048 and 0 <= y0 < y1 <= 1536
        assert img.token_mask.shape == (8, 8) and img.token_mask.dtype == bool
        assert img.token_mask.mean() > 0.2
        stamp = out.stat().st_mtime_ns
        again = render_slide_image(slide, spec, out, tissue=tissue)  # complete cache: reused
        assert out.stat().st_mtime_ns == stamp
        np.testing.assert_array_equal(np.asarray(again.pixels), np.asarray(img.pixels))
        out.with_suffix(".json").unlink()  # an interrupted render (no JSON) is redone
        render_slide_image(slide, spec, out, tissue=tissue)
        assert json.loads(out.with_suffix(".json").read_text())["spec"]["target_size"] == 256
        render_slide_image(slide, SlideImageSpec(target_size=128, region="tissue"), out, tissue=tissue)
        assert np.load(out, mmap_mode="r").shape == (128, 128, 3)  # another spec: re-rendered
    with pytest.raises(ValueError, match="target_size must be in"):
        SlideImageSpec(target_size=8)
    with pytest.raises(ValueError, match="region must be one of"):
        SlideImageSpec(region="tumour")
    whole = SlideImageSpec(region="tissue")
    with open_slide(synth_slide) as slide, pytest.raises(ValueError, match="needs a tissue mask"):
        render_slide_image(slide, whole, tmp_path / "x.npy")


def test_prepare_records_bad_slides_and_dataset_serves_uint8(synth_slide, tmp_path):
    bad = tmp_path / "bad.tiff"
    bad.write_bytes(b"not a slide")
    report = prepare_slide_images([synth_slide, bad], SlideImageSpec(target_size=128), tmp_path / "cache")
    assert list(report.images) == ["s1"] and "bad" in report.failed and "bad.tiff" in report.failed["bad"]
    again = prepare_slide_images([synth_slide], SlideImageSpec(target_size=128), tmp_path / "cache")
    assert again.reused == ["s1"] and again.rendered == []
    ds = SlideImageDataset(report.images, labels={"s1": 1})
    item = ds[0]
    assert item["image"].shape == (3, 128, 128) and item["image"].dtype == torch.uint8
    assert item["token_mask"].shape == (4, 4) and item["label"] == 1
    x = normalize_images(item["image"][None])
    expected = (item["image"][0, 0, 0].item() / 255.0 - IMAGENET_MEAN[0]) / 0.229
    assert x.dtype == torch.float32 and abs(x[0, 0, 0, 0].item() - expected) < 1e-6
    with pytest.raises(ValueError, match="no label for slide"):
        SlideImageDataset(report.images, labels={})


def test_rendered_image_runs_through_longvit(synth_slide, tmp_path):
    from gigaslide.models.slide import create_slide_model

    report = prepare_slide_images([synth_slide], SlideImageSpec(target_size=128), tmp_path / "c")
    item = SlideImageDataset(report.images)[0]
    torch.manual_seed(0)
    model = create_slide_model(
        "longvit",
        in_dim=3,
        n_classes=2,
        img_size=128,
        embed_dim=16,
        depth=1,
        num_heads=2,
        segment_lengths=(4, 16),
        dilated_ratios=(1, 2),
    ).eval()
    out = model(normalize_images(item["image"][None]), mask=item["token_mask"][None])
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()


def test_real_svs_slide(shared_data, tmp_path):
    path = shared_data / "cmu-1-small-region.svs"
    if not path.exists():
        pytest.skip("cmu-1-small-region.svs not in the shared data")
    report = prepare_slide_images([path], SlideImageSpec(target_size=1024, band_rows=256), tmp_path / "c")
    assert not report.failed, report.failed
    img = SlideImageDataset(report.images).image(0)
    assert img.pixels.shape == (1024, 1024, 3)
    px = np.asarray(img.pixels)
    assert 100 < px.mean() < 250 and px.std() > 10  # real H&E content, not a blank image
    assert img.token_mask.any()
