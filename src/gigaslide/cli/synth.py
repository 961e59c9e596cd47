"""`gigaslide synth`: write a labelled cohort of synthetic H&E slides (demo and test data)."""

from __future__ import annotations

import argparse
import time

from gigaslide.cli.common import add_wait_argument, output_folder


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "synth",
        help="write a synthetic slide cohort (pyramidal TIFFs + labels.csv)",
        description="Write OUT/slides/<slide_id>.tiff (pyramidal JPEG TIFF with mpp), OUT/masks/<slide_id>.png "
        "(ground truth: 0 background, 127 normal, 254 tumour) and OUT/labels.csv "
        "(slide_id, case_id, label, time, event, path, mpp, ...).",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n-slides", type=int, default=24, help="number of slides (default 24)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--width", type=int, default=2048, help="level-0 width in pixels (default 2048)")
    p.add_argument("--height", type=int, default=2048, help="level-0 height in pixels (default 2048)")
    p.add_argument("--mpp", type=float, default=0.5, help="microns per pixel at level 0 (default 0.5)")
    p.add_argument(
        "--signal",
        choices=["local", "spatial", "both"],
        default="local",
        help="what the label depends on: tumour burden (local), tumour arrangement (spatial), or both",
    )
    p.add_argument("--n-cases", type=int, default=None, help="number of patients (slides dealt round-robin)")
    p.add_argument(
        "--slides-per-case", type=int, default=1, help="slides per patient when --n-cases is unset"
    )
    p.add_argument("--tile-size", type=int, default=256, help="TIFF tile side (default 256)")
    p.add_argument("--workers", type=int, default=1, help="parallel writer processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="regenerate slides that already exist")
    add_wait_argument(p)
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.synth.cohort import make_cohort

    t0 = time.perf_counter()
    with output_folder(args.out, wait=args.wait):  # bad input raises: cli.main reports it (exit 2)
        df = make_cohort(
            args.out,
            args.n_slides,
            seed=args.seed,
            width=args.width,
            height=args.height,
            mpp=args.mpp,
            signal=args.signal,
            n_cases=args.n_cases,
            slides_per_case=args.slides_per_case,
            workers=args.workers,
            tile_size=args.tile_size,
            overwrite=args.overwrite,
        )
    n_pos = int(df["label"].sum())
    print(
        f"wrote {len(df)} slides ({n_pos} label 1, {len(df) - n_pos} label 0, "
        f"{df['case_id'].nunique()} cases, {int(df['event'].sum())} events) to {args.out} "
        f"in {time.perf_counter() - t0:.1f} s; labels: {args.out}/labels.csv"
    )
    return 0
