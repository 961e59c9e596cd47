"""The per-slide job loop: sharding by remaining work, failures recorded, manifests written and merged."""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import pytest
from tqdm.auto import tqdm

from gigaslide.pipeline.embed_inputs import SlideJob
from gigaslide.pipeline.embed_job import MANIFEST_COLUMNS, SlideResult, failed_slide
from gigaslide.pipeline.slide_jobs import JobSummary, merge_manifests, run_slide_jobs
from gigaslide.utils.dist import DistInfo
from gigaslide.utils.manifest import Manifest

SIZES = {"a": 10, "b": 6, "c": 5, "d": 1}


def jobs(tmp_path: Path) -> list[SlideJob]:
    return [
        SlideJob(sid, tmp_path / f"{sid}.h5", tmp_path / f"{sid}.tiff", n_tiles=n) for sid, n in SIZES.items()
    ]


class FakeJob:
    """A per-slide callable: writes OUT/h5_files/<id>.h5, fails on the ids in ``fail``."""

    def __init__(self, out: Path, fail: tuple[str, ...] = ()) -> None:
        self.out, self.fail, self.seen = out, fail, []

    def file(self, sid: str) -> Path:
        return self.out / "h5_files" / f"{sid}.h5"

    def __call__(self, job: SlideJob, pbar: tqdm) -> SlideResult:
        self.seen.append(job.slide_id)
        if job.slide_id in self.fail:
            raise OSError(f"cannot read {job.slide_path}")
        if self.file(job.slide_id).exists():
            return SlideResult(job.slide_id, "done", job.n_tiles, 8, skipped=True)
        self.file(job.slide_id).parent.mkdir(parents=True, exist_ok=True)
        self.file(job.slide_id).write_bytes(b"x")
        pbar.update(job.n_tiles)
        return SlideResult(job.slide_id, "done", job.n_tiles, 8, 1.0, job.n_tiles, computed=job.n_tiles)


def run(tmp_path: Path, fake: FakeJob, info: DistInfo | None = None) -> list[SlideResult]:
    return run_slide_jobs(
        jobs(tmp_path),
        fake,
        failed_slide,
        out=fake.out,
        columns=MANIFEST_COLUMNS,
        output_file=fake.file,
        work=lambda j: j.n_tiles,
        dist_info=info or DistInfo(),
        unit="tile",
        desc="test",
        progress=False,
    )


def rows(path: Path) -> dict[str, dict[str, str]]:
    with path.open(newline="") as f:
        return {r["slide_id"]: r for r in csv.DictReader(f)}


def test_a_failing_slide_is_recorded_and_the_others_run(tmp_path: Path, caplog) -> None:
    fake = FakeJob(tmp_path / "out", fail=("b",))
    with caplog.at_level(logging.ERROR, logger="gigaslide.pipeline.slide_jobs"):
        results = run(tmp_path, fake)
    assert fake.seen == ["a", "b", "c", "d"] and [r.status for r in results] == [
        "done",
        "failed",
        "done",
        "done",
    ]
    assert "b: cannot read" in caplog.text
    summary = JobSummary(fake.out, fake.out / "manifest.csv", results, seconds=2.0)
    assert summary.failed == {"b": f"OSError: cannot read {tmp_path / 'b.tiff'}"}
    assert (summary.n_done, summary.n_skipped, summary.tiles) == (3, 0, 16)
    assert summary.describe().splitlines() == [
        f"embedded 3 slide(s), skipped 0 already done, 1 failed; 16 tiles in 2.0 s (8.0 tiles/s) -> {fake.out}",
        f"  FAILED b: OSError: cannot read {tmp_path / 'b.tiff'}",
    ]
    assert summary.report(distributed=False) == (summary.describe(), 1)
    text, n_failed = summary.report(distributed=True)  # the merged manifest counts every rank's failures
    assert text.splitlines()[-1] == f"all ranks: 1 slide(s) failed; manifest {fake.out / 'manifest.csv'}"
    assert n_failed == 1
    ok_here = JobSummary(fake.out, fake.out / "manifest.csv", [r for r in results if r.slide_id != "b"])
    assert ok_here.n_failed == 0 and ok_here.report(distributed=True)[1] == 1  # another rank's failure
    manifest = rows(fake.out / "manifest.csv")
    assert list(next(iter(manifest.values()))) == list(MANIFEST_COLUMNS)
    assert manifest["b"]["status"] == "failed" and manifest["b"]["n_tiles"] == "6"
    assert manifest["a"]["status"] == "done" and manifest["a"]["seconds"] == "1.000"
    # the rerun retries the failed slide and keeps the rows of the finished ones
    fake.fail = ()
    again = run(tmp_path, fake)
    assert [r.skipped for r in again] == [True, False, True, True]
    rerun = rows(fake.out / "manifest.csv")
    assert rerun["b"]["status"] == "done" and rerun["a"] == manifest["a"]


