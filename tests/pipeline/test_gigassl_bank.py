"""`gigaslide gigassl bank`: file layout, equivalence with `embed`, resume, skip, failures, CLI."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from test_embed_job import TILE, make_tiling_dir, tiny_encoder

from gigaslide.cli.main import main
from gigaslide.data.gigassl_bank import BankWriter, GigaSSLBank
from gigaslide.data.gigassl_views import GigaSSLViews
from gigaslide.data.tile_augment import TileAugment
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.pipeline.gigassl_bank import build_gigassl_bank, draw_views, slide_seed

torch.set_num_threads(1)
IDENTITY = TileAugment(
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip=False,
    rotate90=False,
    jitter_p=0.0,
    gray_p=0.0,
    blur_p=0.0,
)
KW = {"n_aug": 3, "n_tiles": 20, "batch_size": 16, "num_workers": 2, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Path:
    # a: 8 x 6 = 48 tiles; b: 4 x 4 = 16 tiles (< n_tiles: drawn with replacement)
    return make_tiling_dir(tmp_path_factory.mktemp("tiling"), {"a": (1024, 768), "b": (512, 512)})


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    """One frozen random-init encoder for the module (building a ResNet-18 is the slow part)."""
    return tiny_encoder()


def rows(manifest: Path) -> dict[str, dict[str, str]]:
    with manifest.open() as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_bank_layout_and_identity_augmentation_equals_embed(
    tiling: Path, encoder: torch.nn.Module, tmp_path: Path
) -> None:
    summary = build_gigassl_bank(tiling, encoder, tmp_path / "bank", augment=IDENTITY, **KW)
    assert not summary.failed and summary.tiles == 2 * 3 * 20
    embedded = run_embedding(tiling, encoder, tmp_path / "feats", device="cpu", progress=False)
    assert not embedded.failed
    for sid, n_avail in (("a", 48), ("b", 16)):
        with (
            h5py.File(tmp_path / "bank" / "h5_files" / f"{sid}.h5") as f,
            h5py.File(tmp_path / "feats" / "h5_files" / f"{sid}.h5") as g,
        ):
            feats, coords = f["features"][:], f["coords"][:]
            assert feats.shape == (3, 20, 256) and coords.shape == (3, 20, 2)
            attrs = dict(f["features"].attrs)
            assert attrs["n_aug"] == 3 and attrs["n_tiles"] == 20 and attrs["shared"]
            assert attrs["encoder"] == "resnet18_trunc" and attrs["slide_id"] == sid
            assert len(json.loads(attrs["augmentations"])) == 3
            assert f["coords"].attrs["tile_size"] == TILE  # the tile spec travels with the coords
            ref_feats, ref_coords = g["features"][:], g["coords"][:]
        index = {tuple(c): i for i, c in enumerate(ref_coords.tolist())}
        for a in range(3):
            rows_ = [index[tuple(c)] for c in coords[a].tolist()]  # every tile is a tissue tile of the slide
            np.testing.assert_allclose(feats[a], ref_feats[rows_], rtol=1e-4, atol=1e-5)
            assert len(set(rows_)) == (20 if n_avail >= 20 else len(set(rows_)))
        # the draws are those of the documented seed sequence
        expect, _ = draw_views(n_avail, 3, 20, IDENTITY, True, np.random.default_rng(slide_seed(0, sid)))
        np.testing.assert_array_equal(coords, ref_coords[expect])
    bank = GigaSSLBank(tmp_path / "bank")
    batch = GigaSSLViews(bank, batch_size=2, n_tiles=5).batch(0, 0)
    assert batch.features.shape == (2, 2, 5, 256)


def test_shared_and_not_shared_augmentations(tiling: Path, encoder: torch.nn.Module, tmp_path: Path) -> None:
    kw = {**KW, "n_aug": 2}
    build_gigassl_bank(tiling, encoder, tmp_path / "s", slides=None, **kw)
    build_gigassl_bank(tiling, encoder, tmp_path / "ns", shared=False, **kw)
    with (
        h5py.File(tmp_path / "s" / "h5_files" / "a.h5") as f,
        h5py.File(tmp_path / "ns" / "h5_files" / "a.h5") as g,
    ):
        assert f["features"].attrs["shared"] and not g["features"].attrs["shared"]
        assert "augmentations" not in g["features"].attrs
        np.testing.assert_array_equal(f["coords"][:], g["coords"][:])  # same tiles drawn, other augmentations
        assert not np.allclose(f["features"][:], g["features"][:])


def test_resume_inside_a_slide_skip_and_changed_settings(
    tiling: Path, encoder: torch.nn.Module, tmp_path: Path, monkeypatch
) -> None:
    out = tmp_path / "bank"
    ref = tmp_path / "ref"
    build_gigassl_bank(tiling, encoder, ref, **KW)
    calls = {"n": 0}
    original = BankWriter.write

    def flaky(self: BankWriter, features: np.ndarray) -> None:
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated crash")
        original(self, features)

    monkeypatch.setattr(BankWriter, "write", flaky)
    first = build_gigassl_bank(tiling, encoder, out, **KW)
    assert set(first.failed) == {"a"}  # failed on its 2nd augmentation; b carried on
    assert rows(out / "manifest.csv")["b"]["status"] == "done"
    monkeypatch.setattr(BankWriter, "write", original)
    second = build_gigassl_bank(tiling, encoder, out, **KW)
    assert not second.failed
    assert rows(out / "manifest.csv")["a"]["resumed_from"] == "1"
    assert second.tiles == 2 * 20  # two augmentations of a computed, b skipped
    for sid in ("a", "b"):
        with h5py.File(out / "h5_files" / f"{sid}.h5") as f, h5py.File(ref / "h5_files" / f"{sid}.h5") as g:
            np.testing.assert_allclose(f["features"][:], g["features"][:], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
    third = build_gigassl_bank(tiling, encoder, out, **KW)
    assert third.tiles == 0 and not third.failed
    changed = build_gigassl_bank(tiling, encoder, out, **{**KW, "n_aug": 4})
    assert set(changed.failed) == {"a", "b"} and "other settings" in changed.failed["a"]


def test_cli_bank_and_missing_slide(tiling: Path, tmp_path: Path, capsys) -> None:
    broken = make_tiling_dir(tmp_path / "tiles", {"c": (512, 512), "d": (512, 512)})
    (broken / "slides" / "d.tiff").unlink()
    code = main(
        ["gigassl", "bank", str(broken), "--encoder", "resnet18_trunc", "--weights", "random", "--out",
         str(tmp_path / "bank"), "--n-aug", "2", "--n-tiles", "4", "--device", "cpu", "--no-progress"]
    )  # fmt: skip
    assert code == 1
    printed = capsys.readouterr()
    assert printed.err.count("RANDOM") == 1  # one random-weights warning
    assert "FAILED d" in printed.out and "not found" in printed.out  # the summary on stdout
    manifest = rows(tmp_path / "bank" / "manifest.csv")
    assert manifest["c"]["status"] == "done" and manifest["d"]["status"] == "failed"
    with h5py.File(tmp_path / "bank" / "h5_files" / "c.h5") as f:
        assert f["features"].shape == (2, 4, 256)
    assert main(["gigassl", "bank", str(tmp_path / "nowhere"), "--encoder", "resnet18_trunc", "--out",
                 str(tmp_path / "x")]) == 2  # fmt: skip


def test_ranks_share_the_slides_and_merge_their_manifests(
    tiling: Path, encoder: torch.nn.Module, tmp_path: Path
) -> None:
    """Two ranks (run one after the other here; torchrun runs them side by side) bank disjoint slides."""
    from gigaslide.utils.dist import DistInfo

    out = tmp_path / "bank"
    kw = {**KW, "n_aug": 2, "n_tiles": 4}
    results = {}
    for rank in (1, 0):  # rank 0 last: it merges the shard manifests
        info = DistInfo(rank=rank, world_size=2, local_rank=rank, is_distributed=True)
        s = build_gigassl_bank(tiling, encoder, out, dist_info=info, **kw)
        results[rank] = {r.slide_id for r in s.results}
    assert results[0] | results[1] == {"a", "b"} and not results[0] & results[1]
    merged = rows(out / "manifest.csv")
    assert {sid: r["status"] for sid, r in merged.items()} == {"a": "done", "b": "done"}
    assert {merged[sid]["rank"] for sid in results[1]} == {"1"}
    assert not list(out.glob("manifest.rank*.csv"))
    single = tmp_path / "single"
    build_gigassl_bank(tiling, encoder, single, **kw)
    for sid in ("a", "b"):  # a slide's bank does not depend on the rank that made it
        with (
            h5py.File(out / "h5_files" / f"{sid}.h5") as f,
            h5py.File(single / "h5_files" / f"{sid}.h5") as g,
        ):
            np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
            np.testing.assert_allclose(f["features"][:], g["features"][:], rtol=1e-5, atol=1e-6)
