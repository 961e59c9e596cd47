"""`gigaslide tile` / `gigaslide preview`: exit codes, summaries, and resuming after SIGKILL."""

from __future__ import annotations

import argparse
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gigaslide.cli.main import main
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.synth import write_synthetic_slide


def _slides(folder: Path, n: int, size: tuple[int, int] = (1024, 768)) -> Path:
    for i in range(n):
        write_synthetic_slide(folder / f"slide{i}.tiff", width=size[0], height=size[1], mpp=0.5, seed=i)
    return folder


def _manifest(out: Path) -> dict[str, dict[str, str]]:
    path = out / "manifest.csv"
    if not path.exists():
        return {}
    with path.open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_tile_cli_reports_failures(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    folder = _slides(tmp_path / "in", 2)
    (folder / "bad.svs").write_bytes(b"this is not a slide")
    out = tmp_path / "out"
    rc = main(["tile", str(folder), "--out", str(out), "--tile-size", "128", "--no-progress", "--preview"])
    text = capsys.readouterr().out
    assert rc == 1
    assert "1 of 3 slides failed" in text and "bad: SlideReadError" in text and "bad.svs" in text
    rows = _manifest(out)
    assert (
        rows["bad"]["status"] == "failed" and rows["slide0"]["status"] == rows["slide1"]["status"] == "done"
    )
    assert (out / "previews" / "slide1.png").is_file()
    # all good on a rerun restricted to readable slides: exit status 0
    (folder / "bad.svs").unlink()
    assert main(["tile", str(folder), "--out", str(out), "--tile-size", "128", "--no-progress"]) == 0
    assert "2 already done" in capsys.readouterr().out


def test_tile_cli_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["tile", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "a.svs").write_bytes(b"")
    assert main(["tile", str(tmp_path / "a.svs"), "--out", str(tmp_path / "o"), "--min-tissue", "3"]) == 2
    assert "--min-tissue" in capsys.readouterr().err


def test_tile_cli_slide_mpp_and_regions(shared_data: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    tcga = str(shared_data / "tcga-cr-7395-01a-01-ts1.svs")
    assert main(["tile", tcga, "--out", str(out), "--no-progress"]) == 1
    assert "MissingMPPError" in _manifest(out)["tcga-cr-7395-01a-01-ts1"]["error"]
    assert "--slide-mpp" in capsys.readouterr().out
    args = ["tile", tcga, "--out", str(out), "--slide-mpp", "0.25", "--region-size", "1024", "--no-progress"]
    assert main(args) == 0
    row = _manifest(out)["tcga-cr-7395-01a-01-ts1"]
    assert row["status"] == "done" and int(row["n_regions"]) > 0 and row["error"] == ""
    regions = read_coords(out / "regions" / "tcga-cr-7395-01a-01-ts1.h5")
    assert regions.spec.level0_size == 2048 and regions.spec.read_level == 1


def test_preview_cli(shared_data: Path, tmp_path: Path, capsys) -> None:
    png = tmp_path / "p.png"
    rc = main(["preview", str(shared_data / "cmu-1-small-region.svs"), "--out", str(png)])
    assert rc == 0 and png.read_bytes()[:4] == b"\x89PNG"
    assert "257 level-0 px" in capsys.readouterr().out
    rc = main(["preview", str(shared_data / "tcga-cr-7395-01a-01-ts1.svs"), "--out", str(tmp_path / "t.png")])
    err = capsys.readouterr().err
    assert rc == 2 and "--slide-mpp" in err and err.startswith("gigaslide preview: error:")  # as heatmap
    assert len(err.strip().splitlines()) == 1 and "-v" not in err  # a user error: no traceback hint
    assert not (tmp_path / "t.png").exists()
    folder = tmp_path / "previews"  # a folder as --out (existing, or given with a trailing slash)
    rc = main(["preview", str(shared_data / "cmu-1-small-region.svs"), "--out", f"{folder}/"])
    assert rc == 0 and (folder / "cmu-1-small-region_preview.png").read_bytes()[:4] == b"\x89PNG"


def test_killed_run_resumes(tmp_path: Path) -> None:
    folder = _slides(tmp_path / "in", 6, size=(2048, 1536))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "gigaslide", "tile", str(folder), "--out", str(out), "--tile-size", "64"]
    cmd += ["--no-progress", "--preview"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        deadline = time.monotonic() + 120
        while not any(r["status"] == "done" for r in _manifest(out).values()):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done_before = {k for k, r in _manifest(out).items() if r["status"] == "done"}
    assert 1 <= len(done_before) < 6, "the kill must interrupt the batch"
    mtimes = {k: (out / "patches" / f"{k}.h5").stat().st_mtime_ns for k in done_before}

    rerun = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert f"{len(done_before)} already done" in rerun.stdout
    rows = _manifest(out)
    assert sorted(rows) == [f"slide{i}" for i in range(6)]
    assert all(r["status"] == "done" for r in rows.values())
    assert {k: (out / "patches" / f"{k}.h5").stat().st_mtime_ns for k in done_before} == mtimes
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".")]
    assert leftovers == []


