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
