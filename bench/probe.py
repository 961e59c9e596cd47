"""Slide-level learning cost: linear probe on slide embeddings vs. attention-MIL training.

(1) Giga-SSL protocol cost: a logistic-regression probe over 10 case-grouped splits of N slide
    embeddings (default 1,000 x 512), measured in CPU-seconds (``time.process_time``, all threads of
    this process) with ``gigaslide.eval.probes.linear_probe_splits``. The paper reports 1.25 CPU-s
    for BRCA subtyping (1,041 slides) on 10 splits. Two variants: the default C grid selected on
    each split's validation set (6 fits per split), and a single fixed C (1 fit per split, the
    paper's setting as far as it is described).
(2) Attention-MIL (abmil, 1,024 -> 512 -> 256 attention, CLAM/HIPT default width) training time
    per epoch on B bags of T tiles x 1,024 features (default 1,000 x 10,000), bag batch size 1.
    1,000 x 10,000 x 1,024 float32 is 40 GB, so bags are REGENERATED deterministically per bag
    (``torch.randn`` with a per-bag generator) inside the timed loop; the generation time alone is
    measured separately and reported, and subtracted to give the model-only time per epoch.

    .venv/bin/python bench/probe.py                 # full sizes
    .venv/bin/python bench/probe.py --quick         # 1,000 x 512 probe; MIL on 20 bags x 10,000 tiles
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import pandas as pd
import torch

from gigaslide.data.bags import Bag
from gigaslide.data.cohort import Sample
from gigaslide.data.splits import kfold_splits
from gigaslide.eval.metrics import roc_auc
from gigaslide.eval.probes import linear_probe_splits
from gigaslide.models.slide import create_slide_model
from gigaslide.train.config import TrainConfig
from gigaslide.train.mil import train_model
from gigaslide.utils.machine import describe_machine


def bench_linear_probe(n: int, dim: int, n_splits: int, seed: int = 0) -> dict[str, float]:
    """CPU-seconds of the linear probe over ``n_splits`` splits of (n, dim) synthetic embeddings."""
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < 0.3).astype(np.int64)  # BRCA-like imbalance (831 - 210)
    X = rng.normal(size=(n, dim)) + 0.1 * y[:, None] * rng.normal(size=dim)[None, :]
    df = pd.DataFrame(
        {"slide_id": [f"s{i}" for i in range(n)], "case_id": [f"c{i}" for i in range(n)], "label": y}
    )
    splits = kfold_splits(df, n_folds=n_splits, val_fraction=0.1, seed=seed)
    ids = df["slide_id"].tolist()
    out: dict[str, float] = {}
    for name, cs in (("grid", None), ("fixed_C", (1.0,))):
        kw = {} if cs is None else {"Cs": cs}
        c0, w0 = time.process_time(), time.perf_counter()
        folds = linear_probe_splits(X, y, splits, ids=ids, **kw)
        out[f"{name}_cpu_s"] = time.process_time() - c0
        out[f"{name}_wall_s"] = time.perf_counter() - w0
        out[f"{name}_auc"] = float(np.mean([roc_auc(y[f.test_idx], f.scores[:, 1]) for f in folds]))
    return out


class GeneratedBags:
    """B bags of T x D float32 features regenerated from a per-bag seed (nothing stored)."""

    task = "classification"

    def __init__(self, n_bags: int, n_tiles: int, dim: int) -> None:
        self.n_bags, self.n_tiles, self.dim = n_bags, n_tiles, dim
        self.samples = [Sample(f"b{i}", f"b{i}", (f"b{i}",), label=i % 2) for i in range(n_bags)]

    def __len__(self) -> int:
        return self.n_bags

    def set_epoch(self, epoch: int) -> None:
        pass

    def __getitem__(self, i: int) -> Bag:
        g = torch.Generator().manual_seed(i)
        x = torch.randn(self.n_tiles, self.dim, generator=g)  # (T, D)
        x[: self.n_tiles // 100] += 0.5 * (i % 2)
        return Bag(
            self.samples[i], x, None, torch.zeros(self.n_tiles, dtype=torch.long), torch.arange(self.n_tiles)
        )


def bench_mil(n_bags: int, n_tiles: int, dim: int, device: str, epochs: int = 1) -> dict[str, float]:
    """Seconds per training epoch of abmil on generated bags; generation time measured separately."""
    bags = GeneratedBags(n_bags, n_tiles, dim)
    t0 = time.perf_counter()
    for i in range(n_bags):
        bags[i]
    gen_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = create_slide_model("abmil", dim, 2)
    cfg = TrainConfig(epochs=epochs, warmup_epochs=0, early_stopping=False)
    w0, c0 = time.perf_counter(), time.process_time()
    result = train_model(model, bags, None, cfg, device)
    wall = (time.perf_counter() - w0) / epochs
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {
        "epoch_wall_s": wall,
        "epoch_cpu_s": (time.process_time() - c0) / epochs,
        "generation_s": gen_s,
        "model_only_s": wall - gen_s,
        "final_train_loss": result.history[-1]["train_loss"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="MIL on 20 bags instead of 1,000 (probe unchanged)")
    p.add_argument("--probe-n", type=int, default=1000)
    p.add_argument("--probe-dim", type=int, default=512)
    p.add_argument("--splits", type=int, default=10)
    p.add_argument("--bags", type=int, default=None, help="MIL bags (default 1000, --quick 20)")
    p.add_argument("--tiles", type=int, default=10000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    n_bags = args.bags or (20 if args.quick else 1000)
    print(f"machine: {describe_machine()}")
    probe = bench_linear_probe(args.probe_n, args.probe_dim, args.splits)
    print(f"linear probe, {args.splits} splits of {args.probe_n} x {args.probe_dim}:")
    for name in ("grid", "fixed_C"):
        print(
            f"  {name:>8}: {probe[f'{name}_cpu_s']:.2f} CPU-s ({probe[f'{name}_wall_s']:.2f} s wall), "
            f"mean test AUC {probe[f'{name}_auc']:.3f}"
        )
    mil = bench_mil(n_bags, args.tiles, args.dim, args.device)
    per_1000 = 1000.0 / n_bags
    print(f"abmil training, {n_bags} bags x {args.tiles} tiles x {args.dim} on {args.device}, 1 epoch:")
    print(
        f"  epoch {mil['epoch_wall_s']:.1f} s wall ({mil['epoch_cpu_s']:.1f} CPU-s), of which bag generation "
        f"{mil['generation_s']:.1f} s -> model {mil['model_only_s']:.1f} s; "
        f"per 1,000 bags: {mil['model_only_s'] * per_1000:.0f} s model-only"
    )


if __name__ == "__main__":
    main()
