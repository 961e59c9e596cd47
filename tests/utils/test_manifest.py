"""Manifest: keyed CSV rows persisted after every update, reloaded by a rerun."""

from __future__ import annotations

import csv

from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED, Manifest


def test_update_persists_and_reloads(tmp_path) -> None:
    path = tmp_path / "manifest.csv"
    m = Manifest(path, columns=["slide_id", "status", "n_tiles", "error"])
    m.update("a", {"status": STATUS_DONE, "n_tiles": 12})
    m.update("b", {"status": STATUS_FAILED, "error": "SlideReadError: bad, file", "extra": None})
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["slide_id"] for r in rows] == ["a", "b"]
    assert rows[0]["n_tiles"] == "12" and rows[1]["error"] == "SlideReadError: bad, file"
    assert list(rows[0]) == ["slide_id", "status", "n_tiles", "error", "extra"]

    again = Manifest(path)
    assert again.is_done("a") and not again.is_done("b") and again.status("zzz") is None
    assert again.failed() == {"b": "SlideReadError: bad, file"}
    again.update("b", {"status": STATUS_DONE, "error": ""})
    assert Manifest(path).failed() == {} and len(Manifest(path)) == 2
    assert [p.name for p in tmp_path.iterdir()] == ["manifest.csv"]
