"""DINO, LongViT DINO and HIPT stage 2 under torch.distributed: 2 gloo processes with B items each end
with the same student, teacher and center as one process with 2B items (the same global batches), log
the global batch's loss, keep identical replicas, and resume exactly after an interruption."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gigaslide.ssl.dino import DINOConfig, DINOObjective, build_dino, run_dino
from gigaslide.ssl.multicrop import MultiCropConfig
from gigaslide.train.engine import Engine
from gigaslide.utils.dist import from_main

torch.set_num_threads(1)

WORLD, B = 2, 2  # processes, items per process and step

# drop path off: stochastic depth draws per-sample masks from the RNG stream, and one process drawing
# for 2B items takes other draws than two processes drawing for B each (a different, equally valid run)
DINO = DINOConfig(out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0, lr=2.0,
                  warmup_teacher_temp_epochs=1, freeze_last_layer=0, momentum_teacher=0.9, drop_path_rate=0.0,
                  crops=MultiCropConfig(global_size=32, local_size=16, n_local=1))  # fmt: skip
VIT = {"depth": 1, "embed_dim": 32, "num_heads": 2}


class _Crash(Exception):
    pass


def _refuse(rank: int) -> None:
    raise ValueError(f"refused on rank {rank}")


def _tiles(n: int = 8) -> torch.Tensor:
    g = torch.Generator().manual_seed(3)
    return torch.randint(0, 256, (n, 3, 40, 40), dtype=torch.uint8, generator=g)  # a dataset of n tiles


def _dino(data: Path, out: Path, batch: int, epochs: int, cfg: DINOConfig = DINO) -> Path:
    return run_dino(_tiles(), "vit_tiny_d4", out, epochs=epochs, batch_size=batch, cfg=cfg,
                    encoder_kwargs=VIT, device="cpu", progress=False)  # fmt: skip


def _dino_bn(data: Path, out: Path, batch: int, epochs: int) -> Path:
    return _dino(data, out, batch, epochs, dataclasses.replace(DINO, use_bn_in_head=True))


def _longvit(data: Path, out: Path, batch: int, epochs: int) -> Path:
    from gigaslide.ssl.longvit_dino import longvit_dino_config, pretrain_longvit

    cfg = longvit_dino_config(
        out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0, lr=2.0, drop_path_rate=0.0,
        warmup_teacher_temp_epochs=1, freeze_last_layer=0, momentum_teacher=0.9,
        crops=MultiCropConfig(global_size=64, local_size=32, n_local=1),
    )  # fmt: skip
    return pretrain_longvit(data / "images", out, image_size=256, epochs=epochs, batch_size=batch,
                            samples_per_slide=4, cfg=cfg, model_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2},
                            device="cpu", progress=False)  # fmt: skip


def _hipt(data: Path, out: Path, batch: int, epochs: int) -> Path:
    from gigaslide.ssl.hipt_region import pretrain_hipt_region, stage2_dino_config
    from gigaslide.ssl.region_crops import RegionCropConfig

    cfg = stage2_dino_config(out_dim=32, head_hidden_dim=16, head_bottleneck_dim=8, warmup_epochs=0, lr=2.0,
                             drop_path_rate=0.0, freeze_last_layer=0, momentum_teacher=0.9)  # fmt: skip
    return pretrain_hipt_region(data / "regions", out, epochs=epochs, batch_size=batch, cfg=cfg,
                                crops=RegionCropConfig(n_local=1, dropout=0.1),
                                vit4k_kwargs={"embed_dim": 16, "depth": 1, "num_heads": 2}, device="cpu",
                                progress=False)  # fmt: skip


RUNS: dict[str, Callable[[Path, Path, int, int], Path]] = {
    "dino": _dino, "dino_bn": _dino_bn, "longvit": _longvit, "hipt": _hipt,
}  # fmt: skip


def _worker(rank: int, init: str, data: str, out: str) -> None:
    """Every run of the module in one pair of processes (starting processes is the slow part)."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    fit, on_epoch_end = Engine.fit, DINOObjective.on_epoch_end

    def fit_and_keep(self: Engine, epoch_data: Any) -> Any:
        result = fit(self, epoch_data)  # and this rank's modules, to compare the replicas
        states = {name: m.state_dict() for name, m in self.objective.modules().items()}
        torch.save(states, self.out_dir / f"rank{rank}.pt")
        return result

    def crash(self: Any, epoch: int, ctx: Any) -> dict[str, float]:
        if epoch == 1:
            raise _Crash
        return {}

    Engine.fit = fit_and_keep  # type: ignore[method-assign]
    try:
        seen = [from_main(lambda r: f"listed by rank {r}", rank)]  # rank 0's result on every rank
        try:
            from_main(_refuse, rank)
        except ValueError as e:  # rank 0's error on every rank, none left waiting
            seen.append(str(e))
        Path(out).mkdir(parents=True, exist_ok=True)
        (Path(out) / f"from_main{rank}.txt").write_text("\n".join(seen))
        for which, (epochs, interrupted) in PLAN.items():
            run = Path(out) / which
            if interrupted:  # stopped after epoch 1, then run again: resumes from the checkpoint
                DINOObjective.on_epoch_end = crash  # type: ignore[method-assign]
                with contextlib.suppress(_Crash):
                    RUNS[which](Path(data), run, B, epochs)
                DINOObjective.on_epoch_end = on_epoch_end  # type: ignore[method-assign]
                if rank == 0:
                    ckpt = torch.load(run / "checkpoint.pth", weights_only=True)
                    (run / "interrupted_at").write_text(str(ckpt["epoch"]))
            RUNS[which](Path(data), run, B, epochs)
    finally:
        dist.destroy_process_group()


