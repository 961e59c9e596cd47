"""`threads` (TileLoader + BatchNormalizer on the device) vs `processes` (DataLoader + TileTransform) loaders."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.feature_writer import ChunkedFeatureWriter, partial_path_for
from gigaslide.data.features_io import read_features
from gigaslide.data.transforms import BatchNormalizer, TileTransform
from gigaslide.io import open_slide
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.pipeline.extract import extract_features
from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling import grid_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.synth import write_synthetic_slide
from gigaslide.utils.manifest import Manifest
from gigaslide.utils.seed import seed_everything

TILE = 48  # tile px at 1 um/px on a 0.5 um/px slide


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> tuple[Path, np.ndarray, TileSpec]:
    path = write_synthetic_slide(tmp_path_factory.mktemp("ld") / "s.tiff", width=768, height=512, mpp=0.5)
    with open_slide(path) as s:
        spec = TileSpec.create(
            tile_size=TILE, target_mpp=1.0, slide_mpp=s.require_mpp(),
            level_downsamples=s.level_downsamples, level0_dims=s.dimensions, min_tissue=0.0,
        )  # fmt: skip
    return path, grid_coords(spec), spec  # (N, 2), N = 8 x 6 = 48


def encoder(input_size: int, seed: int = 0) -> torch.nn.Module:
    """resnet18_trunc (random, seeded) told to take ``input_size`` px: fully convolutional, so valid."""
    from gigaslide.models.encoders import create_encoder

    seed_everything(seed)
    enc = create_encoder("resnet18_trunc", weights="random")
    enc.meta = dataclasses.replace(enc.meta, input_size=input_size)
    return enc


def test_batch_normalizer_equals_tile_transform() -> None:
    rng = np.random.default_rng(0)
    tiles = rng.integers(0, 256, size=(5, 40, 40, 3), dtype=np.uint8)  # (B, H, W, 3)
    batch = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous()  # (B, 3, H, W)
    mean, std = (0.6, 0.5, 0.4), (0.2, 0.25, 0.3)
    for size in (40, 24, 64):  # as is, down, up
        tf, bn = TileTransform(size, mean, std), BatchNormalizer(size, mean, std)
        want = torch.stack([tf(t) for t in tiles])  # (B, 3, size, size)
        got = bn(batch)
        assert got.shape == (5, 3, size, size) and got.dtype == torch.float32
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # against the formula (no resize)
    formula = (tiles.transpose(0, 3, 1, 2) / 255.0 - np.array(mean)[:, None, None]) / np.array(std)[
        :, None, None
    ]
    np.testing.assert_allclose(BatchNormalizer(40, mean, std)(batch).numpy(), formula, rtol=1e-5, atol=1e-5)
    assert repr(BatchNormalizer.from_transform(TileTransform(32, mean, std))).startswith("BatchNormalizer(")
    with pytest.raises(ValueError, match="uint8"):
        BatchNormalizer(40)(batch.float())
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        BatchNormalizer(40)(batch[0])
    with pytest.raises(ValueError, match="positive"):
        BatchNormalizer(40, std=(0.2, 0.0, 0.3))


@pytest.mark.parametrize("input_size", [TILE, 32], ids=["no-resize", "resize"])
def test_threads_and_processes_give_equal_features(slide, input_size: int) -> None:
    path, coords, spec = slide
    enc = encoder(input_size)
    threads = extract_features(path, coords, spec, enc, batch_size=7, num_workers=2, loader="threads")
    procs = extract_features(path, coords, spec, enc, batch_size=7, num_workers=0, loader="processes")
    assert threads.shape == (len(coords), 256) and threads.std() > 0
    np.testing.assert_allclose(threads, procs, rtol=0, atol=1e-5)


def test_loader_choice_is_checked(slide) -> None:
    path, coords, spec = slide
    enc = encoder(TILE)

    def flip(tile: np.ndarray) -> torch.Tensor:  # an arbitrary per-tile transform
        return TileTransform(TILE)(np.ascontiguousarray(tile[::-1]))

    with pytest.raises(ValueError, match="loader='processes'"):
        extract_features(path, coords[:2], spec, enc, transform=flip, loader="threads")
    assert extract_features(path, coords[:2], spec, enc, transform=flip, loader="processes").shape == (2, 256)
    with pytest.raises(ValueError, match="loader must be one of"):
        extract_features(path, coords[:2], spec, enc, loader="fibres")
    with pytest.raises(ValueError, match="num_workers"):
        extract_features(path, coords[:2], spec, enc, num_workers=-1)


@pytest.fixture
def tiling(slide, tmp_path) -> Path:
    path, coords, spec = slide
    root = tmp_path / "tiling"
    write_coords(root / "patches" / "s.h5", coords, spec)
    Manifest(root / "manifest.csv").update(
        "s",
        {
            "path": str(path),
            "mpp": 0.5,
            "status": "done",
            "n_tiles": len(coords),
            "coords_file": "patches/s.h5",
        },
    )
    return root


def test_embed_job_resumes_across_loaders(tiling, tmp_path, monkeypatch) -> None:
    enc = encoder(32)
    kw = {"batch_size": 8, "chunk_size": 16, "device": "cpu", "progress": False}
    ref = run_embedding(tiling, enc, tmp_path / "ref", loader="processes", num_workers=0, **kw)
    assert ref.n_done == 1
    real_commit = ChunkedFeatureWriter._commit
    n = {"commits": 0}

    def crash_third(self, n_rows):
        n["commits"] += 1
        if n["commits"] == 3:
            raise RuntimeError("simulated crash")
        real_commit(self, n_rows)

    out = tmp_path / "out"
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", crash_third)
    first = run_embedding(tiling, enc, out, loader="threads", num_workers=2, **kw)
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", real_commit)
    assert first.n_failed == 1 and partial_path_for(out / "h5_files" / "s.h5").exists()
    calls: list[int] = []
    enc.register_forward_hook(lambda m, inp, o: calls.append(int(inp[0].shape[0])))
    second = run_embedding(tiling, enc, out, loader="processes", num_workers=1, **kw)  # same fingerprint
    assert second.n_done == 1 and second.results[0].resumed_from == 32 and sum(calls) == 48 - 32
    want = read_features(tmp_path / "ref" / "h5_files" / "s.h5").features
    np.testing.assert_allclose(read_features(out / "h5_files" / "s.h5").features, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="loader must be one of"):
        run_embedding(tiling, enc, tmp_path / "x", loader="gpu", **kw)


def test_cli_loader_flag(tiling, tmp_path) -> None:
    outs = {}
    for loader in ("threads", "processes"):
        outs[loader] = tmp_path / loader
        rc = main(["embed", str(tiling), "--encoder", "resnet18_trunc", "--weights", "random", "--out",
                   str(outs[loader]), "--loader", loader, "--workers", "1", "--device", "cpu",
                   "--no-progress", "--batch-size", "16"])  # fmt: skip
        assert rc == 0
    a, b = (read_features(outs[k] / "h5_files" / "s.h5").features for k in ("threads", "processes"))
    assert a.shape == (48, 256)
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    with pytest.raises(SystemExit):
        main(
            [
                "embed",
                str(tiling),
                "--encoder",
                "resnet18_trunc",
                "--out",
                str(tmp_path / "z"),
                "--loader",
                "x",
            ]
        )
