"""Region embedding over several ranks: torchrun (2 gloo processes) and in-process rank sharding
give the files of a one-process run, with one merged manifest and no rank leftovers."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.data.region_features import read_region_features
from gigaslide.models.encoders import create_encoder
from gigaslide.pipeline.inputs import SlideInput
from gigaslide.pipeline.region_embed import run_region_embedding
from gigaslide.pipeline.tile_job import run_tiling
from gigaslide.utils.dist import DistInfo
from gigaslide.utils.seed import seed_everything

torch.set_num_threads(1)

ENCODER = "vit_tiny_d4"
SLIDES = {"r0": (1024, 768), "r1": (512, 512), "r2": (768, 512)}  # 4, 1 and 2 regions of 512 px


@pytest.fixture(scope="module")
def tiling(tmp_path_factory) -> Path:
    from gigaslide.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("cohort")
    slides = [
        SlideInput(sid, write_synthetic_slide(d / f"{sid}.tiff", width=w, height=h, mpp=0.5, seed=i))
        for i, (sid, (w, h)) in enumerate(SLIDES.items())
    ]
    run_tiling(slides, d / "tiles", tile_size=256, region_size=512, region_min_tissue=0.0, progress=False)
    return d / "tiles"


def encoder() -> torch.nn.Module:
    """The CLI's encoder for `--encoder vit_tiny_d4 --weights random --seed 0`: a small ViT stand-in for
    ViT_256 (192-d CLS token of each 256 px patch; position embeddings interpolated from 128 px)."""
    seed_everything(0)
    return create_encoder(ENCODER, weights="random", warn_random=False)


@pytest.fixture(scope="module")
def reference(tiling: Path, tmp_path_factory) -> Path:
    """A one-process run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    s = run_region_embedding(tiling, encoder(), out, device="cpu", progress=False)
    assert s.n_done == len(SLIDES) and s.n_failed == 0
    return out


def assert_same_outputs(got: Path, ref: Path) -> None:
    names = sorted(p.name for p in (ref / "h5_files").iterdir())
    assert names == [f"{sid}.h5" for sid in SLIDES]
    assert sorted(p.name for p in (got / "h5_files").iterdir()) == names
    for name in names:
        a, b = read_region_features(got / "h5_files" / name), read_region_features(ref / "h5_files" / name)
        assert a.features.shape == (len(a.coords), 4, 192) and a.attrs["random_init"]
        np.testing.assert_array_equal(a.coords, b.coords)
        np.testing.assert_array_equal(a.patch_mask, b.patch_mask)
        np.testing.assert_allclose(a.features, b.features, rtol=1e-6, atol=1e-6)
        assert a.attrs["fingerprint"] == b.attrs["fingerprint"]  # same weights, regions and settings
    assert not list(got.glob("manifest.rank*.csv"))
    assert not list(got.glob(".partial/*"))


def manifest_rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


@pytest.mark.distributed
def test_torchrun_two_ranks_match_one_process(tiling: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "dist"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).resolve().parents[2] / "src"),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "gigaslide", "embed", str(tiling), "--regions", "--encoder", ENCODER, "--weights", "random",
           "--out", str(out), "--device", "cpu", "--no-progress"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun and both ranks
        proc.communicate()
        raise
    assert proc.returncode == 0, stderr[-3000:]
    assert "all ranks: 0 slide(s) failed" in stdout
    rows = manifest_rows(out / "manifest.csv")
    assert sorted(rows) == sorted(SLIDES) and {r["status"] for r in rows.values()} == {"done"}
    assert {r["rank"] for r in rows.values()} == {"0", "1"}  # both ranks worked, each slide once
    assert {sid: int(r["n_tiles"]) for sid, r in rows.items()} == {"r0": 4, "r1": 1, "r2": 2}
    assert_same_outputs(out, reference)


def test_ranks_share_the_slides_resume_and_merge(tiling: Path, reference: Path, tmp_path: Path) -> None:
    """Rank sharding as under torchrun (ranks run one after the other; barriers are no-ops)."""
    out, mine = tmp_path / "ranks", {}
    for rank in (1, 0):  # rank 0 last: it merges the rank manifests
        info = DistInfo(rank=rank, world_size=2, local_rank=0, is_distributed=True)
        s = run_region_embedding(tiling, encoder(), out, device="cpu", progress=False, dist_info=info)
        mine[rank] = {r.slide_id for r in s.results}
        assert s.n_done == len(mine[rank]) and s.n_failed == 0
        if rank == 1:  # rank 1's rows wait in its own manifest for rank 0 to merge
            assert set(manifest_rows(out / "manifest.rank1.csv")) == mine[1]
            assert not (out / "manifest.csv").exists()
    assert mine == {0: {"r0"}, 1: {"r1", "r2"}}  # greedy on region counts: 4 | 2 + 1
    rows = manifest_rows(out / "manifest.csv")
    assert {sid: r["rank"] for sid, r in rows.items()} == {"r0": "0", "r1": "1", "r2": "1"}
    assert_same_outputs(out, reference)
    # a rerun finds every slide done: finished slides cost nothing, so rank 0 takes (and skips) them all
    info = DistInfo(rank=0, world_size=2, local_rank=0, is_distributed=True)
    again = run_region_embedding(tiling, encoder(), out, device="cpu", progress=False, dist_info=info)
    assert again.n_skipped == 3 and again.n_done == 0
    assert manifest_rows(out / "manifest.csv") == rows  # the original rows (timings, ranks) are kept
