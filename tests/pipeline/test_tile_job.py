"""Batch tiling: slide lists, outputs, manifest, resume, failures and parallel workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from gigaslide.pipeline.inputs import SlideInput, SlideListError, collect_slides
from gigaslide.pipeline.tile_job import clean_stale_temp, format_error, run_tiling
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.utils.manifest import Manifest


def _touch(*paths: Path) -> None:
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")


def test_single_file(tmp_path) -> None:
    _touch(tmp_path / "a.svs")
    # --slide-mpp is a fallback for files without mpp metadata, never an override
    assert collect_slides(tmp_path / "a.svs", slide_mpp=0.25) == [
        SlideInput("a", tmp_path / "a.svs", None, default_mpp=0.25)
    ]


def test_plain_images_beside_slides_are_skipped(tmp_path, caplog) -> None:
    _touch(tmp_path / "s1.svs", tmp_path / "s1.png", tmp_path / "label.jpg")
    assert [s.path.name for s in collect_slides(tmp_path)] == ["s1.svs"]
    assert "skipping 2 plain image(s)" in caplog.text and "s1.png" in caplog.text
    only_images = tmp_path / "pngs"
    _touch(only_images / "a.png", only_images / "b.jpg")
    assert [s.slide_id for s in collect_slides(only_images)] == ["a", "b"]


def test_folder_filters_extensions_and_sorts(tmp_path) -> None:
    _touch(tmp_path / "b.NDPI", tmp_path / "a.tiff", tmp_path / "notes.txt", tmp_path / ".hidden.svs")
    _touch(tmp_path / "sub" / "c.svs")  # not recursive
    slides = collect_slides(tmp_path)
    assert [(s.slide_id, s.path.name, s.mpp) for s in slides] == [
        ("a", "a.tiff", None),
        ("b", "b.NDPI", None),
    ]


def test_csv_with_ids_mpp_and_relative_paths(tmp_path) -> None:
    _touch(tmp_path / "slides" / "x.svs", tmp_path / "slides" / "y.svs")
    (tmp_path / "list.csv").write_text("path,slide_id,mpp\nslides/x.svs,case-1,0.5\nslides/y.svs,,\n")
    slides = collect_slides(tmp_path / "list.csv", slide_mpp=0.25)
    assert slides == [
        SlideInput("case-1", tmp_path / "slides" / "x.svs", 0.5, 0.25),  # the CSV's mpp overrides
        SlideInput("y", tmp_path / "slides" / "y.svs", None, 0.25),  # --slide-mpp only fills a gap
    ]


def test_csv_relative_paths_ignore_the_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _touch(tmp_path / "lists" / "slides" / "x.svs", tmp_path / "lists" / "slides" / "y.svs")
    (tmp_path / "lists" / "l.csv").write_text("path\nslides/x.svs\nslides/y.svs\n")
    cwd = tmp_path / "elsewhere"
    _touch(cwd / "slides" / "x.svs", cwd / "slides" / "z.svs")  # decoys next to the CWD
    monkeypatch.chdir(cwd)
    expected = [tmp_path / "lists" / "slides" / "x.svs", tmp_path / "lists" / "slides" / "y.svs"]
    assert [s.path for s in collect_slides(tmp_path / "lists" / "l.csv")] == expected
    # a relative CSV path: slide paths still absolute, under the CSV's folder
    monkeypatch.chdir(tmp_path)
    slides = collect_slides(Path("lists") / "l.csv")
    assert [s.path for s in slides] == expected and all(s.path.is_absolute() for s in slides)
    # paths written relative to the CWD instead: refused, and the message says how paths resolve
    monkeypatch.chdir(cwd)
    (tmp_path / "lists" / "bad.csv").write_text("path\nslides/z.svs\n")
    with pytest.raises(
        SlideListError, match=r"bad\.csv.*slides/z\.svs.*relative to the CSV's folder"
    ) as info:
        collect_slides(tmp_path / "lists" / "bad.csv")
    assert str(tmp_path / "lists") in str(info.value) and "not the current directory" in str(info.value)
    # some missing: listed with the same hint, the others still run
    (tmp_path / "lists" / "some.csv").write_text("path\nslides/x.svs\nslides/z.svs\n")
    with caplog.at_level("WARNING", logger="gigaslide.pipeline.inputs"):
        assert [s.slide_id for s in collect_slides(tmp_path / "lists" / "some.csv")] == ["x", "z"]
    assert "1 of 2 listed slide files do not exist" in caplog.text and "CSV's folder" in caplog.text


def test_csv_errors_name_the_file(tmp_path) -> None:
    csv = tmp_path / "l.csv"
    csv.write_text("file\na.svs\n")
    with pytest.raises(SlideListError, match=r"l\.csv.*`path` column"):
        collect_slides(csv)
    csv.write_text("path,mpp\na.svs,abc\n")
    with pytest.raises(SlideListError, match=r"line 2.*not a number"):
        collect_slides(csv)
    csv.write_text("path,mpp\na.svs,-1\n")
    with pytest.raises(SlideListError, match="positive"):
        collect_slides(csv)


def test_duplicate_ids_are_listed(tmp_path) -> None:
    _touch(tmp_path / "a.svs", tmp_path / "a.tif", tmp_path / "b.svs")
    with pytest.raises(SlideListError, match=r"duplicate slide ids.*a: .*a\.svs, .*a\.tif") as info:
        collect_slides(tmp_path)
    assert "b.svs" not in str(info.value)


def test_missing_and_empty_inputs(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="nope"):
        collect_slides(tmp_path / "nope")
    with pytest.raises(SlideListError, match="no slide files"):
        collect_slides(tmp_path)
    _touch(tmp_path / "a.svs")
    with pytest.raises(SlideListError, match="--slide-mpp"):
        collect_slides(tmp_path / "a.svs", slide_mpp=0)


# -- run_tiling -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def synth_slides(tmp_path_factory) -> list[SlideInput]:
    from gigaslide.synth import write_synthetic_slide

    d = tmp_path_factory.mktemp("job_slides")
    return [
        SlideInput(f"s{i}", write_synthetic_slide(d / f"s{i}.tiff", width=1024, height=768, mpp=0.5, seed=i))
        for i in range(3)
    ]


def _files(out: Path) -> dict[str, float]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_run_tiling_outputs_and_resume(synth_slides: list[SlideInput], tmp_path: Path) -> None:
    out = tmp_path / "out"
    kw = dict(target_mpp=0.5, tile_size=128, region_size=512, preview=True, outlines=True, progress=False)
    summary = run_tiling(synth_slides[:2], out, **kw)
    assert summary.ok and summary.done == ["s0", "s1"] and summary.skipped == []
    rows = Manifest(out / "manifest.csv").rows
    for s in synth_slides[:2]:
        row = rows[s.slide_id]
        cf = read_coords(out / "patches" / f"{s.slide_id}.h5")
        assert row["status"] == "done" and row["error"] == "" and row["backend"]
        assert int(row["n_tiles"]) == len(cf.coords) > 0 and float(row["mpp"]) == pytest.approx(0.5)
        assert Path(row["coords_file"]) == out / "patches" / f"{s.slide_id}.h5"
        assert (cf.spec.tile_size, cf.spec.target_mpp, cf.spec.level0_size) == (128, 0.5, 128)
        assert cf.tissue_fraction is not None and (cf.tissue_fraction >= 0.25).all()
        assert cf.attrs["slide_id"] == s.slide_id
        regions = read_coords(out / "regions" / f"{s.slide_id}.h5")
        assert regions.spec.tile_size == 512 and int(row["n_regions"]) == len(regions.coords) > 0
        geo = json.loads((out / "tissue" / f"{s.slide_id}.geojson").read_text())
        assert isinstance(geo, dict) and geo.get("type")
        assert (out / "previews" / f"{s.slide_id}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summary.n_tiles == sum(int(rows[k]["n_tiles"]) for k in ("s0", "s1"))
    before = _files(out)
    assert not [f for f in before if Path(f).name.startswith(".")]

    # rerun with one more slide: finished slides are not redone
    again = run_tiling(synth_slides, out, **kw)
    assert again.skipped == ["s0", "s1"] and again.done == ["s2"]
    after = _files(out)
    assert {k: v for k, v in after.items() if k in before and k != "manifest.csv"} == {
        k: v for k, v in before.items() if k != "manifest.csv"
    }
    # other parameters: tiled again
    changed = run_tiling(synth_slides[:1], out, **{**kw, "stride": 96})
    assert changed.done == ["s0"] and read_coords(out / "patches" / "s0.h5").spec.stride == 96


def test_parallel_matches_sequential(synth_slides: list[SlideInput], tmp_path: Path) -> None:
    seq = run_tiling(synth_slides, tmp_path / "seq", tile_size=128, progress=False)
    par = run_tiling(synth_slides, tmp_path / "par", tile_size=128, workers=2, progress=False)
    assert seq.ok and par.ok and sorted(par.done) == seq.done
    for s in synth_slides:
        a = read_coords(tmp_path / "seq" / "patches" / f"{s.slide_id}.h5")
        b = read_coords(tmp_path / "par" / "patches" / f"{s.slide_id}.h5")
        np.testing.assert_array_equal(a.coords, b.coords)


def test_stale_temp_files_removed(synth_slides: list[SlideInput], tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "patches").mkdir(parents=True)
    (out / "previews" / ".tmp-abc").mkdir(parents=True)
    (out / "patches" / ".s0.h5.x1y2.h5.tmp").write_bytes(b"partial")
    (out / ".manifest.csv.q.csv.tmp").write_text("partial")
    (out / "patches" / "keep.txt").write_text("user file")
    assert clean_stale_temp(out) == 3
    assert sorted(p.name for p in out.rglob("*")) == ["keep.txt", "patches", "previews"]


def test_real_slides_batch(shared_data: Path, tmp_path: Path) -> None:
    slides = [
        SlideInput("cmu", shared_data / "cmu-1-small-region.svs"),
        SlideInput("tcga", shared_data / "tcga-cr-7395-01a-01-ts1.svs"),
        SlideInput("broken", shared_data / "broken.svs"),
    ]
    out = tmp_path / "out"
    summary = run_tiling(slides, out, progress=False)
    assert summary.done == ["cmu"] and set(summary.failed) == {"tcga", "broken"}
    assert summary.failed["tcga"].startswith("MissingMPPError:") and "--slide-mpp" in summary.failed["tcga"]
    assert summary.failed["broken"].startswith("SlideReadError:") and "broken.svs" in summary.failed["broken"]
    text = summary.describe()
    assert "2 of 3 slides failed" in text and "broken: SlideReadError" in text
    rows = Manifest(out / "manifest.csv").rows
    assert rows["tcga"]["status"] == "failed" and rows["tcga"]["coords_file"] == ""
    assert not (out / "patches" / "tcga.h5").exists()
    # retry with the missing mpp: the failed slide is redone, the finished one skipped
    cmu_mtime = (out / "patches" / "cmu.h5").stat().st_mtime_ns
    slides[1] = SlideInput("tcga", slides[1].path, 0.25)
    again = run_tiling(slides, out, progress=False)
    assert again.skipped == ["cmu"] and again.done == ["tcga"] and list(again.failed) == ["broken"]
    assert (out / "patches" / "cmu.h5").stat().st_mtime_ns == cmu_mtime
    tcga = read_coords(out / "patches" / "tcga.h5")
    assert tcga.spec.slide_mpp == 0.25 and tcga.spec.level0_size == 512 and len(tcga.coords) > 0


def test_regions_never_fail_the_slide(shared_data: Path, tmp_path: Path) -> None:
    # CMU-1-small-region (2220 x 2967 px) fits in one 4096 px region: its tissue covers 0.14 of the
    # square, but far more of the square's in-slide part -> kept under the default region rule
    slides = [SlideInput("cmu", shared_data / "cmu-1-small-region.svs")]
    out = tmp_path / "out"
    summary = run_tiling(slides, out, region_size=4096, progress=False)
    assert summary.done == ["cmu"] and summary.warnings == {}
    row = Manifest(out / "manifest.csv").rows["cmu"]
    assert row["status"] == "done" and row["n_regions"] == "1" and row["warning"] == ""
    regions = read_coords(out / "regions" / "cmu.h5")
    assert regions.coords.tolist() == [[0, 0]] and regions.spec.min_tissue == 0.05
    assert regions.tissue_fraction[0] > 0.14
    # no region passes: the slide is still done with its patches, 0 regions and a warning
    strict = run_tiling(slides, out, region_size=4096, region_min_tissue=0.99, progress=False)
    assert strict.done == ["cmu"] and "--region-min-tissue" in strict.warnings["cmu"]
    row = Manifest(out / "manifest.csv").rows["cmu"]
    assert row["status"] == "done" and row["n_regions"] == "0" and row["error"] == ""
    assert "no 4096 px region" in row["warning"] and int(row["n_tiles"]) > 0
    assert read_coords(out / "regions" / "cmu.h5").coords.shape == (0, 2)
    assert "done with a warning" in strict.describe()
    # finished: a rerun with the same parameters skips it
    assert run_tiling(slides, out, region_size=4096, region_min_tissue=0.99, progress=False).skipped == [
        "cmu"
    ]


def test_region_errors_keep_the_patches(
    synth_slides: list[SlideInput], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gigaslide.preprocess.tiling as tiling

    def boom(*args, **kwargs):
        raise RuntimeError("region grid exploded")

    monkeypatch.setattr(tiling, "tile_regions", boom)
    out = tmp_path / "out"
    summary = run_tiling(synth_slides[:1], out, tile_size=128, region_size=512, progress=False)
    assert summary.done == ["s0"] and "RuntimeError: region grid exploded" in summary.warnings["s0"]
    row = Manifest(out / "manifest.csv").rows["s0"]
    assert row["status"] == "done" and row["n_regions"] == "0" and "exploded" in row["warning"]
    assert len(read_coords(out / "patches" / "s0.h5").coords) > 0
    assert not (out / "regions" / "s0.h5").exists()
    # the regions are retried on the next run; a success clears the warning
    monkeypatch.undo()
    again = run_tiling(synth_slides[:1], out, tile_size=128, region_size=512, progress=False)
    assert again.done == ["s0"] and again.warnings == {}
    row = Manifest(out / "manifest.csv").rows["s0"]
    assert row["warning"] == "" and int(row["n_regions"]) > 0


def test_rerun_with_other_region_parameters_retiles(synth_slides: list[SlideInput], tmp_path: Path) -> None:
    out = tmp_path / "out"
    kw = dict(tile_size=128, progress=False)
    assert run_tiling(synth_slides[:1], out, region_size=512, **kw).done == ["s0"]
    assert run_tiling(synth_slides[:1], out, region_size=512, **kw).skipped == ["s0"]
    other = run_tiling(synth_slides[:1], out, region_size=256, **kw)
    assert other.done == ["s0"]
    regions = read_coords(out / "regions" / "s0.h5")
    assert regions.spec.tile_size == 256
    assert int(Manifest(out / "manifest.csv").rows["s0"]["n_regions"]) == len(regions.coords)
    stricter = run_tiling(synth_slides[:1], out, region_size=256, region_min_tissue=0.5, **kw)
    assert stricter.done == ["s0"] and read_coords(out / "regions" / "s0.h5").spec.min_tissue == 0.5
    assert run_tiling(synth_slides[:1], out, region_size=256, region_min_tissue=0.5, **kw).skipped == ["s0"]


def test_format_error_and_bad_params(tmp_path: Path) -> None:
    assert format_error(ValueError("a\n  b")) == "ValueError: a b"
    assert format_error(KeyError()) == "KeyError"
    with pytest.raises(ValueError, match="--min-tissue"):
        run_tiling([], tmp_path, min_tissue=2.0)
    with pytest.raises(ValueError, match="--region-min-tissue"):
        run_tiling([], tmp_path, region_min_tissue=-0.1)
    with pytest.raises(ValueError, match="--workers"):
        run_tiling([], tmp_path, workers=0)


class _KillsWorker:
    """Unpickling this in a worker process ends it abruptly, like a segfault in a slide reader."""

    def __reduce__(self):
        return (os._exit, (3,))


def test_crashing_worker_is_recorded(synth_slides: list[SlideInput], tmp_path: Path) -> None:
    out = tmp_path / "out"
    summary = run_tiling(synth_slides[:2], out, workers=2, tissue_params=_KillsWorker(), progress=False)
    assert set(summary.failed) == {"s0", "s1"} and summary.done == []
    assert all(err.startswith("WorkerCrashed:") for err in summary.failed.values())
    assert {r["status"] for r in Manifest(out / "manifest.csv").rows.values()} == {"failed"}


def test_upsampled_tiles_warned_in_manifest(
    synth_slides: list[SlideInput], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gigaslide.preprocess.tiling as tiling

    out = tmp_path / "out"
    summary = run_tiling(synth_slides[:1], out, target_mpp=0.25, tile_size=128, progress=False)
    assert summary.done == ["s0"] and summary.failed == {}  # warned, not refused
    row = Manifest(out / "manifest.csv").rows["s0"]
    assert row["status"] == "done" and int(row["n_tiles"]) > 0
    assert row["warning"].startswith("tiles are upsampled x2 from level 0")
    assert summary.warnings["s0"] == row["warning"]
    assert read_coords(out / "patches" / "s0.h5").spec.read_size == 64
    # a region warning is appended after '; '
    monkeypatch.setattr(tiling, "tile_regions", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    run_tiling(synth_slides[:1], out, target_mpp=0.25, tile_size=128, region_size=512, progress=False)
    up, regions = Manifest(out / "manifest.csv").rows["s0"]["warning"].split("; ")
    assert up.startswith("tiles are upsampled x2") and regions == "no regions written: RuntimeError: boom"


def test_slide_mpp_never_overrides_metadata(shared_data: Path, tmp_path: Path, caplog) -> None:
    """--slide-mpp fills in for the TCGA slide (no metadata) but leaves CMU-1's 0.499 alone."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("cmu-1-small-region.svs", "tcga-cr-7395-01a-01-ts1.svs"):
        (folder / name).symlink_to(shared_data / name)
    summary = run_tiling(collect_slides(folder, slide_mpp=0.25), tmp_path / "out", progress=False)
    assert summary.ok
    rows = {r["slide_id"]: r for r in Manifest(tmp_path / "out" / "manifest.csv").rows.values()}
    assert float(rows["cmu-1-small-region"]["mpp"]) == pytest.approx(0.499)
    assert float(rows["tcga-cr-7395-01a-01-ts1"]["mpp"]) == pytest.approx(0.25)
    assert Path(rows["cmu-1-small-region"]["path"]).is_absolute()
    # an explicit per-slide mpp does override, with a warning naming both values
    from gigaslide.io import open_slide

    with open_slide(folder / "cmu-1-small-region.svs", mpp=0.25) as s:
        assert s.mpp == 0.25
    assert "overrides the file's own 0.499" in caplog.text