def test_tile_cli_magnification_equals_target_mpp(tmp_path: Path) -> None:
    folder = _slides(tmp_path / "in", 1)
    assert (
        main(["tile", str(folder), "--out", str(tmp_path / "a"), "--magnification", "10", "--no-progress"])
        == 0
    )
    assert (
        main(["tile", str(folder), "--out", str(tmp_path / "b"), "--target-mpp", "1.0", "--no-progress"]) == 0
    )
    a = read_coords(tmp_path / "a" / "patches" / "slide0.h5")
    b = read_coords(tmp_path / "b" / "patches" / "slide0.h5")
    assert a.spec.target_mpp == b.spec.target_mpp == 1.0
    assert a.spec.level0_size == 512
    assert (a.coords == b.coords).all()


def test_tile_cli_region_4096_on_a_small_slide(shared_data: Path, tmp_path: Path, capsys) -> None:
    # the slide fits in one 4096 px region: regions are judged on their in-slide area, never fail the slide
    out = tmp_path / "o"
    cmu = str(shared_data / "cmu-1-small-region.svs")
    assert main(["tile", cmu, "--out", str(out), "--region-size", "4096", "--no-progress"]) == 0
    row = _manifest(out)["cmu-1-small-region"]
    assert row["status"] == "done" and row["n_regions"] == "1" and int(row["n_tiles"]) > 0
    args = ["tile", cmu, "--out", str(out), "--region-size", "4096", "--region-min-tissue", "0.99"]
    assert main([*args, "--no-progress"]) == 0
    assert "done with a warning" in capsys.readouterr().out
    row = _manifest(out)["cmu-1-small-region"]
    assert row["status"] == "done" and row["n_regions"] == "0" and "--region-min-tissue" in row["warning"]
    assert read_coords(out / "regions" / "cmu-1-small-region.h5").spec.min_tissue == 0.99


