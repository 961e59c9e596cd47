"""Tile-reading benchmark: gigaslide's reader path vs OpenSlide vs the raw JPEG decode ceiling.

Builds (once, cached under ``bench_out/``) a large JPEG-tiled 256x256 pyramidal TIFF at
0.5 um/px whose content repeats real tissue (CMU-1 read through OpenSlide; synthetic
tissue when ../shared/data is absent), then measures on the same 256x256 grid at 0.5 um/px:

  (a) ``TileDataset`` + torch ``DataLoader`` with one worker process per core,
  (a') ``TileDataset`` + ``TileLoader`` with one reader thread per core, in one process,
  (b) a plain single-process ``openslide.OpenSlide.read_region`` loop,
  (c) the decode ceiling: imagecodecs.jpeg_decode of the same tile bitstreams, held in memory, one core,
  (d) single-process ``read_region`` loops of tiff-direct, tiffslide and OpenSlide side by side,
  (b), (c) and (d) run interleaved chunk by chunk, so load changes on a shared machine hit them alike;
  around (a) and (a') the ceiling is re-sampled on one core and with one decoding thread per worker
  (what the shared cores could decode at that moment);
  plus the time to detect tissue and compute coordinates (``tile_slide``).

Usage: ``python bench/tiles.py [--size 40000] [--quick] [--workers N] [--out bench_out]``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "cmu-1-small-region.svs"
MPP = 0.5
TILE = 256


# -- slide construction ---------------------------------------------------------------------
def load_pattern(source: Path) -> tuple[np.ndarray, str]:
    """(H, W, 3) uint8 content to repeat; dims divisible by 64 so every pyramid level repeats exactly."""
    if source.is_file():
        import openslide

        with openslide.OpenSlide(str(source)) as osr:
            w, h = osr.dimensions
            w, h = (w // 64) * 64, (h // 64) * 64
            rgb = np.asarray(osr.read_region((0, 0), 0, (w, h)).convert("RGB"))
        return rgb, f"CMU-1 crop {w}x{h} read with OpenSlide"
    print(f"note: {source} not found; repeating synthetic tissue-like content instead", file=sys.stderr)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:2048, 0:2048].astype(np.float32)
    field = np.zeros_like(xx)
    for _ in range(40):
        cy, cx, r = rng.uniform(0, 2048), rng.uniform(0, 2048), rng.uniform(40, 300)
        field += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))
    noise = rng.normal(0, 18, xx.shape)
    field = np.clip(field, 0, 1)
    rgb = np.stack([235 - 60 * field + noise, 225 - 130 * field + noise, 235 - 70 * field + noise], -1)
    return np.clip(rgb, 0, 255).astype(np.uint8), "synthetic tissue-like pattern 2048x2048"


def _tiles(pattern: np.ndarray, width: int, height: int) -> Iterator[np.ndarray]:
    """Row-major 256x256 tiles of the plane that repeats ``pattern`` periodically."""
    ph, pw = pattern.shape[:2]
    ramp = np.arange(TILE)
    for ty in range(-(-height // TILE)):
        rows = (ty * TILE + ramp) % ph
        band = pattern[rows]  # (256, pw, 3)
        for tx in range(-(-width // TILE)):
            yield np.ascontiguousarray(band[:, (tx * TILE + ramp) % pw])


def build_slide(path: Path, size: int, source: Path) -> str:
    """Write a size x size pyramid (downsamples 1, 4, 16, ...) repeating the source content."""
    import cv2
    import tifffile

    from gigaslide.utils.atomic import atomic_path

    pattern, description = load_pattern(source)
    levels = []
    ds = 1
    while True:
        levels.append(ds)
        if size // (ds * 4) < 1024:
            break
        ds *= 4
    print(f"building {path} ({size}x{size}, levels {levels}) from {description} ...", flush=True)
    t0 = time.perf_counter()
    res = (1e4 / MPP, 1e4 / MPP)
    with atomic_path(path) as tmp, tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        for k, ds in enumerate(levels):
            lvl_pattern = pattern
            if ds > 1:
                ph, pw = pattern.shape[:2]
                lvl_pattern = cv2.resize(pattern, (pw // ds, ph // ds), interpolation=cv2.INTER_AREA)
            w = h = size // ds
            tw.write(
                _tiles(lvl_pattern, w, h),
                shape=(h, w, 3),
                dtype=np.uint8,
                tile=(TILE, TILE),
                photometric="rgb",
                compression="jpeg",
                compressionargs={"level": 80},
                resolution=(res[0] / ds, res[1] / ds),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                description=f"gigaslide bench slide: {description}" if k == 0 else None,
            )
    print(f"  built in {time.perf_counter() - t0:.1f} s, {path.stat().st_size / 1e6:.0f} MB", flush=True)
    return description


# -- measurements ---------------------------------------------------------------------------
def timed(fn: Callable[..., object], *args: object) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


class Readers:
    """The single-process read paths over the same coordinates; each call reads one chunk of tiles."""

    def __init__(self, path: Path, coords: np.ndarray) -> None:
        import imagecodecs
        import openslide
        import tifffile

        from gigaslide.io import open_slide

        self._decode = imagecodecs.jpeg_decode
        with tifffile.TiffFile(path) as tf:
            page = tf.pages[0]
            across = -(-page.imagewidth // TILE)
            offsets, counts, self.tables = page.dataoffsets, page.databytecounts, page.jpegtables
        fd = os.open(path, os.O_RDONLY)
        idx = [(int(y) // TILE) * across + int(x) // TILE for x, y in coords]
        self.blobs = [os.pread(fd, counts[i], offsets[i]) for i in idx]  # the bitstreams, held in memory
        os.close(fd)
        self.coords = [(int(x), int(y)) for x, y in coords]
        self.osr = openslide.OpenSlide(str(path))
        self.direct = open_slide(path, backend="tiff-direct")
        self.tiffslide = open_slide(path, backend="tiffslide")

    def ceiling(self, lo: int, hi: int) -> None:
        for b in self.blobs[lo:hi]:
            self._decode(b, tables=self.tables, outcolorspace="RGB")

    def tiff_direct(self, lo: int, hi: int) -> None:
        for loc in self.coords[lo:hi]:
            self.direct.read_region(loc, 0, (TILE, TILE))

    def openslide(self, lo: int, hi: int) -> None:
        for loc in self.coords[lo:hi]:
            np.asarray(self.osr.read_region(loc, 0, (TILE, TILE)).convert("RGB"))

    def tiffslide_(self, lo: int, hi: int) -> None:
        for loc in self.coords[lo:hi]:
            self.tiffslide.read_region(loc, 0, (TILE, TILE))


def interleaved(readers: Readers, dataset: object | None = None, n_chunks: int = 16) -> dict[str, float]:
    """Seconds per path, running the paths alternately chunk by chunk so load swings hit all alike.

    ``dataset`` (a TileDataset over the same coordinates) adds its ``__getitem__`` loop in this process.
    """
    paths = {
        "ceiling": readers.ceiling,
        "tiff-direct": readers.tiff_direct,
        "openslide": readers.openslide,
        "tiffslide": readers.tiffslide_,
    }
    if dataset is not None:

        def items(lo: int, hi: int) -> None:
            for i in range(lo, hi):
                dataset[i]  # type: ignore[index]

        paths["dataset"] = items
    seconds = dict.fromkeys(paths, 0.0)
    bounds = np.linspace(0, len(readers.coords), n_chunks + 1).astype(int)
    for lo, hi in itertools.pairwise(bounds.tolist()):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            fn(int(lo), int(hi))
            seconds[name] += time.perf_counter() - t0
    return seconds


def ceiling_sample(readers: Readers, n: int = 2000, threads: int = 1) -> float:
    """Decode-ceiling rate (tiles/s) on a sample, to bracket a measurement made at another time.

    With ``threads`` > 1 the sample is decoded by that many threads (imagecodecs releases the
    GIL): what the cores this process actually gets can decode together at this moment.
    """
    n = min(n * threads, len(readers.blobs))
    t0 = time.perf_counter()
    if threads == 1:
        readers.ceiling(0, n)
    else:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda lo: readers.ceiling(lo, min(lo + 64, n)), range(0, n, 64)))
    return n / (time.perf_counter() - t0)


def drain(loader: Iterable[tuple[Any, Any]]) -> tuple[float, int, float, int]:
    """Consume a tile loader: (total seconds, tiles, seconds after the first batch, tiles after it)."""
    n = 0
    t0 = time.perf_counter()
    t_first, n_first = t0, 0
    for images, _ in loader:
        n += images.shape[0]
        if n_first == 0:
            t_first, n_first = time.perf_counter(), n
    end = time.perf_counter()
    return end - t0, n, end - t_first, n - n_first


def dataloader_rate(
    path: Path, coords: np.ndarray, spec: object, workers: int, batch: int
) -> tuple[float, int, float, int]:
    """(total seconds, tiles, steady-state seconds after the first batch, tiles after the first batch)."""
    import torch
    from torch.utils.data import DataLoader

    from gigaslide.data.tile_dataset import TileDataset, collate_tiles

    torch.set_num_threads(1)
    ds = TileDataset(path, coords, spec)
    # batched reads straight into shared memory: the hand-over to the main process copies nothing
    loader = DataLoader(
        ds,
        batch_size=batch,
        num_workers=workers,
        shuffle=False,
        persistent_workers=False,
        collate_fn=collate_tiles,
    )
    return drain(loader)


def tileloader_rate(
    path: Path, coords: np.ndarray, spec: object, threads: int, batch: int
) -> tuple[float, int, float, int]:
    """As :func:`dataloader_rate`, for a :class:`TileLoader` with ``threads`` reader threads."""
    import torch

    from gigaslide.data.tile_dataset import TileDataset
    from gigaslide.data.tile_loader import TileLoader

    torch.set_num_threads(1)
    # as the embedding pipeline runs it: batch tensors recycled from a ring
    ds = TileDataset(path, coords, spec)
    loader = TileLoader(ds, batch_size=batch, num_threads=threads, reuse_buffers=True)
    return drain(loader)


def wait_for(module_file: Path, timeout: float) -> bool:
    t0 = time.time()
    while not module_file.exists():
        if time.time() - t0 > timeout:
            return False
        print(f"waiting for {module_file} ...", flush=True)
        time.sleep(15)
    return True


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"nproc": str(os.cpu_count()), "cpu": cpu, "python": platform.python_version()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=40_000, help="slide side in px at level 0 (default 40000)")
    p.add_argument("--quick", action="store_true", help="8192 px slide and at most 3000 tiles per loop")
    p.add_argument(
        "--workers",
        type=int,
        default=os.cpu_count() or 1,
        help="DataLoader worker processes and TileLoader threads (default nproc)",
    )
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-tiles", type=int, default=0, help="cap the tiles per single-process loop (0: all)")
    p.add_argument("--source", type=Path, default=DEFAULT_SOURCE, help="slide whose content is repeated")
    p.add_argument("--out", type=Path, default=REPO / "bench_out")
    p.add_argument(
        "--wait", type=float, default=0, help="seconds to wait for TileDataset/tile_slide to exist"
    )
    args = p.parse_args(argv)
    size = 8192 if args.quick and args.size == 40_000 else args.size
    max_tiles = args.max_tiles or (3000 if args.quick else 0)

    sys.path.insert(0, str(REPO / "src"))
    path = args.out / f"bench_slide_{size}.tiff"
    source_desc = "cached"
    if not path.exists():
        source_desc = build_slide(path, size, args.source)

    from gigaslide.io import open_slide

    results: dict[str, object] = {
        "machine": machine(),
        "size": size,
        "slide": str(path),
        "source": source_desc,
    }
    results["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    slide = open_slide(path)
    assert slide.backend == "tiff-direct", slide.backend
    across, down = size // TILE, size // TILE
    gy, gx = np.mgrid[0:down, 0:across]
    coords = (np.stack([gx.ravel(), gy.ravel()], 1) * TILE).astype(np.int64)  # (N, 2) full tiles
    loop_coords = coords[:max_tiles] if max_tiles else coords
    print(
        f"slide {size}x{size}, {len(coords)} full 256x256 tiles at {MPP} um/px; loops over {len(loop_coords)}"
    )

    rows: list[tuple[str, int, float]] = []  # (what, tiles, seconds); (a) without worker start-up
    tiling = REPO / "src" / "gigaslide" / "preprocess" / "tiling.py"
    dataset = REPO / "src" / "gigaslide" / "data" / "tile_dataset.py"
    if args.wait:
        wait_for(tiling, args.wait)
        wait_for(dataset, args.wait)
    spec = None
    if tiling.exists():
        from gigaslide.preprocess.tiling import tile_slide

        secs, res = timed(tile_slide, open_slide(path), MPP, TILE)
        spec = res.spec
        results["tile_slide_seconds"] = secs
        results["tile_slide_tiles"] = len(res.coords)
        print(f"tissue detection + coordinates (tile_slide): {secs:.2f} s, {len(res.coords)} tissue tiles")
    else:
        print("gigaslide.preprocess.tiling not present: skipping tissue detection timing")

    readers = Readers(path, loop_coords)
    n = len(loop_coords)
    in_process = None
    if spec is not None and dataset.exists():
        from gigaslide.data.tile_dataset import TileDataset

        in_process = TileDataset(path, loop_coords, spec)
    secs = interleaved(readers, in_process)
    if in_process is not None:
        rows.append(("(a1) TileDataset[i] loop, 1 process", n, secs["dataset"]))
    rows.append(("(c) jpeg_decode ceiling, 1 core", n, secs["ceiling"]))
    rows.append(("(d) tiff-direct read_region, 1 process", n, secs["tiff-direct"]))
    rows.append(("(b) OpenSlide read_region, 1 process", n, secs["openslide"]))
    rows.append(("(d) tiffslide read_region, 1 process", n, secs["tiffslide"]))
    workers = max(1, args.workers)
    around: dict[str, float] = {}  # the 1-core ceiling re-sampled just before and after each loader run
    around_n: dict[str, float] = {}  # the same with `workers` decoding threads
    a_name = f"(a) TileDataset+DataLoader, {workers} worker processes"
    t_name = f"(a') TileDataset+TileLoader, {workers} threads"
    if spec is not None and dataset.exists():
        before, before_n = ceiling_sample(readers), ceiling_sample(readers, threads=workers)
        for name, fn in ((a_name, dataloader_rate), (t_name, tileloader_rate)):
            total, n_all, steady_secs, steady_n = fn(path, coords, spec, workers, args.batch_size)
            after, after_n = ceiling_sample(readers), ceiling_sample(readers, threads=workers)
            around[name], around_n[name] = (before + after) / 2, (before_n + after_n) / 2
            before, before_n = after, after_n
            rows.append((f"{name}, total", n_all, total))
            rows.append((name, steady_n, steady_secs))
        results["ceiling_around_loaders_tiles_per_s"] = around
        results[f"ceiling_{workers}_threads_around_loaders_tiles_per_s"] = around_n
    else:
        print("TileDataset or tile_slide not present: skipping (a) and (a')")

    rate = {name: n / s for name, n, s in rows}
    print(f"\n{'path':52s} {'tiles':>7s} {'seconds':>8s} {'tiles/s':>9s}")
    for name, n, s in rows:
        print(f"{name:52s} {n:7d} {s:8.2f} {n / s:9.0f}")
    ceiling = rate["(c) jpeg_decode ceiling, 1 core"]
    osl = rate["(b) OpenSlide read_region, 1 process"]
    direct = rate["(d) tiff-direct read_region, 1 process"]
    cores = min(workers, os.cpu_count() or 1)
    ratios = {
        "tiff-direct / OpenSlide (1 process)": direct / osl,
        "tiff-direct / ceiling (1 process)": direct / ceiling,
    }
    if "(a1) TileDataset[i] loop, 1 process" in rate:
        ratios["(a1) / (c) (1 process)"] = rate["(a1) TileDataset[i] loop, 1 process"] / ceiling
    for tag, name in (("(a)", a_name), ("(a')", t_name)):
        if name in rate:
            ratios[f"{tag} / (b)"] = rate[name] / osl
            # the ceiling sampled just before and after the run: the shared machine's load drifts
            ratios[f"{tag} per core ({cores}) / (c)"] = rate[name] / cores / around[name]
            # against what `workers` threads of pure decoding got from the shared cores meanwhile
            ratios[f"{tag} / (c) with {workers} threads"] = rate[name] / around_n[name]
    if a_name in rate and t_name in rate:
        ratios["(a') / (a)"] = rate[t_name] / rate[a_name]
    print()
    for k, v in ratios.items():
        print(f"{k:52s} {v:6.2f}")
    results["rows"] = [{"path": name, "tiles": n, "seconds": s, "tiles_per_s": n / s} for name, n, s in rows]
    results["ratios"] = ratios
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"tiles_results_{size}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"\nmachine: {results['machine']}; results written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
