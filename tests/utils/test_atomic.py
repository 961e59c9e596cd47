"""Atomic writes leave either the old file or the complete new one, never a partial file."""

from __future__ import annotations

import pytest

from gigaslide.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text


def test_atomic_write_text_and_bytes(tmp_path) -> None:
    target = tmp_path / "sub" / "a.txt"
    assert atomic_write_text(target, "hello") == target
    assert target.read_text() == "hello"
    atomic_write_bytes(target, b"\x00\x01")
    assert target.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a.txt"]


def test_failure_keeps_old_file_and_removes_temp(tmp_path) -> None:
    target = tmp_path / "a.h5"
    target.write_text("old")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".a.h5.") and tmp.name.endswith(".tmp")
        tmp.write_text("partial")
        raise RuntimeError("boom")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.h5"]


def test_atomic_path_is_invisible_until_done(tmp_path) -> None:
    target = tmp_path / "b.csv"
    with atomic_path(target) as tmp:
        tmp.write_text("x")
        assert not target.exists()
    assert target.read_text() == "x"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_final_file_respects_the_umask(tmp_path, umask) -> None:
    """mkstemp creates 0600; the final file gets 0666 & ~umask like any ordinary write."""
    import os
    import stat

    old = os.umask(umask)
    try:
        target = atomic_write_text(tmp_path / "a.csv", "x")
        with atomic_path(tmp_path / "b.h5") as tmp:  # a writer that recreates the temp file
            tmp.unlink()
            tmp.write_bytes(b"y")
    finally:
        os.umask(old)
    for p in (target, tmp_path / "b.h5"):
        assert stat.S_IMODE(p.stat().st_mode) == 0o666 & ~umask


def test_read_only_folder_names_the_target_not_the_temp_file(tmp_path) -> None:
    import os

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # running as root: permissions are not enforced
            pytest.skip("permissions are not enforced for this user")
        with pytest.raises(PermissionError) as e:
            atomic_write_text(ro / "manifest.csv", "x")
    finally:
        ro.chmod(0o755)
    msg = str(e.value)
    assert f"cannot write {ro / 'manifest.csv'}" in msg and ".tmp" not in msg
