"""Synthetic cohort: labels table, survival, case grouping, resume, CLI."""

from __future__ import annotations

import cv2
import numpy as np
import openslide
import pandas as pd
import pytest

from gigaslide.cli.main import main
from gigaslide.synth.cohort import make_cohort

SMALL = {"width": 512, "height": 512}


def test_labels_csv_columns_and_values(tmp_path):
    df = make_cohort(tmp_path, 6, seed=1, signal="local", **SMALL)
    on_disk = pd.read_csv(tmp_path / "labels.csv")
    for col in ("slide_id", "case_id", "label", "time", "event", "path", "mpp"):
        assert col in on_disk.columns
    pd.testing.assert_frame_equal(df.reset_index(drop=True), on_disk, check_dtype=False)
    assert len(df) == 6 and df["slide_id"].is_unique
    assert sorted(df["label"].tolist()) == [0, 0, 0, 1, 1, 1]  # balanced
    assert (df["time"] > 0).all() and set(df["event"]) <= {0, 1}
    assert (df["mpp"] == 0.5).all()
    # the local signal: label 1 carries far more tumour than label 0
    assert df.loc[df.label == 1, "tumor_fraction"].min() > df.loc[df.label == 0, "tumor_fraction"].max()
    for row in df.itertuples():
        with openslide.OpenSlide(row.path) as s:
            assert s.dimensions == (512, 512)
            assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.5)
        gt = cv2.imread(row.mask_path, cv2.IMREAD_UNCHANGED)
        assert gt.shape == (32, 32) and set(np.unique(gt)) <= {0, 127, 254}


def test_deterministic_and_cases(tmp_path):
    a = make_cohort(tmp_path / "a", 4, seed=3, signal="spatial", slides_per_case=2, **SMALL)
    b = make_cohort(tmp_path / "b", 4, seed=3, signal="spatial", slides_per_case=2, **SMALL)
    cols = ["slide_id", "case_id", "label", "time", "event", "tumor_fraction", "tumor_pattern"]
    pd.testing.assert_frame_equal(a[cols], b[cols])
    assert a["case_id"].tolist() == ["case_000", "case_000", "case_001", "case_001"]
    # slides of one case share label and survival
    assert a.groupby("case_id")[["label", "time", "event"]].nunique().max().max() == 1
    # spatial signal: pattern follows the label, burden does not
    assert set(a.loc[a.label == 1, "tumor_pattern"]) == {"border"}
    assert set(a.loc[a.label == 0, "tumor_pattern"]) == {"scattered"}
    same = [(tmp_path / "a" / "slides" / f"slide_00{i}.tiff").read_bytes() for i in range(2)]
    assert same[0] != same[1]
    assert same[0] == (tmp_path / "b" / "slides" / "slide_000.tiff").read_bytes()


def test_survival_follows_signal(tmp_path):
    df = make_cohort(tmp_path, 24, seed=0, signal="local", width=256, height=256)
    # higher tumour burden -> higher hazard -> shorter times among events on average
    hi = df[df.label == 1]
    lo = df[df.label == 0]
    assert hi["time"].median() < lo["time"].median()


def test_resume_and_parameter_mismatch(tmp_path):
    make_cohort(tmp_path, 2, seed=0, **SMALL)
    slide = tmp_path / "slides" / "slide_000.tiff"
    mtime = slide.stat().st_mtime_ns
    make_cohort(tmp_path, 2, seed=0, **SMALL)  # resume: nothing rewritten
    assert slide.stat().st_mtime_ns == mtime
    with pytest.raises(ValueError, match="different parameters"):
        make_cohort(tmp_path, 2, seed=1, **SMALL)
    df = make_cohort(tmp_path, 2, seed=1, overwrite=True, **SMALL)
    assert len(df) == 2


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown signal"):
        make_cohort(tmp_path, 2, signal="global")
    with pytest.raises(ValueError, match="n_cases"):
        make_cohort(tmp_path, 2, n_cases=3)


def test_cli(tmp_path, capsys):
    out = tmp_path / "c"
    rc = main(
        [
            "synth",
            "--out",
            str(out),
            "--n-slides",
            "2",
            "--width",
            "384",
            "--height",
            "320",
            "--signal",
            "both",
            "--seed",
            "4",
        ]
    )
    assert rc == 0
    assert "wrote 2 slides" in capsys.readouterr().out
    df = pd.read_csv(out / "labels.csv")
    assert len(df) == 2 and (out / "slides" / "slide_001.tiff").exists()
    rc = main(
        ["synth", "--out", str(out), "--n-slides", "2", "--width", "384", "--height", "320", "--seed", "5"]
    )
    assert rc == 2  # parameter mismatch is refused with a one-line error (bad input: exit 2), not a traceback


def test_parallel_workers_match_serial(tmp_path):
    from gigaslide.synth import make_cohort as exported

    assert exported is make_cohort
    serial = make_cohort(tmp_path / "s", 2, seed=8, width=256, height=256, workers=1)
    parallel = make_cohort(tmp_path / "p", 2, seed=8, width=256, height=256, workers=2)
    cols = ["slide_id", "label", "time", "event", "tumor_fraction"]
    pd.testing.assert_frame_equal(serial[cols], parallel[cols])
    for sid in serial["slide_id"]:
        a = (tmp_path / "s" / "slides" / f"{sid}.tiff").read_bytes()
        assert a == (tmp_path / "p" / "slides" / f"{sid}.tiff").read_bytes()
