"""Cohort: label CSV + feature folder, and every documented input error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.data.cohort import Cohort, CohortError, format_ids
from gigaslide.data.features_io import write_features


def _write(root: Path, rows: list[dict], n_tiles: int = 5, dim: int = 4, layout: str = "h5_files") -> Path:
    """Write a label CSV plus one feature file per row; returns the CSV path."""
    rng = np.random.default_rng(0)
    for r in rows:
        feats = rng.normal(size=(n_tiles, dim)).astype(np.float32)
        coords = np.stack([np.arange(n_tiles) * 256, np.zeros(n_tiles)], axis=1)
        if layout == "pt":
            torch.save(torch.from_numpy(feats), root / f"{r['slide_id']}.pt")
        else:
            sub = root / "h5_files" if layout == "h5_files" else root
            write_features(sub / f"{r['slide_id']}.h5", feats, coords)
    csv = root / "labels.csv"
    pd.DataFrame(rows).to_csv(csv, index=False)
    return csv


def _rows(n: int, labels=("a", "b")) -> list[dict]:
    return [{"slide_id": f"s{i}", "case_id": f"c{i}", "label": labels[i % len(labels)]} for i in range(n)]


def test_loads_and_maps_string_labels(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(4, labels=("tumor", "normal")))
    c = Cohort(csv, tmp_path)
    assert c.class_names == ["normal", "tumor"]  # sorted
    assert c.label_map() == {"normal": 0, "tumor": 1}
    assert [s.label for s in c.samples()] == [1, 0, 1, 0]
    assert c.dim == 4 and len(c) == 4
    bag = c.load("s1")
    assert bag.features.shape == (5, 4) and bag.coords.shape == (5, 2)


def test_classes_order_and_numeric_labels(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(4, labels=("b", "a")))
    c = Cohort(csv, tmp_path, classes=["b", "a"])
    assert [s.label for s in c.samples()] == [0, 1, 0, 1]
    d = tmp_path / "num"
    d.mkdir()
    csv = _write(d, _rows(4, labels=(10, 2)))
    c = Cohort(csv, d)
    assert c.class_names == ["2", "10"]  # numeric order, not string order
    assert [s.label for s in c.samples()] == [1, 0, 1, 0]


def test_cache_modes_give_same_features(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(3))
    ref = Cohort(csv, tmp_path, cache="memory").load("s2").features
    for mode in ("lazy", "mmap"):
        got = Cohort(csv, tmp_path, cache=mode).load("s2").features
        np.testing.assert_array_equal(np.asarray(got), ref)
    assert isinstance(Cohort(csv, tmp_path, cache="mmap").load("s2").features, np.memmap)


@pytest.mark.parametrize("layout", ["flat", "pt"])
def test_flat_folder_and_pt_files(tmp_path: Path, layout: str) -> None:
    csv = _write(tmp_path, _rows(2), layout=layout)
    c = Cohort(csv, tmp_path)
    assert c.load("s0").features.shape == (5, 4)
    assert (c.load("s0").coords is None) == (layout == "pt")


def test_missing_columns(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(2))
    with pytest.raises(CohortError, match=r"missing column\(s\) \['time', 'event'\]") as e:
        Cohort(csv, tmp_path, task="survival")
    assert str(csv) in str(e.value)
    pd.DataFrame({"slide_id": ["s0"], "label": ["a"]}).to_csv(csv, index=False)
    with pytest.raises(CohortError, match="case_id"):
        Cohort(csv, tmp_path)


def test_duplicate_ids(tmp_path: Path) -> None:
    rows = _rows(3)
    rows.append(dict(rows[1]))
    csv = _write(tmp_path, rows)
    with pytest.raises(CohortError, match=r"duplicate slide_id\(s\) \[1\] s1") as e:
        Cohort(csv, tmp_path)
    assert "labels.csv" in str(e.value)


def test_slides_without_features_list_first_20_and_count(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(2))
    extra = [{"slide_id": f"x{i:02d}", "case_id": f"x{i}", "label": "a"} for i in range(25)]
    pd.DataFrame(_rows(2) + extra).to_csv(csv, index=False)
    with pytest.raises(CohortError) as e:
        Cohort(csv, tmp_path)
    msg = str(e.value)
    assert "25 slide(s) have no feature file" in msg
    assert "x00" in msg and "x19" in msg and "x20" not in msg
    assert "+5 more, 25 in total" in msg and str(tmp_path) in msg


def test_unknown_labels_with_classes(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(4, labels=("a", "b", "c", "a")))
    with pytest.raises(CohortError, match=r"outside the classes \['a', 'b'\].*slide_id \[1\] s2"):
        Cohort(csv, tmp_path, classes=["a", "b"])


def test_nan_features_and_empty_bags(tmp_path: Path) -> None:
    csv = _write(tmp_path, _rows(3))
    write_features(tmp_path / "h5_files" / "s1.h5", np.full((3, 4), np.nan, np.float32), np.zeros((3, 2)))
    with pytest.raises(CohortError, match=r"NaN/inf feature values in slide_id \[1\] s1"):
        Cohort(csv, tmp_path)
    write_features(tmp_path / "h5_files" / "s1.h5", np.zeros((3, 4), np.float32), np.zeros((3, 2)))
    write_features(tmp_path / "h5_files" / "s2.h5", np.zeros((0, 4), np.float32), np.zeros((0, 2)))
    for cache in ("memory", "lazy"):
        with pytest.raises(CohortError, match=r"empty bag\(s\).*slide_id \[1\] s2"):
            Cohort(csv, tmp_path, cache=cache, check_values=cache == "memory")


def test_survival_columns_validated(tmp_path: Path) -> None:
    rows = [{"slide_id": f"s{i}", "case_id": f"c{i}", "time": 10.0 + i, "event": i % 2} for i in range(4)]
    csv = _write(tmp_path, rows)
    c = Cohort(csv, tmp_path, task="survival")
    assert [s.event for s in c.samples()] == [0, 1, 0, 1] and c.samples()[2].time == 12.0
    rows[3]["event"] = 2
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(CohortError, match=r"'event' must be 0.*slide_id \[1\] s3"):
        Cohort(csv, tmp_path, task="survival")


def test_case_level_samples_and_conflicts(tmp_path: Path) -> None:
    rows = [
        {"slide_id": "a1", "case_id": "A", "label": "x"},
        {"slide_id": "a2", "case_id": "A", "label": "x"},
        {"slide_id": "b1", "case_id": "B", "label": "y"},
    ]
    csv = _write(tmp_path, rows)
    c = Cohort(csv, tmp_path)
    cases = c.samples(case_level=True)
    assert [(s.sample_id, s.slide_ids, s.label) for s in cases] == [("A", ("a1", "a2"), 0), ("B", ("b1",), 1)]
    rows[1]["label"] = "y"
    pd.DataFrame(rows).to_csv(csv, index=False)
    c = Cohort(csv, tmp_path)
    assert len(c.samples()) == 3  # slide-level is fine
    with pytest.raises(CohortError, match=r"conflicting values: case_id \[1\] A"):
        c.samples(case_level=True)


def test_format_ids() -> None:
    assert format_ids(["a", "b"]) == "[2] a, b"
    assert format_ids(range(30)).endswith("(+10 more, 30 in total)")


def test_case_level_survival_needs_one_outcome_per_case(tmp_path: Path) -> None:
    rows = [
        {"slide_id": "a1", "case_id": "A", "time": 5.0, "event": 1},
        {"slide_id": "a2", "case_id": "A", "time": 5.0, "event": 1},
        {"slide_id": "b1", "case_id": "B", "time": 9.0, "event": 0},
    ]
    csv = _write(tmp_path, rows)
    cases = Cohort(csv, tmp_path, task="survival").samples(case_level=True)
    assert [(s.sample_id, s.slide_ids, s.time, s.event) for s in cases] == [
        ("A", ("a1", "a2"), 5.0, 1),
        ("B", ("b1",), 9.0, 0),
    ]
    rows[1]["time"] = 6.0
    pd.DataFrame(rows).to_csv(csv, index=False)
    with pytest.raises(CohortError, match=r"time/event per case.*case_id \[1\] A"):
        Cohort(csv, tmp_path, task="survival").samples(case_level=True)
