"""The per-slide job loop shared by tile embedding, region embedding and the Giga-SSL bank.

:func:`run_slide_jobs` takes the slides of a batch job and a callable that does one slide. It
shards the slides over ``torchrun`` ranks (a slide already done costs nothing, so the ranks share
the work that is left), runs this rank's slides under one progress bar, records a failing slide
and carries on, writes one manifest row per slide (``manifest.rank<r>.csv`` under torchrun,
``manifest.csv`` otherwise) and has rank 0 fold the rank manifests into ``manifest.csv``.
:class:`JobSummary` is what the three jobs return.
"""

from __future__ import annotations

import csv
import io
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from tqdm.auto import tqdm

from gigaslide.pipeline.embed_inputs import SlideJob
from gigaslide.utils import dist as gdist
from gigaslide.utils.atomic import atomic_write_text
from gigaslide.utils.manifest import STATUS_DONE, STATUS_FAILED, Manifest

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
RANK_MANIFESTS = "manifest.rank*.csv"


class SlideOutcome(Protocol):
    """What a per-slide callable returns: one manifest row and how the slide went."""

    slide_id: str
    status: str
    error: str
    rank: int
    skipped: bool  # already complete before this run
    computed: int  # tiles (or regions) computed in this run

    def row(self) -> dict[str, Any]: ...


R = TypeVar("R", bound=SlideOutcome)


@dataclass
class JobSummary:
    """What a slide job did on this rank (all ranks merged into ``manifest`` on rank 0)."""

    out_dir: Path
    manifest: Path
    results: list[Any] = field(default_factory=list)  # SlideOutcome rows of this rank
    seconds: float = 0.0
    random_init: bool = False
    verb: str = "embedded"  # how describe() names the work done
    unit: str = "tiles"

    @property
    def n_done(self) -> int:
        return sum(r.status == STATUS_DONE and not r.skipped for r in self.results)

    @property
    def n_skipped(self) -> int:
        return sum(r.skipped for r in self.results)

    @property
    def failed(self) -> dict[str, str]:
        return {r.slide_id: r.error for r in self.results if r.status == STATUS_FAILED}

    @property
    def n_failed(self) -> int:
        return len(self.failed)

    @property
    def tiles(self) -> int:
        return sum(r.computed for r in self.results)

    def describe(self) -> str:
        rate = self.tiles / self.seconds if self.seconds > 0 else 0.0
        lines = [
            f"{self.verb} {self.n_done} slide(s), skipped {self.n_skipped} already done, {self.n_failed} failed; "
            f"{self.tiles} {self.unit} in {self.seconds:.1f} s ({rate:.1f} {self.unit.split()[0]}/s) -> {self.out_dir}"
        ]
        lines += [f"  FAILED {sid}: {err}" for sid, err in sorted(self.failed.items())]
        return "\n".join(lines)

    def report(self, distributed: bool) -> tuple[str, int]:
        """:meth:`describe`, plus under torchrun a line on every rank's failures read from the merged
        manifest (rank 0 merges it), and the number of failed slides a command should exit on."""
        text, n_failed = self.describe(), self.n_failed
        if distributed:
            failed = {r["slide_id"] for r in read_rows(self.manifest) if r.get("status") == STATUS_FAILED}
            text += f"\nall ranks: {len(failed)} slide(s) failed; manifest {self.manifest}"
            n_failed = max(n_failed, len(failed))
        return text, n_failed


def read_rows(path: Path) -> list[dict[str, str]]:
    """The rows of a manifest CSV; none when it does not exist."""
    if not path.exists():
        return []
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def merge_manifests(main: Path, shards: list[Path], columns: Sequence[str] = ("slide_id",)) -> Path:
    """Fold rank manifests into ``main`` (later rows win), write it atomically, delete the shards.

    ``columns`` is the preferred column order; columns seen only in the rows follow it.
    """
    rows: dict[str, dict[str, str]] = {r["slide_id"]: r for r in read_rows(main)}
    names = list(columns)
    for shard_path in shards:
        for r in read_rows(shard_path):
            rows[r["slide_id"]] = {**rows.get(r["slide_id"], {}), **r}
    for r in rows.values():
        names += [c for c in r if c not in names]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=names, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for sid in sorted(rows):
        writer.writerow({c: rows[sid].get(c, "") for c in names})
    atomic_write_text(main, buf.getvalue())
    for shard_path in shards:
        shard_path.unlink(missing_ok=True)
    return main


def run_slide_jobs(
    jobs: Sequence[SlideJob],
    run_slide: Callable[[SlideJob, tqdm], R],
    failure: Callable[[SlideJob, float, str], R],
    *,
    out: Path,
    columns: Sequence[str],
    dist_info: gdist.DistInfo,
    unit: str,
    desc: str,
    progress: bool,
    output_file: Callable[[str], Path] | None = None,
    work: Callable[[SlideJob], int] | None = None,
) -> list[R]:
    """Run this rank's share of ``jobs``; return its outcomes (one per slide, in job order).

    Args:
        jobs: every slide of the job, in the same order on every rank.
        run_slide: does one slide, advancing the bar by the units it computes (or lowering its
            total by those it skips); any exception it raises is the slide's failure.
        failure: the outcome of a failed slide from (job, seconds spent, ``"Type: message"``).
        out: the output folder (``manifest.csv`` and the rank manifests live there).
        columns: manifest column order.
        dist_info: this process's rank; unit, desc, progress: the progress bar.
        output_file: the finished file of a slide id (default ``out/h5_files/<slide_id>.h5``). A
            slide whose file exists and whose manifest row says done costs nothing in the sharding
            and keeps its row when skipped.
        work: units of work of a slide (the progress bar's total and the sharding weight;
            default its tile count ``job.n_tiles``).
    """
    info = dist_info
    output_file = output_file or (lambda sid: out / "h5_files" / f"{sid}.h5")
    work = work or (lambda job: job.n_tiles)
    main = out / MANIFEST
    if info.is_main:  # fold rank manifests left by an interrupted distributed run
        merge_manifests(main, sorted(out.glob(RANK_MANIFESTS)), columns)
    gdist.barrier()
    done_before = {r["slide_id"] for r in read_rows(main) if r.get("status") == STATUS_DONE}

    def finished(job: SlideJob) -> bool:
        return job.slide_id in done_before and output_file(job.slide_id).exists()

    cost = [0.0 if finished(j) else work(j) + 1.0 for j in jobs]
    mine = gdist.shard(jobs, info.rank, info.world_size, weights=cost)
    manifest = Manifest(
        out / f"manifest.rank{info.rank}.csv" if info.is_distributed else main, columns=columns
    )
    results: list[R] = []
    label = f"{desc}[{info.rank}]" if info.is_distributed else desc
    total = sum(work(j) for j in mine)
    with tqdm(total=total, unit=unit, desc=label, disable=not progress, dynamic_ncols=True) as pbar:
        for job in mine:
            t_slide = time.perf_counter()
            try:
                result = run_slide(job, pbar)
            except Exception as e:
                log.error("%s: %s", job.slide_id, e)
                result = failure(job, time.perf_counter() - t_slide, f"{type(e).__name__}: {e}")
            result.rank = info.rank
            results.append(result)
            if not (result.skipped and job.slide_id in done_before):  # keep the original timing row
                manifest.update(job.slide_id, result.row())
    gdist.barrier()
    if info.is_distributed and info.is_main:
        merge_manifests(main, sorted(out.glob(RANK_MANIFESTS)), columns)
    return results
