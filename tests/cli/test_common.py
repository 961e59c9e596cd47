"""Output paths of the CLI: folders that are files, read-only folders, file outputs given as folders."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from gigaslide.cli.common import HelpFormatter, check_output_folder, output_file
from gigaslide.utils.errors import UserError


def test_output_folder_checks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert (
        check_output_folder(tmp_path / "a" / "b") == tmp_path / "a" / "b" and (tmp_path / "a" / "b").is_dir()
    )
    (tmp_path / "f").write_text("x")
    with pytest.raises(UserError, match=r"--out .*/f is a file; --out must be a folder"):
        check_output_folder(tmp_path / "f")
    with pytest.raises(UserError, match=r"--out .*/f/sub: .*/f is a file, not a folder"):
        check_output_folder(tmp_path / "f" / "sub")
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if Path(p) == tmp_path / "ro" else real_access(p, mode)
    )
    (tmp_path / "ro").mkdir()
    with pytest.raises(UserError) as e:  # names --out, never a hidden temporary file
        check_output_folder(tmp_path / "ro")
    assert (
        str(e.value)
        == f"--out {tmp_path / 'ro'} is not writable (permission denied); choose a writable folder"
    )


def test_output_file_accepts_a_folder(tmp_path: Path) -> None:
    assert output_file(tmp_path / "x.png", "d.png") == tmp_path / "x.png"
    assert output_file(f"{tmp_path / 'new'}/", "d.png") == tmp_path / "new" / "d.png"  # trailing slash
    assert (tmp_path / "new").is_dir()
    assert output_file(tmp_path, "d.png") == tmp_path / "d.png"  # an existing folder


def test_help_formatter_skips_unset_defaults() -> None:
    import argparse

    p = argparse.ArgumentParser(formatter_class=HelpFormatter)
    p.add_argument("--a", type=int, default=3, help="alpha")
    p.add_argument("--b", default=None, help="beta")
    p.add_argument("--c", action="store_true", help="gamma")
    p.add_argument("--d", default=5, help="delta (default 5)")
    text = " ".join(p.format_help().split())
    assert "alpha (default: 3)" in text and "beta --c" in text and "gamma --d" in text
    assert "delta (default 5) " in text + " " and "(default: 5)" not in text
