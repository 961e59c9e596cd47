"""Batch embedding job: output files, attributes, resume inside a slide, failures, CLI, torchrun sharding."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from embed_synthetic import TARGET_MPP, TILE, make_tiling_dir, tiny_encoder

from gigaslide.cli.main import main
from gigaslide.data.feature_writer import ChunkedFeatureWriter, partial_path_for
from gigaslide.data.features_io import read_features
from gigaslide.pipeline.embed_job import discover_jobs, run_embedding
from gigaslide.preprocess.coords_io import write_coords
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.utils.manifest import Manifest
from gigaslide.utils.seed import seed_everything


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Path:
    return make_tiling_dir(tmp_path_factory.mktemp("tiling"), {"a": (1024, 768), "b": (512, 512)})


def count_rows(encoder: torch.nn.Module) -> list[int]:
    """Record the batch size of every encoder call."""
    calls: list[int] = []
    encoder.register_forward_hook(lambda m, inp, out: calls.append(int(inp[0].shape[0])))
    return calls


def test_outputs_attributes_and_skip(tiling, tmp_path):
    enc = tiny_encoder()
    calls = count_rows(enc)
    out = tmp_path / "feats"
    s = run_embedding(
        tiling, enc, out, batch_size=16, chunk_size=32, device="cpu", save_pt=True, progress=False
    )
    assert s.n_done == 2 and s.n_failed == 0 and s.random_init
    n_a = 48  # 8 x 6 tiles of 128 level-0 px on 1024 x 768
    assert sum(calls) == n_a + 16
    bag = read_features(out / "h5_files" / "a.h5")
    assert bag.features.shape == (n_a, 256) and bag.features.dtype == np.float32
    with h5py.File(tiling / "patches" / "a.h5") as f:
        np.testing.assert_array_equal(bag.coords, f["coords"][:])
        spec_attr = f["coords"].attrs["gigaslide_spec"]
    with h5py.File(out / "h5_files" / "a.h5") as f:  # CLAM/TRIDENT-style access
        assert f["features"][:].shape == (n_a, 256) and f["coords"].dtype == np.int64
        assert f["coords"].attrs["gigaslide_spec"] == spec_attr
    a = bag.attrs
    assert a["encoder"] == "resnet18_trunc" and a["weights"] == "RANDOM-INIT" and a["random_init"]
    assert a["embed_dim"] == 256 and a["precision"] == "fp32" and a["tile_size"] == TILE
    assert a["target_mpp"] == pytest.approx(TARGET_MPP) and len(a["weights_sha256"]) == 64
    assert a["gigaslide_version"]
    pt = torch.load(out / "pt_files" / "a.pt", weights_only=True)
    np.testing.assert_array_equal(pt.numpy(), bag.features)
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["a"]["status"] == "done" and rows["a"]["n_tiles"] == str(n_a) and rows["a"]["dim"] == "256"
    assert float(rows["a"]["tiles_per_s"]) > 0 and rows["a"]["features_file"].endswith("a.h5")
    # rerun: nothing recomputed, manifest rows kept
    calls.clear()
    again = run_embedding(tiling, enc, out, batch_size=16, chunk_size=32, device="cpu", progress=False)
    assert calls == [] and again.n_skipped == 2 and again.n_done == 0
    assert next(csv.DictReader((out / "manifest.csv").open()))["tiles_per_s"] == rows["a"]["tiles_per_s"]
    # other weights into the same folder: refused per slide, never mixed
    other = run_embedding(tiling, tiny_encoder(seed=1), out, device="cpu", progress=False)
    assert other.n_failed == 2 and "another encoder" in other.failed["a"]


def test_resume_inside_a_slide_matches_uninterrupted_run(tiling, tmp_path, monkeypatch):
    enc = tiny_encoder()
    ref = run_embedding(
        tiling, enc, tmp_path / "ref", batch_size=8, chunk_size=16, device="cpu", progress=False
    )
    assert ref.n_failed == 0
    calls = count_rows(enc)
    real_commit = ChunkedFeatureWriter._commit
    n_commits = {"n": 0}

    def failing_commit(self, n_rows):
        n_commits["n"] += 1
        if n_commits["n"] == 3 and self.final_path.stem == "a":
            raise RuntimeError("simulated crash after the 2nd chunk")
        real_commit(self, n_rows)

    out = tmp_path / "resumed"
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", failing_commit)
    first = run_embedding(tiling, enc, out, batch_size=8, chunk_size=16, device="cpu", progress=False)
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", real_commit)
    assert first.failed.keys() == {"a"} and "simulated crash" in first.failed["a"]
    assert partial_path_for(out / "h5_files" / "a.h5").exists() and not (out / "h5_files" / "a.h5").exists()
    calls.clear()
    second = run_embedding(tiling, enc, out, batch_size=8, chunk_size=16, device="cpu", progress=False)
    assert second.n_done == 1 and second.n_skipped == 1 and second.n_failed == 0
    assert sum(calls) == 48 - 32  # only the rows after the two committed chunks
    res = {r.slide_id: r for r in second.results}
    assert res["a"].resumed_from == 32 and res["a"].computed == 16
    for sid in ("a", "b"):
        want = read_features(tmp_path / "ref" / "h5_files" / f"{sid}.h5").features
        np.testing.assert_array_equal(read_features(out / "h5_files" / f"{sid}.h5").features, want)
    assert not partial_path_for(out / "h5_files" / "a.h5").exists()


def test_partial_with_other_fingerprint_is_discarded(tiling, tmp_path, monkeypatch, caplog):
    out = tmp_path / "o"
    real_commit = ChunkedFeatureWriter._commit
    n_commits = {"n": 0}

    def crash_second(self, n_rows):  # slide a keeps one committed chunk of 8 rows, b none
        n_commits["n"] += 1
        if n_commits["n"] > 1:
            raise RuntimeError("simulated crash")
        real_commit(self, n_rows)

    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", crash_second)
    run_embedding(tiling, tiny_encoder(0), out, batch_size=8, chunk_size=8, device="cpu", progress=False)
    monkeypatch.setattr(ChunkedFeatureWriter, "_commit", real_commit)
    with h5py.File(partial_path_for(out / "h5_files" / "a.h5")) as f:
        assert f.attrs["gigaslide_rows_done"] == 8
    enc = tiny_encoder(1)  # other random weights -> other fingerprint
    calls = count_rows(enc)
    with caplog.at_level(logging.WARNING):
        s = run_embedding(tiling, enc, out, batch_size=8, chunk_size=8, device="cpu", progress=False)
    assert s.n_failed == 0 and "fingerprint mismatch" in caplog.text
    assert sum(calls) == 48 + 16  # everything recomputed


def test_bad_slide_is_recorded_and_cli_exits_1(tmp_path, shared_data, capsys):
    root = make_tiling_dir(tmp_path / "t", {"good": (512, 384)}, tile=64)
    spec = TileSpec.from_attrs(dict(h5py.File(root / "patches" / "good.h5")["coords"].attrs))
    write_coords(root / "patches" / "bad.h5", np.zeros((3, 2), np.int64), spec)
    Manifest(root / "manifest.csv").update(
        "bad",
        {
            "path": str(shared_data / "broken.svs"),
            "mpp": 0.5,
            "status": "done",
            "coords_file": "patches/bad.h5",
        },
    )
    out = tmp_path / "out"
    rc = main(["embed", str(root), "--encoder", "resnet18_trunc", "--weights", "random", "--out", str(out),
               "--workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "8"])  # fmt: skip
    assert rc == 1
    printed = capsys.readouterr()
    err, out_text = printed.err, printed.out
    assert err.count("RANDOM WEIGHTS: features are not meaningful") == 1 and err.count("RANDOM") == 1  # once
    assert "1 failed" in out_text and "FAILED bad" in out_text and "broken.svs" in out_text  # summary: stdout
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["good"]["status"] == "done" and rows["bad"]["status"] == "failed" and rows["bad"]["error"]
    assert read_features(out / "h5_files" / "good.h5").features.shape == (4, 256)
    assert not (out / "h5_files" / "bad.h5").exists()


def test_clam_trident_patches_folder_needs_slides(tiling, tmp_path):
    pdir = tmp_path / "trident_patches"
    pdir.mkdir()
    for sid in ("a", "b"):
        (pdir / f"{sid}_patches.h5").write_bytes((tiling / "patches" / f"{sid}.h5").read_bytes())
    with pytest.raises(ValueError, match="pass --slides"):
        discover_jobs(pdir)
    jobs = discover_jobs(pdir, slides=tiling / "slides")
    assert [(j.slide_id, j.slide_path.name, j.n_tiles, j.error) for j in jobs] == [
        ("a", "a.tiff", 48, ""), ("b", "b.tiff", 16, "")
    ]  # fmt: skip
    jobs = discover_jobs(pdir, slides=tmp_path / "trident_patches" / "a_patches.h5")  # not a slide of 'b'
    assert "no slide named 'b'" in next(j.error for j in jobs if j.slide_id == "b")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="run `gigaslide tile` first"):
        discover_jobs(tmp_path / "empty")


def test_slide_not_found_messages_point_to_slides_option(tiling, tmp_path):
    pdir = tmp_path / "clam_patches"
    pdir.mkdir()
    (pdir / "b.h5").write_bytes((tiling / "patches" / "b.h5").read_bytes())
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "a.tiff").write_bytes((tiling / "slides" / "a.tiff").read_bytes())
    [job] = discover_jobs(pdir, slides=tmp_path / "other")
    assert job.slide_path is None
    assert "--slides DIR_OR_CSV" in job.error and "b.<ext>" in job.error and "b.h5" in job.error
    # a tiling output whose slides moved: the missing file is named with the same fix
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "patches").mkdir()
    (moved / "patches" / "b.h5").write_bytes((tiling / "patches" / "b.h5").read_bytes())
    Manifest(moved / "manifest.csv").update(
        "b", {"path": str(tmp_path / "gone" / "b.tiff"), "status": "done", "coords_file": "patches/b.h5"}
    )
    [job] = discover_jobs(moved)
    assert "gone/b.tiff" in job.error and "not found" in job.error and "--slides DIR_OR_CSV" in job.error
    [job] = discover_jobs(moved, slides=tiling / "slides")  # the fix works
    assert job.error == "" and job.slide_path == tiling / "slides" / "b.tiff"


def test_half_precision_on_cpu_warns(tmp_path, caplog):
    root = make_tiling_dir(tmp_path / "t", {"s": (128, 128)})  # one 32 px tile
    with caplog.at_level(logging.WARNING, logger="gigaslide.pipeline.extract"):
        s = run_embedding(
            root, tiny_encoder(), tmp_path / "o16", precision="bf16", device="cpu", progress=False
        )
    assert s.n_done == 1
    msgs = [r.getMessage() for r in caplog.records if "precision" in r.getMessage()]
    assert len(msgs) == 1 and "bf16 on a CPU" in msgs[0] and "slower" in msgs[0] and "fp32" in msgs[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="gigaslide.pipeline.extract"):
        run_embedding(root, tiny_encoder(), tmp_path / "o32", precision="fp32", device="cpu", progress=False)
    assert not [r for r in caplog.records if "precision" in r.getMessage()]


@pytest.mark.distributed
def test_torchrun_two_ranks_cover_each_slide_once(tmp_path):
    root = make_tiling_dir(tmp_path / "t", {"s1": (512, 384), "s2": (384, 256), "s3": (256, 256)}, tile=64)
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gigaslide", "embed", str(root), "--encoder", "resnet18_trunc", "--weights", "random",
           "--out", str(out), "--workers", "0", "--device", "cpu", "--no-progress", "--batch-size", "4"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    rows = list(csv.DictReader((out / "manifest.csv").open()))
    assert sorted(r["slide_id"] for r in rows) == ["s1", "s2", "s3"]
    assert all(r["status"] == "done" for r in rows)
    assert {r["rank"] for r in rows} == {"0", "1"}  # both ranks worked, each slide once
    assert not list(out.glob("manifest.rank*.csv"))
    # same seed on every rank: identical to a single-process run
    seed_everything(0)
    from gigaslide.models.encoders import create_encoder

    ref = run_embedding(root, create_encoder("resnet18_trunc", weights="random"), tmp_path / "ref",
                        batch_size=4, device="cpu", progress=False)  # fmt: skip
    assert ref.n_done == 3
    for sid in ("s1", "s2", "s3"):
        got = read_features(out / "h5_files" / f"{sid}.h5").features
        np.testing.assert_allclose(got, read_features(tmp_path / "ref" / "h5_files" / f"{sid}.h5").features,
                                   rtol=1e-5, atol=1e-6)  # fmt: skip


def test_resolution_mismatch_warns_once(tiling, tmp_path, caplog):
    enc = tiny_encoder()  # resnet18_trunc expects 1.0 um/px; the tiles are at 2.0 um/px
    with caplog.at_level(logging.WARNING, logger="gigaslide.pipeline.embed_job"):
        run_embedding(tiling, enc, tmp_path / "f", device="cpu", progress=False)
    msgs = [r.getMessage() for r in caplog.records if "expects" in r.getMessage()]
    assert len(msgs) == 1
    assert "2 um/px" in msgs[0] and "1 um/px" in msgs[0] and "--target-mpp 1" in msgs[0]


def _clam_file(path: Path, coords: list, level: int, ds: float, level_dim: tuple[int, int]) -> None:
    """A coordinate file as CLAM's create_patches_fp writes it (no physical resolution)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        d = f.create_dataset("coords", data=np.asarray(coords, dtype=np.int64))
        for k, v in {"patch_size": 64, "patch_level": level, "downsample": np.array([ds, ds]),
                     "downsampled_level_dim": np.array(level_dim), "level_dim": np.array(level_dim)}.items():  # fmt: skip
            d.attrs[k] = v


