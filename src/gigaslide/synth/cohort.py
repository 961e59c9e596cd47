"""A labelled cohort of synthetic slides: class labels and survival driven by morphology.

Each case draws a binary label; the label decides the tumour morphology of its slides:

* ``signal="local"``: what tiles look like. Label 1: tumour covers 25-50% of the tissue; label 0:
  at most 6% (mostly normal tissue). Arrangement is random.
* ``signal="spatial"``: how tiles are arranged. Every slide has 20-35% tumour; label 1 puts it in a
  band along the tissue border (invasive front), label 0 scatters it in small foci.
* ``signal="both"``: label 1 = high burden at the border, label 0 = low burden, scattered.

Survival depends on the same signal: hazard = h0 * exp(beta * risk), risk from the tumour burden
and/or the border pattern; times are exponential, censored by a uniform follow-up. Everything is
fixed by ``seed``.
"""

from __future__ import annotations

import json
import logging
import math
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from gigaslide.synth.tissue_content import make_layout
from gigaslide.synth.writer import write_layout_tiff
from gigaslide.utils.atomic import atomic_path, atomic_write_bytes, atomic_write_text

log = logging.getLogger(__name__)

SIGNALS = ("local", "spatial", "both")
BASE_HAZARD = 1.0 / 40.0  # per month
FOLLOW_UP = (18.0, 72.0)  # months: uniform censoring window


@dataclass(frozen=True)
class SlideJob:
    """Everything a worker needs to write one slide."""

    slide_id: str
    path: str
    mask_path: str
    width: int
    height: int
    mpp: float
    seed: int
    tumor_fraction: float
    tumor_pattern: str
    tile_size: int


def _write_one(job: SlideJob) -> dict[str, Any]:
    """Write one slide and its ground-truth mask; returns the realised tumour fraction and mask scale."""
    layout = make_layout(
        job.width,
        job.height,
        mpp=job.mpp,
        seed=job.seed,
        tumor_fraction=job.tumor_fraction,
        tumor_pattern=job.tumor_pattern,
    )
    # ground truth on the layout grid: 0 background, 1 normal tissue, 2 tumour (scaled for viewing)
    gt = layout.tissue_mask().astype(np.uint8) + layout.tumor_mask().astype(np.uint8)
    ok, png = cv2.imencode(".png", gt * 127)
    if not ok:
        raise OSError(f"could not encode the ground-truth mask for {job.mask_path}")
    atomic_write_bytes(job.mask_path, png.tobytes())
    extra = f"seed={job.seed}; tumor_fraction={layout.tumor_fraction:.4f}; tumor_pattern={job.tumor_pattern}"
    write_layout_tiff(layout, job.path, tile_size=job.tile_size, description_extra=extra)
    return {"slide_id": job.slide_id, "tumor_fraction": layout.tumor_fraction, "mask_downsample": layout.cell}


def _case_design(
    rng: np.random.Generator, n_cases: int, signal: str
) -> tuple[np.ndarray, np.ndarray, list[str], np.ndarray]:
    """Per case: label, target tumour fraction, tumour pattern, risk score."""
    labels = np.arange(n_cases) % 2
    rng.shuffle(labels)
    fractions = np.empty(n_cases)
    patterns: list[str] = []
    risk = np.empty(n_cases)
    for i, y in enumerate(labels):
        if signal == "local":
            fractions[i] = rng.uniform(0.25, 0.5) if y else rng.uniform(0.0, 0.06)
            patterns.append(str(rng.choice(["scattered", "clustered"])))
            risk[i] = 4.0 * fractions[i]
        elif signal == "spatial":
            fractions[i] = rng.uniform(0.2, 0.35)
            patterns.append("border" if y else "scattered")
            risk[i] = 1.5 * y
        else:  # both
            fractions[i] = rng.uniform(0.25, 0.45) if y else rng.uniform(0.02, 0.1)
            patterns.append("border" if y else "scattered")
            risk[i] = 2.0 * fractions[i] + 1.0 * y
    return labels, fractions, patterns, risk


