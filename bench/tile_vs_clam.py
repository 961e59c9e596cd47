"""Tiling, whole process, side by side: ``gigaslide tile`` vs CLAM's ``create_patches_fp.py``.

Both commands run as fresh processes on the same slide at the same settings, interleaved run by
run (gigaslide, CLAM, gigaslide, CLAM ...) so that load changes on a shared machine hit both
alike. Per run: wall time and the child's own peak resident memory (``os.wait4``). Then the kept
tiles are compared on a common raster: how much of each tool's tiled area the other covers, and
the tissue fraction (gigaslide's mask) of CLAM's tiles, which explains the difference in count;
and once more with ``gigaslide tile --tile-rule clam`` (CLAM's four-point rule on gigaslide's mask).

The slide (built once, cached): a 30,000 x 30,000 px pyramidal JPEG TIFF at 0.5 um/px rendered by
``gigaslide.synth`` (H&E-like stroma, nuclei, glands, tumour; 2x levels), unless ``--slide`` is
given. CLAM is NOT part of gigaslide: pass the folder of a CLAM checkout with ``--clam`` (it needs
openslide-python, opencv, pandas, matplotlib, h5py); without it only gigaslide is timed.

Usage::

    python bench/tile_vs_clam.py [--clam /path/to/CLAM] [--slide S.tiff] [--runs 3] [--out bench_out]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SIZE = 30_000
MPP = 0.5


def build_slide(out: Path, size: int) -> Path:
    from gigaslide.synth import write_synthetic_slide

    path = out / f"synth_{size}.tiff"
    if not path.is_file():
        print(f"rendering {path} ({size} x {size} px, once) ...", file=sys.stderr)
        write_synthetic_slide(path, width=size, height=size, mpp=MPP, seed=0)
    return path


def run_process(cmd: list[str], cwd: Path | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS MiB of that child alone) of one command; raises when it fails."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024.0  # Linux: KiB


def gigaslide_cmd(slide: Path, out: Path, target_mpp: float, tile: int) -> list[str]:
    return [sys.executable, "-m", "gigaslide", "tile", str(slide), "--out", str(out),
            "--target-mpp", str(target_mpp), "--tile-size", str(tile), "--no-progress"]  # fmt: skip


def clam_cmd(clam: Path, source: Path, out: Path, tile: int, level: int) -> list[str]:
    return [sys.executable, str(clam / "create_patches_fp.py"), "--source", str(source),
            "--save_dir", str(out), "--patch_size", str(tile), "--step_size", str(tile),
            "--patch_level", str(level), "--seg", "--patch"]  # fmt: skip


def _coords(path: Path) -> tuple[np.ndarray, dict[str, Any]]:
    import h5py

    with h5py.File(path, "r") as f:
        return np.asarray(f["coords"][:], dtype=np.int64), dict(f["coords"].attrs)


def _raster(coords: np.ndarray, size0: int, shape: tuple[int, int], cell: int) -> np.ndarray:
    """Boolean (H, W) raster at ``cell`` level-0 px per pixel of the union of the tiles."""
    out = np.zeros(shape, dtype=bool)
    k = max(1, round(size0 / cell))
    for x, y in coords // cell:
        out[y : y + k, x : x + k] = True
    return out


def compare_tiles(slide: Path, ours: Path, clam: Path) -> dict[str, Any]:
    """Overlap of the two tools' tiles and the tissue fraction (gigaslide's mask) of CLAM's."""
    from gigaslide.io import open_slide
    from gigaslide.preprocess.tissue import detect_tissue

    g, g_attrs = _coords(ours)
    c, c_attrs = _coords(clam)
    size0 = int(g_attrs["patch_size_level0"])
    c_size0 = round(int(c_attrs["patch_size"]) * float(np.asarray(c_attrs["downsample"]).ravel()[0]))
    with open_slide(slide) as s:
        w, h = s.dimensions
        tissue = detect_tissue(s)
    cell = 16
    shape = (h // cell + size0 // cell + 2, w // cell + size0 // cell + 2)
    rg, rc = _raster(g, size0, shape, cell), _raster(c, c_size0, shape, cell)
    frac_c = tissue.tissue_fraction(c, c_size0)
    frac_g = tissue.tissue_fraction(g, size0)
    return {
        "n_gigaslide": len(g),
        "n_clam": len(c),
        "area_gigaslide_covered_by_clam": float((rg & rc).sum() / max(rg.sum(), 1)),
        "area_clam_covered_by_gigaslide": float((rg & rc).sum() / max(rc.sum(), 1)),
        "clam_tiles_below_0.25_tissue": int((frac_c < 0.25).sum()),
        "clam_tiles_without_tissue": int((frac_c <= 1e-6).sum()),
        "clam_tissue_fraction_quartiles": [float(q) for q in np.quantile(frac_c, [0.25, 0.5, 0.75])],
        "gigaslide_tissue_fraction_quartiles": [float(q) for q in np.quantile(frac_g, [0.25, 0.5, 0.75])],
        "clam_grid_origin_mod_tile": sorted({(int(x) % size0, int(y) % size0) for x, y in c})[:4],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--clam", type=Path, default=None, help="folder of a CLAM checkout (create_patches_fp.py)"
    )
    ap.add_argument(
        "--slide", type=Path, default=None, help="slide to tile (default: a synthetic 30k px one)"
    )
    ap.add_argument("--size", type=int, default=SIZE, help="side of the synthetic slide (default 30000)")
    ap.add_argument("--runs", type=int, default=3, help="interleaved runs per tool (default 3)")
    ap.add_argument("--target-mpp", type=float, default=0.5)
    ap.add_argument("--tile-size", type=int, default=256)
    ap.add_argument("--out", type=Path, default=REPO / "bench_out")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    slide = args.slide or build_slide(args.out, args.size)

    from gigaslide.io import open_slide

    with open_slide(slide) as s:
        level = s.best_level_for(args.target_mpp)  # CLAM's --patch_level: same read level as ours
        if abs(s.level_mpp(level) - args.target_mpp) > 0.01 * args.target_mpp:
            print(
                f"note: no level at {args.target_mpp} um/px; CLAM reads level {level} at "
                f"{s.level_mpp(level):.3g} um/px without resizing, gigaslide resizes",
                file=sys.stderr,
            )
    clam = args.clam
    if clam is not None and not (clam / "create_patches_fp.py").is_file():
        print(f"error: {clam}/create_patches_fp.py not found (--clam is a CLAM checkout)", file=sys.stderr)
        return 2
    if clam is None:
        print("CLAM not given (--clam PATH): timing gigaslide only", file=sys.stderr)

    work = Path(tempfile.mkdtemp(prefix="tile_vs_clam-", dir=args.out))
    source = work / "source"
    source.mkdir()
    (source / slide.name).symlink_to(slide.resolve())
    results: dict[str, list[tuple[float, float]]] = {"gigaslide": [], "clam": []}
    try:
        for i in range(args.runs):
            g_out, c_out = work / f"g{i}", work / f"c{i}"
            results["gigaslide"].append(
                run_process(gigaslide_cmd(slide, g_out, args.target_mpp, args.tile_size))
            )
            if clam is not None:
                results["clam"].append(
                    run_process(clam_cmd(clam, source, c_out, args.tile_size, level), cwd=clam)
                )
            print(f"run {i + 1}/{args.runs}: " + ", ".join(f"{k} {v[-1][0]:.2f} s {v[-1][1]:.0f} MiB"
                  for k, v in results.items() if v), file=sys.stderr)  # fmt: skip
        comparison = None
        if clam is not None:
            c_file = work / "c0" / "patches" / f"{slide.stem}.h5"
            comparison = compare_tiles(slide, work / "g0" / "patches" / f"{slide.stem}.h5", c_file)
            # gigaslide with CLAM's four-point rule (on gigaslide's mask and grid), one untimed run
            run_process(
                [*gigaslide_cmd(slide, work / "gc", args.target_mpp, args.tile_size), "--tile-rule", "clam"]
            )
            with_rule = compare_tiles(slide, work / "gc" / "patches" / f"{slide.stem}.h5", c_file)
            comparison["with --tile-rule clam"] = {
                k: with_rule[k]
                for k in ("n_gigaslide", "area_gigaslide_covered_by_clam", "area_clam_covered_by_gigaslide")
            }
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def med(rows: list[tuple[float, float]], i: int) -> float:
        return float(np.median([r[i] for r in rows]))

    print(f"\nslide {slide} ({datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f})")  # fmt: skip
    print("| tool | wall s (runs) | median wall s | peak RSS MiB (median) |")
    print("|---|---|---:|---:|")
    for tool, rows in results.items():
        if rows:
            walls = " / ".join(f"{r[0]:.2f}" for r in rows)
            print(f"| {tool} | {walls} | {med(rows, 0):.2f} | {med(rows, 1):.0f} |")
    if results["clam"]:
        ratios = [c[0] / g[0] for g, c in zip(results["gigaslide"], results["clam"], strict=True)]
        print(
            f"\nCLAM / gigaslide wall-time ratio per interleaved pair: {', '.join(f'{r:.2f}' for r in ratios)}"
        )
        print(f"peak memory CLAM / gigaslide: {med(results['clam'], 1) / med(results['gigaslide'], 1):.2f}")
        print("\ntiles:", json.dumps(comparison, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