def test_ranks_share_the_remaining_work_and_rank_0_merges(tmp_path: Path) -> None:
    out = tmp_path / "out"
    FakeJob(out).file("a").parent.mkdir(parents=True)
    FakeJob(out).file("a").write_bytes(b"x")  # a finished in an earlier run: it costs nothing now
    Manifest(out / "manifest.csv", columns=MANIFEST_COLUMNS).update(
        "a", {"status": "done", "seconds": "9.000"}
    )
    fakes = {r: FakeJob(out) for r in (0, 1)}
    for rank in (1, 0):  # rank 0 last: it merges the rank manifests
        run(tmp_path, fakes[rank], DistInfo(rank=rank, world_size=2, is_distributed=True))
    # rank 1, costs (tiles + 1): b 7 -> rank 0, c 6 -> rank 1, d 2 -> rank 1, a 0 (done) -> rank 0.
    # Rank 0 (run after rank 1 here, side by side under torchrun) first folds rank 1's rows in: only b
    # is left to do, the finished a, c, d cost nothing and go to the lighter rank 1
    assert fakes[1].seen == ["c", "d"] and fakes[0].seen == ["b"]
    merged = rows(out / "manifest.csv")
    assert {sid: r["rank"] for sid, r in merged.items()} == {"a": "", "b": "0", "c": "1", "d": "1"}
    assert merged["a"]["seconds"] == "9.000" and not list(out.glob("manifest.rank*.csv"))


def test_rank_manifests_of_an_interrupted_run_are_folded_in_first(tmp_path: Path) -> None:
    out = tmp_path / "out"
    fake = FakeJob(out)
    for sid in ("a", "c"):  # finished by ranks 0 and 1 of a killed torchrun run
        fake.file(sid).parent.mkdir(parents=True, exist_ok=True)
        fake.file(sid).write_bytes(b"x")
    Manifest(out / "manifest.rank0.csv", columns=MANIFEST_COLUMNS).update("a", {"status": "done", "rank": 0})
    Manifest(out / "manifest.rank1.csv", columns=MANIFEST_COLUMNS).update("c", {"status": "done", "rank": 1})
    results = run(tmp_path, fake)  # one process now
    assert {r.slide_id for r in results if r.skipped} == {"a", "c"}
    merged = rows(out / "manifest.csv")
    assert sorted(merged) == ["a", "b", "c", "d"] and merged["c"]["rank"] == "1"
    assert not list(out.glob("manifest.rank*.csv"))


def test_merge_manifests_later_rows_win_and_columns_keep_their_order(tmp_path: Path) -> None:
    main = tmp_path / "manifest.csv"
    main.write_text("slide_id,status,note\na,failed,old\n")
    (tmp_path / "manifest.rank0.csv").write_text("slide_id,status,bank_file\na,done,a.h5\n")
    (tmp_path / "manifest.rank1.csv").write_text("slide_id,status,bank_file\nb,done,b.h5\n")
    shards = sorted(tmp_path.glob("manifest.rank*.csv"))
    merge_manifests(main, shards, columns=("slide_id", "status", "bank_file"))
    assert main.read_text().splitlines() == [
        "slide_id,status,bank_file,note",
        "a,done,a.h5,old",
        "b,done,b.h5,",
    ]
    assert not any(p.exists() for p in shards)


@pytest.mark.parametrize("world", [1, 3])
def test_every_slide_runs_once_over_all_ranks(tmp_path: Path, world: int) -> None:
    out = tmp_path / "out"
    seen: list[str] = []
    for rank in reversed(range(world)):
        fake = FakeJob(out)
        run(tmp_path, fake, DistInfo(rank=rank, world_size=world, is_distributed=world > 1))
        seen += fake.seen
    assert sorted(seen) == sorted(SIZES)
    assert {sid: r["status"] for sid, r in rows(out / "manifest.csv").items()} == dict.fromkeys(SIZES, "done")
