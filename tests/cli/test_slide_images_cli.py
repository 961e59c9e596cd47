"""`gigaslide slide-images`: renders a cache, reuses it, reports bad slides and carries on."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from gigaslide.synth import write_synthetic_slide


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "gigaslide", "slide-images", *args], capture_output=True, text=True
    )


def test_render_reuse_and_bad_slide(tmp_path):
    good = write_synthetic_slide(tmp_path / "a.tiff", width=1024, height=768, mpp=0.5, seed=2)
    bad = tmp_path / "b.tiff"
    bad.write_bytes(b"nope")
    res = _cli(str(good), str(bad), "--out", str(tmp_path / "c"), "--size", "128")
    assert res.returncode == 1
    assert "1 rendered, 0 reused, 1 failed" in res.stdout and "failed b:" in res.stderr
    assert np.load(tmp_path / "c" / "a.npy", mmap_mode="r").shape == (128, 128, 3)
    res = _cli(str(good), "--out", str(tmp_path / "c"), "--size", "128")
    assert res.returncode == 0 and "0 rendered, 1 reused" in res.stdout
