"""User mistakes end with one clear line on stderr and exit status 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from gigaslide.cli.main import main


def _tiling_dir(tmp_path: Path) -> Path:
    from gigaslide.synth import write_synthetic_slide

    slides = tmp_path / "slides"
    write_synthetic_slide(slides / "s0.tiff", width=768, height=768, seed=0)
    out = tmp_path / "tiles"
    assert main(["tile", str(slides), "--out", str(out), "--tile-size", "128", "--no-progress"]) == 0
    return out


def test_unknown_encoder_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiles = _tiling_dir(tmp_path)
    capsys.readouterr()
    code = main(["embed", str(tiles), "--encoder", "no_such_encoder", "--out", str(tmp_path / "f")])
    err = capsys.readouterr().err
    assert code == 2
    assert "gigaslide embed: error: unknown encoder 'no_such_encoder'" in err and "resnet50_trunc" in err
    assert "Traceback" not in err


def test_missing_weights_file_names_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiles = _tiling_dir(tmp_path)
    capsys.readouterr()
    missing = tmp_path / "nope.pth"
    code = main(["embed", str(tiles), "--encoder", "resnet18_trunc", "--weights", str(missing), "--out", str(tmp_path / "f")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "nope.pth" in err and "Traceback" not in err


def test_convert_missing_source(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["convert", str(tmp_path / "nope"), "--out", str(tmp_path / "x"), "--to", "clam"])
    err = capsys.readouterr().err
    assert code == 2 and "nope" in err and "error" in err


def test_verbose_shows_the_traceback(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown encoder"):
        main(["-v", "embed", str(tmp_path), "--encoder", "no_such_encoder", "--out", str(tmp_path / "f")])
