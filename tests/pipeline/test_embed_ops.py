"""`gigaslide embed`/`tile` operations: damaged files recomputed, a tiling folder where every slide
failed, one run per output folder, outputs readable under the umask."""

from __future__ import annotations

import csv
import logging
import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.features_io import read_features
from gigaslide.pipeline.embed_inputs import EmbedInputError, discover_jobs
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.utils.manifest import Manifest


@pytest.fixture(scope="module")
def tiling(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """`gigaslide tile` on two small synthetic slides, 64 px tiles at 2 um/px (few tiles)."""
    from gigaslide.synth import write_synthetic_slide

    root = tmp_path_factory.mktemp("ops")
    for i in range(2):
        write_synthetic_slide(root / "slides" / f"s{i}.tiff", width=768, height=512, seed=i)
    old = os.umask(0o022)
    try:
        rc = main(["tile", str(root / "slides"), "--out", str(root / "tiles"), "--tile-size", "64",
                   "--target-mpp", "2", "--min-tissue", "0.05", "--no-progress", "--outlines"])  # fmt: skip
    finally:
        os.umask(old)
    assert rc == 0
    return root / "tiles"


def _encoder() -> torch.nn.Module:
    import dataclasses

    from gigaslide.models.encoders import create_encoder
    from gigaslide.utils.seed import seed_everything

    seed_everything(0)
    enc = create_encoder("resnet18_trunc", weights="random")
    enc.meta = dataclasses.replace(enc.meta, input_size=64)
    return enc


def test_tiling_outputs_respect_the_umask(tiling: Path) -> None:
    files = [tiling / "manifest.csv", *(tiling / "patches").glob("*.h5"), *(tiling / "tissue").glob("*")]
    assert len(files) >= 5
    for f in files:  # 0644 under umask 022: colleagues can read the results (mkstemp alone gives 0600)
        assert stat.S_IMODE(f.stat().st_mode) == 0o644, f


def test_damaged_feature_file_is_recomputed(tiling: Path, tmp_path: Path, caplog) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "feats"
    first = run_embedding(tiling, _encoder(), out, batch_size=32, device="cpu", progress=False)
    assert first.n_done == 2
    final = out / "h5_files" / "s0.h5"
    good = read_features(final).features.copy()
    assert stat.S_IMODE(final.stat().st_mode) == 0o666 & ~_umask()
    final.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # truncated (a full disk, a kill)
    with caplog.at_level(logging.WARNING, logger="gigaslide.pipeline.embed_job"):
        again = run_embedding(tiling, _encoder(), out, batch_size=32, device="cpu", progress=False)
    assert again.n_failed == 0 and again.n_done == 1 and again.n_skipped == 1
    assert f"{final} is damaged (unreadable" in caplog.text and "another encoder" not in caplog.text
    np.testing.assert_array_equal(read_features(final).features, good)
    rows = {r["slide_id"]: r for r in csv.DictReader((out / "manifest.csv").open())}
    assert rows["s0"]["status"] == rows["s1"]["status"] == "done"  # the manifest agrees with the files


def _umask() -> int:
    from gigaslide.utils.atomic import current_umask

    return current_umask()


def test_tiling_folder_where_every_slide_failed(tmp_path: Path, capsys) -> None:
    root = tmp_path / "tiles"
    m = Manifest(root / "manifest.csv")
    m.update("a", {"path": "/x/a.svs", "status": "failed", "error": "SlideReadError: cannot open a.svs"})
    m.update("b", {"path": "/x/b.svs", "status": "failed", "error": "NoTissueError: no tissue"})
    with pytest.raises(EmbedInputError) as e:
        discover_jobs(root)
    msg = str(e.value)
    assert msg.startswith(f"{root}: every slide of this tiling output failed to tile (2 slide(s);")
    assert "cannot open a.svs" in msg and "rerun `gigaslide tile`" in msg and "not a tiling output" not in msg
    rc = main(
        [
            "embed",
            str(root),
            "--encoder",
            "resnet18_trunc",
            "--weights",
            "random",
            "--out",
            str(tmp_path / "f"),
        ]
    )
    assert rc == 2 and "every slide of this tiling output failed" in capsys.readouterr().err


def test_second_embed_into_a_busy_folder_refuses(tiling: Path, tmp_path: Path, capsys) -> None:
    from gigaslide.utils.lock import OutputLock

    out = tmp_path / "feats"
    with OutputLock(out, "gigaslide embed tiles --out feats"):
        rc = main(["embed", str(tiling), "--encoder", "resnet18_trunc", "--weights", "random",
                   "--out", str(out), "--device", "cpu", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and f"output folder {out} is in use by pid {os.getpid()}" in err
    assert not (out / "manifest.csv").exists() and not (out / "h5_files").exists()  # nothing touched