def test_clam_tile_rule_is_recorded_and_changes_the_tiles(synth_slides, tmp_path: Path) -> None:
    from gigaslide.preprocess.clam_rule import four_point_keep
    from gigaslide.preprocess.tiling import grid_coords

    out = tmp_path / "out"
    kw = dict(target_mpp=0.5, tile_size=128, progress=False)
    assert run_tiling(synth_slides[:1], out, **kw).done == ["s0"]
    fraction = read_coords(out / "patches" / "s0.h5")
    summary = run_tiling(synth_slides[:1], out, tile_rule="clam", **kw)
    assert summary.done == ["s0"]  # another rule: tiled again, not skipped
    clam = read_coords(out / "patches" / "s0.h5")
    assert clam.attrs["clam_tile_rule"] == 1 and fraction.attrs["clam_tile_rule"] == 0
    from gigaslide.io import open_slide
    from gigaslide.preprocess.tissue import detect_tissue

    with open_slide(synth_slides[0].path) as slide:
        tissue = detect_tissue(slide)
    grid = grid_coords(clam.spec)
    np.testing.assert_array_equal(clam.coords, grid[four_point_keep(grid, clam.spec.level0_size, tissue)])
    assert {tuple(c) for c in clam.coords} != {tuple(c) for c in fraction.coords}
    assert run_tiling(synth_slides[:1], out, tile_rule="clam", **kw).skipped == ["s0"]