# run -> (epochs, interrupted after epoch 1 and resumed); 8 items, 2 x 2 per step: 2 steps an epoch
PLAN = {"dino": (2, True), "dino_bn": (1, False), "longvit": (1, False), "hipt": (1, False)}


def _losses(run: Path) -> list[float]:
    with open(run / "epochs.csv", newline="") as f:
        return [float(row["loss"]) for row in csv.DictReader(f)]


def _key_bias(name: str, t: torch.Tensor) -> torch.Tensor:
    """Mask of the attention key bias in ``t``: its exact gradient is zero (a softmax ignores a constant
    added to every score), so what reaches it is rounding noise, which AdamW scales up to steps of the
    learning rate's size: it cannot match between runs that sum in another order."""
    mask = torch.zeros_like(t, dtype=torch.bool)
    if name.endswith("qkv.bias"):
        third = t.shape[0] // 3
        mask[third : 2 * third] = True
    elif name.endswith("k_proj.bias"):
        mask[:] = True
    return mask


def _assert_close(ref: dict[str, torch.Tensor], got: dict[str, torch.Tensor], rel: float) -> None:
    """Every tensor within ``rel`` of the reference in relative norm (the key bias left out).

    Not element-wise: AdamW divides each element's gradient by its own running norm, so an element
    whose gradient is tiny moves by a full step either way, and float sums in another order (two
    ranks' halves averaged, against one sum) change such elements by far more than 1e-6. Measured
    (DINO, LongViT, HIPT, 2 steps): at most 4e-6.
    """
    assert set(ref) == set(got)
    for k, v in ref.items():
        if not v.is_floating_point():
            assert torch.equal(got[k], v), k
            continue
        keep = ~_key_bias(k, v)
        a, b = v[keep].double(), got[k][keep].double()
        assert float((a - b).norm()) <= rel * float(a.norm()) + 1e-9, (k, float((a - b).norm() / a.norm()))


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert set(a) == set(b)
    for k, v in a.items():
        assert torch.equal(b[k], v), k


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Region token grids (HIPT stage 2) and rendered slide images (LongViT) to pretrain on."""
    from gigaslide.data.region_features import write_region_features
    from gigaslide.data.slide_images import prepare_slide_images
    from gigaslide.preprocess.slide_image import SlideImageSpec
    from gigaslide.synth import make_cohort

    root = tmp_path_factory.mktemp("dino_ddp")
    rng = np.random.default_rng(0)
    (root / "regions").mkdir()
    for s in range(2):  # 2 files x 4 regions of 16 x 16 tokens of width 8
        feats = rng.normal(size=(4, 256, 8)).astype(np.float32)
        write_region_features(root / "regions" / f"s{s}.h5", feats, np.ones((4, 256), bool), np.zeros((4, 2)))
    table = make_cohort(root / "cohort", n_slides=2, seed=0, width=512, height=512)
    report = prepare_slide_images(
        [Path(p) for p in table["path"]], SlideImageSpec(target_size=256), root / "images"
    )
    assert not report.failed
    return root


@pytest.fixture(scope="module")
def runs(data: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """``{run: (one-process run folder, 2-process run folder)}``."""
    assert "RANK" not in os.environ  # the references run as one process on the global batch of WORLD * B
    root = tmp_path_factory.mktemp("runs")
    one = {which: RUNS[which](data, root / "one" / which, WORLD * B, epochs).parent
           for which, (epochs, _) in PLAN.items()}  # fmt: skip
    init = f"file://{root / 'rendezvous'}"
    mp.spawn(_worker, args=(init, str(data), str(root / "ddp")), nprocs=WORLD, join=True)
    return {which: (one[which], root / "ddp" / which) for which in PLAN} | {"root": (root, root / "ddp")}


def _check_two_processes_equal_one(one: Path, ddp: Path) -> None:
    ref = torch.load(one / "checkpoint.pth", map_location="cpu", weights_only=True)
    got = torch.load(ddp / "checkpoint.pth", map_location="cpu", weights_only=True)
    assert got["engine"]["world_size"] == WORLD and got["engine"]["step"] == ref["engine"]["step"]
    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ("student", "teacher", "dino_loss"):  # dino_loss: the center, averaged over the ranks
        _assert_close(ref[name], got[name], rel=1e-4)
        _assert_equal(ranks[0][name], got[name])  # the checkpoint holds rank 0's modules ...
        _assert_equal(ranks[0][name], ranks[1][name])  # ... and the replicas are identical
    # the weights moved (the teacher starts as a copy of the student and lags behind it)
    assert not torch.equal(got["student"]["head.mlp.0.weight"], got["teacher"]["head.mlp.0.weight"])
    # the logged loss is the global batch's (the mean over the ranks), as one process logs it
    np.testing.assert_allclose(_losses(ddp), _losses(one), rtol=1e-5)


@pytest.mark.distributed
def test_dino_two_processes_equal_one_and_resume_exactly(runs: dict[str, tuple[Path, Path]]) -> None:
    one, ddp = runs["dino"]
    assert (ddp / "interrupted_at").read_text() == "1"  # the 2-process run was resumed after epoch 1 of 2
    _check_two_processes_equal_one(one, ddp)


@pytest.mark.distributed
def test_longvit_dino_two_processes_equal_one(runs: dict[str, tuple[Path, Path]]) -> None:
    _check_two_processes_equal_one(*runs["longvit"])


@pytest.mark.distributed
def test_hipt_region_two_processes_equal_one(runs: dict[str, tuple[Path, Path]]) -> None:
    _check_two_processes_equal_one(*runs["hipt"])


@pytest.mark.distributed
def test_from_main_gives_every_rank_the_result_or_error_of_rank_0(runs: dict[str, tuple[Path, Path]]) -> None:
    ddp = runs["root"][1]
    for r in range(WORLD):
        assert (ddp / f"from_main{r}.txt").read_text().splitlines() == [
            "listed by rank 0",
            "refused on rank 0",
        ]
    assert from_main(lambda: 3) == 3  # one process: a plain call


@pytest.mark.distributed
def test_batchnorm_head_on_cpu_normalises_per_rank(runs: dict[str, tuple[Path, Path]]) -> None:
    """torch has no SyncBatchNorm on the CPU: each rank normalises with its own B items' statistics, a
    different estimator from one process's over 2B, so the runs cannot match; the first step (same
    weights, same items) differs by the statistics alone: measured 1.3% in loss, asserted within 5%."""
    one, ddp = runs["dino_bn"]
    first = [json.loads((run / "steps.jsonl").read_text().splitlines()[0])["loss"] for run in (one, ddp)]
    assert abs(first[1] - first[0]) <= 0.05 * first[0] and first[1] != first[0]
    ranks = [torch.load(ddp / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name in ("student", "teacher"):
        params = {k for k, _ in getattr(build_dino_bn(), name).named_parameters()}
        assert params and all(torch.equal(ranks[0][name][k], ranks[1][name][k]) for k in params)
        # running statistics follow each rank's batches (DDP broadcasts rank 0's before each forward);
        # the checkpoint keeps rank 0's, which every rank loads on resume
        assert not torch.equal(
            ranks[0][name]["head.mlp.1.running_mean"], ranks[1][name]["head.mlp.1.running_mean"]
        )


def build_dino_bn() -> DINOObjective:
    return build_dino("vit_tiny_d4", 1, dataclasses.replace(DINO, use_bn_in_head=True), encoder_kwargs=VIT)


def test_sync_batchnorm_on_cuda_only_and_checkpoint_layout_unchanged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plain = build_dino("vit_tiny_d4", 1, DINO, encoder_kwargs=VIT)
    assert not plain.sync_batchnorm("cuda", 2)  # no batch norm: nothing to do
    obj = build_dino_bn()
    keys = {name: set(m.state_dict()) for name, m in obj.modules().items()}
    assert not obj.sync_batchnorm("cuda", 1)  # one process
    with caplog.at_level(logging.WARNING, logger="gigaslide.ssl.dino"):
        assert not obj.sync_batchnorm("cpu", 2)
    assert "SyncBatchNorm needs CUDA" in caplog.text and "statistics of its own batch" in caplog.text
    assert not any(isinstance(m, torch.nn.SyncBatchNorm) for m in obj.student.modules())
    # the conversion is a module rewrite (no CUDA needed to build it): every batch norm of both models
    assert obj.sync_batchnorm(torch.device("cuda", 0), 2)
    for model in (obj.student, obj.teacher):
        norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert len(norms) == 2 and all(isinstance(m, torch.nn.SyncBatchNorm) for m in norms)
    assert {name: set(m.state_dict()) for name, m in obj.modules().items()} == keys
    assert obj.modules()["student"] is obj.student and obj.modules()["teacher"] is obj.teacher


@pytest.mark.slow
@pytest.mark.distributed
def test_torchrun_cli_equals_one_process_reports_once_and_resumes(tmp_path: Path) -> None:
    import shutil
    import subprocess
    import sys

    from gigaslide.cli.main import main

    sys.path.insert(0, str(Path(__file__).parent))
    from test_pretrain_dino import make_tiling

    tiling = make_tiling(tmp_path / "tiling", {"a": (512, 512)})  # 16 tiles of 32 px
    common = ["pretrain", "dino", str(tiling), "--encoder", "vit_tiny_d4", "--epochs", "2", "--global-size", "32",
              "--local-size", "16", "--local-crops", "1", "--out-dim", "32", "--head-hidden-dim", "16",
              "--head-bottleneck-dim", "8", "--warmup-epochs", "1", "--lr", "2.0", "--drop-path", "0",
              "--encoder-arg", "depth=1", "--encoder-arg", "embed_dim=32", "--encoder-arg", "num_heads=2",
              "--workers", "0", "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main([*common, "--out", str(tmp_path / "one"), "--batch-size", "8"]) == 0
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent))
    assert torchrun is not None
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2", "-m", "gigaslide", *common, "--out",
           str(tmp_path / "ddp"), "--batch-size", "4"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    # one report for the job, not one per process
    assert done.stdout.count("DINO checkpoint:") == 1
    assert done.stderr.count("DINO pretraining of vit_tiny_d4") == 1
    assert (
        done.stderr.count("WARNING gigaslide.models.encoders.registry: encoder vit_tiny_d4 uses RANDOM") == 1
    )
    ref = torch.load(tmp_path / "one" / "checkpoint.pth", weights_only=True)
    got = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert got["engine"]["world_size"] == 2 and got["engine"]["step"] == ref["engine"]["step"] == 4
    for name in ("student", "teacher", "dino_loss"):
        _assert_close(ref[name], got[name], rel=1e-4)
    np.testing.assert_allclose(_losses(tmp_path / "ddp"), _losses(tmp_path / "one"), rtol=1e-5)
    # a finished run resumes at its end: nothing more is trained
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0, again.stderr[-2000:]
    after = torch.load(tmp_path / "ddp" / "checkpoint.pth", weights_only=True)
    assert after["engine"]["step"] == 4
    _assert_equal(got["teacher"], after["teacher"])


def test_rank_helpers_in_one_process_and_quiet_ranks() -> None:
    from gigaslide.utils.dist import DistInfo, mean_over_ranks, quiet_other_ranks

    assert mean_over_ranks({"loss": 1.5, "momentum": 0.9}) == {"loss": 1.5, "momentum": 0.9}  # no group
    logger = logging.getLogger("gigaslide")
    level = logger.level
    try:
        quiet_other_ranks(DistInfo(rank=0, world_size=2, is_distributed=True))
        assert logger.level == level  # rank 0 reports for the job
        quiet_other_ranks(DistInfo(rank=1, world_size=2, is_distributed=True), logging.WARNING)
        assert logger.getEffectiveLevel() == logging.WARNING
        assert logging.getLogger("gigaslide.ssl.dino").isEnabledFor(logging.WARNING)
        assert not logging.getLogger("gigaslide.ssl.dino").isEnabledFor(logging.INFO)
    finally:
        logger.setLevel(level)
