"""`gigaslide heatmap`: refuses scores of another slide, draws matching ones; has a description."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from gigaslide.cli.heatmap import add_parser
from gigaslide.cli.main import main
from gigaslide.eval.heatmap import write_attention
from gigaslide.preprocess.tiling_spec import TileSpec
from gigaslide.synth import write_synthetic_slide


@pytest.fixture(scope="module")
def slides(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("heat")
    for i in (3, 5):
        write_synthetic_slide(d / f"slide_00{i}.tiff", width=512, height=384, mpp=0.5, seed=i, tile_size=128)
    spec = TileSpec.create(
        tile_size=128, target_mpp=0.5, slide_mpp=0.5, level_downsamples=[1.0], level0_dims=(512, 384)
    )
    xs, ys = np.meshgrid(np.arange(0, 512, 128), np.arange(0, 384, 128))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (12, 2)
    scores = np.arange(len(coords), dtype=np.float32)
    write_attention(d / "attention" / "slide_003.h5", coords, scores, spec=spec, slide_id="slide_003")
    write_attention(d / "attention" / "far.h5", coords + 2000, scores, spec=spec, slide_id="slide_003")
    return d


def _heatmap(d: Path, slide: str, scores: str, out: Path, *extra: str) -> int:
    argv = [
        "heatmap",
        "--slide",
        str(d / slide),
        "--scores",
        str(d / "attention" / scores),
        "--out",
        str(out),
    ]
    return main([*argv, "--max-size", "256", *extra])


def test_heatmap_refuses_scores_of_another_slide(slides: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.png"
    assert _heatmap(slides, "slide_005.tiff", "slide_003.h5", out) == 2
    err = capsys.readouterr().err
    assert "slide 'slide_003'" in err and "slide_005.tiff" in err and "--force" in err
    assert not out.exists()
    # --force draws anyway; the matching slide draws without it
    assert _heatmap(slides, "slide_005.tiff", "slide_003.h5", out, "--force") == 0
    assert Image.open(out).size == (256, 192)
    assert _heatmap(slides, "slide_003.tiff", "slide_003.h5", tmp_path / "ok.png") == 0


def test_heatmap_refuses_tiles_outside_the_slide(slides: Path, tmp_path: Path, capsys) -> None:
    assert _heatmap(slides, "slide_003.tiff", "far.h5", tmp_path / "f.png", "--force") == 2
    err = capsys.readouterr().err
    assert "12 of 12 tile(s) lie outside" in err and "512 x 384" in err
    assert not (tmp_path / "f.png").exists()


def test_heatmap_parser_has_a_description() -> None:
    parser = add_parser(argparse.ArgumentParser().add_subparsers())
    assert parser.description and "--force" in parser.description and "attention" in parser.description