def test_clam_coords_take_the_slide_metadata_mpp(shared_data, tmp_path, caplog):
    pdir, slides = tmp_path / "clam", tmp_path / "slides"
    slides.mkdir()
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        (slides / name).symlink_to(shared_data / name)
    _clam_file(pdir / "cmu-1-small-region.h5", [[512, 512], [1024, 1024]], 0, 1.0, (2220, 2967))
    _clam_file(pdir / "tcga-cr-7395-01a-01-ts1.h5", [[0, 0], [2048, 1536]], 1, 2.0, (2221, 1783))

    def target_mpp(out: Path, sid: str) -> float:
        with h5py.File(out / "h5_files" / f"{sid}.h5") as f:
            return float(f["features"].attrs["target_mpp"])

    with caplog.at_level(logging.WARNING, logger="gigaslide.pipeline.embed_job"):
        s = run_embedding(pdir, tiny_encoder(), tmp_path / "o1", slides=slides, device="cpu", progress=False)
    assert s.n_done == 2 and s.n_failed == 0
    assert target_mpp(tmp_path / "o1", "cmu-1-small-region") == pytest.approx(0.499)  # from its metadata
    assert np.isnan(target_mpp(tmp_path / "o1", "tcga-cr-7395-01a-01-ts1"))  # no metadata mpp
    msgs = [r.getMessage() for r in caplog.records]
    assert any("cmu-1-small-region: tiles are at 0.499 um/px" in m and "expects 1 um/px" in m for m in msgs)
    [unknown] = [m for m in msgs if "no mpp metadata" in m]
    assert "tcga-cr-7395-01a-01-ts1.svs" in unknown and "--slide-mpp" in unknown
    # --slide-mpp fills in for the slide without metadata (level 1 of 0.25 um/px: 0.5 um/px tiles)
    s = run_embedding(pdir, tiny_encoder(), tmp_path / "o2", slides=slides, slide_mpp=0.25, device="cpu",
                      progress=False)  # fmt: skip
    assert s.n_done == 2
    assert target_mpp(tmp_path / "o2", "tcga-cr-7395-01a-01-ts1") == pytest.approx(0.5)
    assert target_mpp(tmp_path / "o2", "cmu-1-small-region") == pytest.approx(0.499)  # metadata wins