def make_cohort(
    out_dir: str | Path,
    n_slides: int,
    seed: int = 0,
    *,
    width: int = 2048,
    height: int = 2048,
    mpp: float = 0.5,
    signal: str = "local",
    n_cases: int | None = None,
    slides_per_case: int = 1,
    workers: int = 1,
    tile_size: int = 256,
    overwrite: bool = False,
) -> pd.DataFrame:
    """Write ``out_dir/slides/<slide_id>.tiff``, ``out_dir/masks/<slide_id>.png`` and ``out_dir/labels.csv``.

    Args:
        out_dir: cohort folder.
        n_slides: number of slides.
        seed: fixes labels, survival and every pixel.
        width, height, mpp: level-0 geometry of every slide.
        signal: "local", "spatial" or "both" (see module docstring).
        n_cases: number of patients; slides are dealt to cases round-robin. Default:
            ``ceil(n_slides / slides_per_case)`` with consecutive slides sharing a case.
        slides_per_case: slides per case when ``n_cases`` is not given.
        workers: parallel processes writing slides.
        tile_size: TIFF tile side.
        overwrite: rewrite slides that already exist. Without it an interrupted run resumes: existing
            slides are kept when ``cohort.json`` shows the same parameters, and a parameter mismatch is
            refused.

    Returns:
        The labels table: slide_id, case_id, label, time, event, path, mpp, tumor_fraction,
        tumor_pattern, mask_path, mask_downsample.
    """
    if n_slides < 1:
        raise ValueError(f"n_slides must be >= 1, got {n_slides}")
    if signal not in SIGNALS:
        raise ValueError(f"unknown signal {signal!r}; choose one of {', '.join(SIGNALS)}")
    if slides_per_case < 1:
        raise ValueError(f"slides_per_case must be >= 1, got {slides_per_case}")
    if n_cases is not None and not 1 <= n_cases <= n_slides:
        raise ValueError(f"n_cases must be in 1..n_slides ({n_slides}), got {n_cases}")
    out_dir = Path(out_dir)
    params = {
        "n_slides": n_slides,
        "seed": seed,
        "width": width,
        "height": height,
        "mpp": mpp,
        "signal": signal,
        "n_cases": n_cases,
        "slides_per_case": slides_per_case,
        "tile_size": tile_size,
    }
    params_file = out_dir / "cohort.json"
    if params_file.exists() and not overwrite:
        old = json.loads(params_file.read_text())
        if old != params:
            raise ValueError(
                f"{params_file}: an existing cohort was made with different parameters ({old}); "
                "choose another output folder or pass overwrite=True (--overwrite) to regenerate it"
            )
    (out_dir / "slides").mkdir(parents=True, exist_ok=True)
    atomic_write_text(params_file, json.dumps(params, indent=2))

    rng = np.random.default_rng(seed)
    if n_cases is None:
        n_cases = math.ceil(n_slides / slides_per_case)
        case_of = np.arange(n_slides) // slides_per_case
    else:
        case_of = np.arange(n_slides) % n_cases
    labels, fractions, patterns, risk = _case_design(rng, n_cases, signal)
    hazard = BASE_HAZARD * np.exp(risk - risk.mean())
    t_event = rng.exponential(1.0 / hazard)
    t_censor = rng.uniform(*FOLLOW_UP, size=n_cases)
    event = (t_event <= t_censor).astype(int)
    time = np.maximum(np.minimum(t_event, t_censor), 0.1)
    slide_seeds = rng.integers(0, 2**31 - 1, size=n_slides)
    jitter = rng.uniform(-0.03, 0.03, size=n_slides)

    jobs: list[SlideJob] = []
    for i in range(n_slides):
        c = int(case_of[i])
        sid = f"slide_{i:03d}"
        frac = float(np.clip(fractions[c] + (jitter[i] if fractions[c] > 0.1 else 0.0), 0.0, 1.0))
        jobs.append(
            SlideJob(
                slide_id=sid,
                path=str((out_dir / "slides" / f"{sid}.tiff").resolve()),
                mask_path=str((out_dir / "masks" / f"{sid}.png").resolve()),
                width=int(width),
                height=int(height),
                mpp=float(mpp),
                seed=int(slide_seeds[i]),
                tumor_fraction=frac,
                tumor_pattern=patterns[c],
                tile_size=int(tile_size),
            )
        )

    results, failures = _run_jobs(jobs, workers, overwrite)
    rows = []
    for i, job in enumerate(jobs):
        if job.slide_id not in results:
            continue
        c = int(case_of[i])
        res = results[job.slide_id]
        rows.append(
            {
                "slide_id": job.slide_id,
                "case_id": f"case_{c:03d}",
                "label": int(labels[c]),
                "time": float(round(time[c], 4)),
                "event": int(event[c]),
                "path": job.path,
                "mpp": job.mpp,
                "tumor_fraction": round(float(res["tumor_fraction"]), 4),
                "tumor_pattern": job.tumor_pattern,
                "mask_path": job.mask_path,
                "mask_downsample": float(res["mask_downsample"]),
            }
        )
    df = pd.DataFrame(rows)
    with atomic_path(out_dir / "labels.csv") as tmp:
        df.to_csv(tmp, index=False)
    if failures:
        detail = "; ".join(f"{sid}: {err}" for sid, err in failures.items())
        raise RuntimeError(
            f"{len(failures)} of {n_slides} synthetic slides failed ({detail}); labels.csv lists the "
            f"{len(df)} written. Re-run the same command to retry the missing ones."
        )
    return df


def _cached_result(job: SlideJob) -> dict[str, Any] | None:
    """Result of an already-written slide (resume), recomputing only the cheap layout."""
    if not (Path(job.path).exists() and Path(job.mask_path).exists()):
        return None
    layout = make_layout(
        job.width,
        job.height,
        mpp=job.mpp,
        seed=job.seed,
        tumor_fraction=job.tumor_fraction,
        tumor_pattern=job.tumor_pattern,
    )
    return {"slide_id": job.slide_id, "tumor_fraction": layout.tumor_fraction, "mask_downsample": layout.cell}


def _run_jobs(
    jobs: list[SlideJob], workers: int, overwrite: bool
) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
    results: dict[str, dict[str, Any]] = {}
    failures: dict[str, str] = {}
    todo: list[SlideJob] = []
    for job in jobs:
        cached = None if overwrite else _cached_result(job)
        if cached is not None:
            results[job.slide_id] = cached
        else:
            todo.append(job)
    if len(todo) < len(jobs):
        log.info("resuming: %d of %d slides already written", len(jobs) - len(todo), len(jobs))
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            try:
                results[job.slide_id] = _write_one(job)
            except Exception as e:  # one bad slide must not stop the batch
                log.error("synthetic slide %s failed: %s", job.slide_id, e)
                failures[job.slide_id] = f"{type(e).__name__}: {e}"
        return results, failures
    import multiprocessing as mp

    with ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context("spawn")) as pool:
        futures = {job.slide_id: pool.submit(_write_one, job) for job in todo}
        for sid, fut in futures.items():
            try:
                results[sid] = fut.result()
            except Exception as e:
                log.error("synthetic slide %s failed: %s", sid, e)
                failures[sid] = f"{type(e).__name__}: {e}"
    return results, failures
