"""HIPT region features: token grids of each region's patches, patch masks at slide edges, resume, CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.data.region_features import read_region_features, region_patch_mask
from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.transforms import TileTransform
from gigaslide.models.encoders import create_encoder, create_hipt_vit4k
from gigaslide.pipeline.inputs import SlideInput
from gigaslide.pipeline.region_embed import run_region_embedding
from gigaslide.pipeline.tile_job import run_tiling
from gigaslide.preprocess.coords_io import read_coords, write_coords
from gigaslide.preprocess.tiling import subtile_coords, subtile_spec
from gigaslide.utils.manifest import Manifest

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Path:
    from gigaslide.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("regions")
    # 1024 x 768 px: 512 px regions in a 2 x 2 grid; the bottom row hangs 256 px over the slide edge
    slides = [SlideInput("r0", write_synthetic_slide(d / "r0.tiff", width=1024, height=768, mpp=0.5, seed=3))]
    out = d / "tiles"
    run_tiling(slides, out, tile_size=256, region_size=512, region_min_tissue=0.0, progress=False)
    return out


def test_region_patch_mask_marks_patches_outside_the_slide(tiling: Path) -> None:
    cf = read_coords(tiling / "regions" / "r0.h5")
    mask = region_patch_mask(cf.coords, cf.spec)  # (M, 4)
    expected = (subtile_coords(cf.coords, cf.spec)[..., 1] < 768) & (
        subtile_coords(cf.coords, cf.spec)[..., 0] < 1024
    )
    np.testing.assert_array_equal(mask, expected)
    assert mask.shape[1] == 4 and not mask.all() and mask.any(axis=1).all()


def test_region_embedding_equals_vit256_on_each_patch(tiling: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    enc = create_encoder("hipt_vit256", weights="random")
    vit4k = create_hipt_vit4k().eval()
    summary = run_region_embedding(
        tiling, enc, tmp_path / "feats", vit4k=vit4k, batch_size=3, device="cpu", progress=False
    )
    assert summary.n_done == 1 and summary.n_failed == 0
    rf = read_region_features(tmp_path / "feats" / "h5_files" / "r0.h5")
    cf = read_coords(tiling / "regions" / "r0.h5")
    m = len(cf.coords)
    assert (
        rf.features.shape == (m, 4, 384)
        and rf.patch_mask.shape == (m, 4)
        and rf.region_features.shape == (m, 192)
    )
    np.testing.assert_array_equal(rf.coords, cf.coords)
    assert rf.attrs["kind"] == "hipt_region_tokens" and rf.attrs["grid"] == [2, 2] and rf.attrs["random_init"]
    assert rf.spec is not None and rf.spec.tile_size == 512
    # reference: each 256 px patch read on its own (white outside the slide) through ViT_256
    sub = subtile_coords(cf.coords, cf.spec).reshape(-1, 2)
    tiles = TileDataset(tiling.parent / "r0.tiff", sub, subtile_spec(cf.spec))
    t = TileTransform(256, (0.5,) * 3, (0.5,) * 3)
    with torch.no_grad():
        ref = enc(torch.stack([t(tiles.read_tile(i)) for i in range(len(sub))])).reshape(m, 4, 384)
        grid = ref.transpose(1, 2).reshape(m, 384, 2, 2)
        ref4k = vit4k(grid, torch.from_numpy(rf.patch_mask).reshape(m, 2, 2))
    np.testing.assert_allclose(rf.features, ref.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(rf.region_features, ref4k.numpy(), rtol=1e-4, atol=1e-4)
    # a rerun skips the finished slide
    again = run_region_embedding(tiling, enc, tmp_path / "feats", vit4k=vit4k, device="cpu", progress=False)
    assert again.n_skipped == 1 and again.n_done == 0


def test_interrupted_slide_resumes_inside_itself(tiling: Path, tmp_path: Path, monkeypatch) -> None:
    from gigaslide.models.encoders.hipt_region import HIPTRegionEncoder

    torch.manual_seed(0)
    enc = create_encoder("hipt_vit256", weights="random")
    full = run_region_embedding(tiling, enc, tmp_path / "full", device="cpu", progress=False)
    original = HIPTRegionEncoder.patch_tokens
    calls = {"n": 0}

    def flaky(self, images):
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("power cut")
        return original(self, images)

    monkeypatch.setattr(HIPTRegionEncoder, "patch_tokens", flaky)
    out = tmp_path / "out"
    first = run_region_embedding(tiling, enc, out, chunk_regions=1, device="cpu", progress=False)
    assert first.n_failed == 1 and "power cut" in first.failed["r0"]
    assert sorted(p.name for p in (out / ".partial" / "r0").glob("chunk_*.npz")) == [
        "chunk_0000000.npz",
        "chunk_0000001.npz",
    ]
    monkeypatch.setattr(HIPTRegionEncoder, "patch_tokens", original)
    second = run_region_embedding(tiling, enc, out, chunk_regions=1, device="cpu", progress=False)
    (res,) = second.results
    assert res.status == "done" and res.resumed_from == 2 and res.computed == full.results[0].n_tiles - 2
    assert not (out / ".partial" / "r0").exists()
    a, b = (
        read_region_features(out / "h5_files" / "r0.h5"),
        read_region_features(tmp_path / "full" / "h5_files" / "r0.h5"),
    )
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.patch_mask, b.patch_mask)


def test_missing_region_file_is_recorded_and_cli_runs(tiling: Path, tmp_path: Path) -> None:
    broken = tmp_path / "tiles"
    import shutil

    shutil.copytree(tiling, broken)
    cf = read_coords(broken / "regions" / "r0.h5")
    write_coords(broken / "regions" / "r0.h5", cf.coords[:0], cf.spec)  # tiled, but no region has tissue
    enc = create_encoder("hipt_vit256", weights="random")
    empty = run_region_embedding(broken, enc, tmp_path / "e", device="cpu", progress=False)
    assert empty.n_failed == 1 and "--region-min-tissue" in empty.failed["r0"]
    (broken / "regions" / "r0.h5").unlink()
    summary = run_region_embedding(
        broken, create_encoder("hipt_vit256", weights="random"), tmp_path / "a", device="cpu", progress=False
    )
    assert summary.n_failed == 1 and "--region-size 4096" in summary.failed["r0"]
    assert Manifest(tmp_path / "a" / "manifest.csv").rows["r0"]["status"] == "failed"
    cmd = [
        sys.executable,
        "-m",
        "gigaslide",
        "embed",
        str(tiling),
        "--encoder",
        "hipt_vit256",
        "--weights",
        "random",
    ]
    cmd += ["--regions", "--out", str(tmp_path / "b"), "--device", "cpu", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert read_region_features(tmp_path / "b" / "h5_files" / "r0.h5").region_features is None
    from gigaslide.cli.main import main

    base = [
        "embed",
        str(tiling),
        "--encoder",
        "hipt_vit256",
        "--weights",
        "random",
        "--out",
        str(tmp_path / "c"),
    ]
    assert main([*base, "--regions", "--save-pt"]) != 0 and main([*base, "--vit4k-weights", "random"]) != 0
    assert not (tmp_path / "c" / "h5_files").exists()


@pytest.fixture(scope="module")
def cmu1_regions(shared_data: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cmu1") / "tiles"
    run_tiling(
        [SlideInput("cmu1", shared_data / "cmu-1-small-region.svs")], out, region_size=4096, progress=False
    )
    return out


def test_slide_smaller_than_one_region_keeps_one_masked_region(cmu1_regions: Path) -> None:
    cf = read_coords(cmu1_regions / "regions" / "cmu1.h5")  # CMU-1 crop: 2220 x 2967 px at 0.499 um/px
    assert cf.coords.tolist() == [[0, 0]] and cf.spec.tile_size == 4096
    mask = region_patch_mask(cf.coords, cf.spec).reshape(16, 16)
    side = cf.spec.level0_size / 16  # level-0 px per 256 px patch
    rows, cols = int(np.ceil(2967 / side)), int(np.ceil(2220 / side))
    assert mask[:rows, :cols].all() and mask.sum() == rows * cols


@pytest.mark.slow
def test_full_4096_region_of_cmu1_through_hipt(cmu1_regions: Path, tmp_path: Path) -> None:
    from gigaslide.models.slide import create_slide_model

    torch.manual_seed(0)
    enc = create_encoder("hipt_vit256", weights="random")
    run_region_embedding(
        cmu1_regions, enc, tmp_path / "f", vit4k=create_hipt_vit4k().eval(), device="cpu", progress=False
    )
    rf = read_region_features(tmp_path / "f" / "h5_files" / "cmu1.h5")
    assert rf.features.shape == (1, 256, 384) and rf.region_features.shape == (1, 192)
    model = create_slide_model("hipt", 384, 2).eval()
    with torch.no_grad():
        out = model(torch.from_numpy(rf.features)[None], mask=torch.from_numpy(rf.patch_mask)[None])
    assert out.logits.shape == (1, 2) and out.attention.tolist() == [[1.0]]