def _small_patch(path: Path) -> Path:
    """A 128 x 128 um H&E-like patch (256 px at 0.5 um/px) on 400 x 400 px of glass."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    img = np.full((400, 400, 3), 243, np.uint8)
    pink = np.array([225.0, 150.0, 190.0]) + rng.normal(0, 12, (256, 256, 1))
    nuclei = rng.random((256, 256)) < 0.2
    img[72:328, 72:328] = np.clip(np.where(nuclei[..., None], (120, 80, 150), pink), 0, 255)
    Image.fromarray(img).save(path)
    return path


def test_tile_cli_min_tissue_area_and_the_rule_named(tmp_path: Path, capsys) -> None:
    png = str(_small_patch(tmp_path / "patch.png"))
    base = ["tile", png, "--slide-mpp", "0.5", "--tile-size", "64", "--no-progress"]
    # 16,384 um^2 of tissue is below the default 20,000 um^2: the error names that rule and its option
    for min_tissue in ("0.25", "0"):
        out = tmp_path / f"o{min_tissue}"
        assert main([*base, "--out", str(out), "--min-tissue", min_tissue]) == 1
        err = _manifest(out)["patch"]["error"]
        assert "NoTissueError" in err and "the minimum tissue area 20,000 um^2 (--min-tissue-area" in err
        assert "--min-tissue," not in err  # the tile threshold is not the cause: not suggested
    capsys.readouterr()
    out = tmp_path / "o0"
    assert main([*base, "--out", str(out), "--min-tissue", "0", "--min-tissue-area", "0"]) == 0
    row = _manifest(out)["patch"]
    assert row["status"] == "done" and int(row["n_tiles"]) >= 16  # the 256 px patch is 4 x 4 tiles
    cf = read_coords(out / "patches" / "patch.h5")
    assert cf.attrs["min_tissue_area_um2"] == 0.0
    # a rerun with another minimum area is not taken as finished
    assert main([*base, "--out", str(out), "--min-tissue", "0", "--min-tissue-area", "100"]) == 0
    assert "0 already done" in capsys.readouterr().out
    assert main([*base, "--out", str(tmp_path / "x"), "--min-tissue-area", "-1"]) == 2
    assert "--min-tissue-area" in capsys.readouterr().err


def test_tile_imports_no_heavy_libraries_and_outlines_are_opt_in(tmp_path: Path) -> None:
    """`gigaslide tile` never imports scikit-learn, pandas or torch; GeoJSON only with --outlines."""
    slide = _slides(tmp_path / "in", 1, size=(512, 512)) / "slide0.tiff"
    code = (
        "import sys; from gigaslide.cli.main import main; "
        f"rc = main(['tile', {str(slide)!r}, '--out', {str(tmp_path / 'o')!r}, '--no-progress']); "
        "print(rc, sorted(m for m in ('sklearn', 'pandas', 'torch', 'shapely') if m in sys.modules))"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "0 []"
    assert not list((tmp_path / "o").glob("tissue/*.geojson"))
    assert main(["tile", str(slide), "--out", str(tmp_path / "o2"), "--no-progress", "--outlines"]) == 0
    assert (tmp_path / "o2" / "tissue" / "slide0.geojson").is_file()
    helped = subprocess.run(
        [sys.executable, "-c", "import sys; from gigaslide.cli.main import main\n"
         "try: main(['--help'])\nexcept SystemExit: pass\n"
         "print(sorted(m for m in ('sklearn', 'pandas', 'torch', 'h5py', 'cv2') if m in sys.modules))"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert helped.stdout.strip().splitlines()[-1] == "[]" and "convert" in helped.stdout


def _inked_patch(path: Path) -> Path:
    """The 256 px tissue patch of :func:`_small_patch` and, right of it, a green marker-ink blot."""
    import numpy as np
    from PIL import Image

    small = np.asarray(Image.open(_small_patch(path.with_name("small.png"))))
    img = np.full((400, 800, 3), 243, np.uint8)
    img[:, :400] = small
    img[72:328, 472:728] = (40, 150, 70)
    Image.fromarray(img).save(path)
    return path


def test_preview_takes_the_tissue_options_of_tile(tmp_path: Path, capsys) -> None:
    from gigaslide.cli.main import build_parser

    def options(command: str) -> dict[str, tuple]:
        sub = next(a for a in build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
        acts = sub.choices[command]._actions
        return {a.option_strings[0]: (a.dest, a.default, a.choices, a.help) for a in acts if a.option_strings}

    tissue = ("--min-tissue", "--tile-rule", "--min-tissue-area", "--keep-ink")
    tile, preview = options("tile"), options("preview")
    assert all(tile[o] == preview[o] for o in tissue)  # one definition: same names, defaults, help

    png = str(_inked_patch(tmp_path / "inked.png"))
    common = [png, "--slide-mpp", "0.5", "--tile-size", "64"]
    counts = {}
    for extra in ([], ["--keep-ink"], ["--tile-rule", "clam"], ["--min-tissue", "0.9"]):
        name = "_".join(extra) or "default"
        argv = [*common, "--min-tissue-area", "0", *extra]
        assert main(["tile", *argv, "--out", str(tmp_path / name), "--no-progress"]) == 0
        capsys.readouterr()
        assert main(["preview", *argv, "--out", str(tmp_path / f"{name}.png")]) == 0
        printed = capsys.readouterr().out  # "<png>: N tiles of 64 px ..."
        counts[name] = int(printed.split(": ", 1)[1].split(" tiles")[0])
        assert counts[name] == int(_manifest(tmp_path / name)["inked"]["n_tiles"]), extra  # what tile keeps
    assert counts["default"] == 16  # the 4 x 4 tissue tiles; the ink is not tissue
    assert counts["--keep-ink"] >= 32  # the 256 px ink blot kept as tissue: at least 4 x 4 more
    assert counts["--min-tissue_0.9"] < counts["default"] <= counts["--tile-rule_clam"]
    # the default minimum fragment area (20,000 um^2) drops the 16,384 um^2 patch, in preview as in tile
    assert main(["preview", *common, "--out", str(tmp_path / "area.png")]) == 0
    captured = capsys.readouterr()
    assert ": 0 tiles" in captured.out and "--min-tissue-area" in captured.err
