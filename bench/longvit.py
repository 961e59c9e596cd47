"""LongNet dilated attention vs dense SDPA: forward+backward time and peak memory, N = 4k ... 256k tokens.

Everything is measured in one run, side by side, each point in a fresh subprocess (so the peak
resident memory of one point is not inflated by the previous one):

* ``layer``: one ``DilatedAttention`` (384-d, 16 heads, projections + inner LayerNorm) with the
  Table 7 schedule of a 4,096^2 input (segments 1,024 .. 16,384, ratios 1 .. 16) for every N;
* ``dense``: the same projections around ``F.scaled_dot_product_attention`` over all N tokens
  (only up to ``--dense-max`` tokens: its time grows as N^2);
* ``encoder`` / ``encoder-dense``: the 12-layer LongViT encoder (ViT-S) with the dilated schedule,
  and the same encoder with one dense (w = N, r = 1) pair, up to ``--encoder-max`` tokens.

Time: best of ``--repeats`` forward+backward passes after one warm-up for N <= 16,384, a single
pass above (start-up costs are negligible there); forward alone reported too. Memory: CPU peak RSS increase over the process's state just before the first pass
(``ru_maxrss``), or ``torch.cuda.max_memory_allocated`` on a GPU.

    .venv/bin/python bench/longvit.py                       # the default sizes (long on 2 cores)
    .venv/bin/python bench/longvit.py --sizes 4096,16384 --encoder-max 4096 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

from gigaslide.models.layers import DilatedAttention
from gigaslide.models.layers.longnet import LongNetEncoder
from gigaslide.models.layers.longnet_schedule import longvit_schedule
from gigaslide.utils.machine import describe_machine

DIM, HEADS = 384, 16


def _dense_layer(attn: DilatedAttention, x: torch.Tensor) -> torch.Tensor:
    b, n, d = x.shape
    q, k, v = (
        p(x).view(b, n, HEADS, d // HEADS).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)
    )
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    return attn.out_proj(attn.inner_attn_ln(out))


def build(kind: str, n: int, device: torch.device):
    """The module and forward function of one benchmark point."""
    segments, ratios = longvit_schedule(4096)
    if kind in ("layer", "dense"):
        attn = DilatedAttention(DIM, HEADS, segments, ratios).to(device)
        return attn, (attn if kind == "layer" else lambda x: _dense_layer(attn, x))
    if kind in ("encoder", "encoder-dense"):
        sched = (segments, ratios) if kind == "encoder" else ((n,), (1,))
        enc = LongNetEncoder(DIM, 12, HEADS, 4 * DIM, *sched).to(device)
        return enc, enc
    raise ValueError(f"unknown benchmark kind {kind!r}")


def measure_one(kind: str, n: int, repeats: int, device: torch.device, threads: int | None) -> dict:
    """Time and peak memory of forward(+backward) for one (kind, N); runs in its own process."""
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    module, fn = build(kind, n, device)
    x = torch.randn(1, n, DIM, device=device, requires_grad=True)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    fwd, total = [], []
    repeats = repeats if n <= 16384 else 0  # long sequences: one pass (start-up costs are negligible there)
    for i in range(repeats + 1):
        sync()
        t0 = time.perf_counter()
        y = fn(x)
        sync()
        t1 = time.perf_counter()
        y.float().square().mean().backward()
        sync()
        t2 = time.perf_counter()
        x.grad = None
        module.zero_grad(set_to_none=True)
        if i > 0 or repeats == 0:
            fwd.append(t1 - t0)
            total.append(t2 - t0)
        del y
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024  # KiB -> MiB
    return {"kind": kind, "n": n, "fwd_s": min(fwd), "fwd_bwd_s": min(total), "peak_mib": peak}


def run_point(kind: str, n: int, args: argparse.Namespace) -> dict | None:
    cmd = [
        sys.executable,
        __file__,
        "--one",
        kind,
        str(n),
        "--repeats",
        str(args.repeats),
        "--device",
        args.device,
    ]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        print(
            f"  {kind} N={n}: failed ({proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode})"
        )
        return None
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    print(
        f"  {kind:14s} N={n:>7,}: fwd {res['fwd_s']:8.2f} s  fwd+bwd {res['fwd_bwd_s']:8.2f} s  peak {res['peak_mib']:8.0f} MiB",
        flush=True,
    )
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="4096,16384,65536,262144", help="comma-separated sequence lengths N")
    ap.add_argument(
        "--dense-max", type=int, default=16384, help="largest N for dense SDPA (time grows as N^2)"
    )
    ap.add_argument("--encoder-max", type=int, default=16384, help="largest N for the 12-layer encoders")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per point (0 = torch default)")
    ap.add_argument("--one", nargs=2, metavar=("KIND", "N"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    device = torch.device(args.device)
    if args.one:
        print(json.dumps(measure_one(args.one[0], int(args.one[1]), args.repeats, device, args.threads)))
        return
    sizes = [int(s) for s in args.sizes.split(",")]
    print(
        f"machine: {describe_machine()}; load average {os.getloadavg()[0]:.1f}; device {device}; schedule of a 4,096^2 input: {longvit_schedule(4096)}"
    )
    results: dict[tuple[str, int], dict] = {}
    for n in sizes:
        for kind, limit in (
            ("layer", None),
            ("dense", args.dense_max),
            ("encoder", args.encoder_max),
            ("encoder-dense", min(args.dense_max, args.encoder_max)),
        ):
            if limit is None or n <= limit:
                res = run_point(kind, n, args)
                if res is not None:
                    results[(kind, n)] = res
    print("\nratios (same run):")
    for n in sizes:
        for a, b in (("layer", "dense"), ("encoder", "encoder-dense")):
            if (a, n) in results and (b, n) in results:
                ra, rb = results[(a, n)], results[(b, n)]
                print(
                    f"  N={n:>7,} {a}/{b}: fwd+bwd {ra['fwd_bwd_s'] / rb['fwd_bwd_s']:.3f}x, fwd {ra['fwd_s'] / rb['fwd_s']:.3f}x, peak memory {ra['peak_mib'] / max(rb['peak_mib'], 1):.2f}x"
                )
    layer = {n: r for (k, n), r in results.items() if k == "layer"}
    if 16384 in layer:
        for n in sorted(layer):
            print(
                f"  layer time(N={n:,}) / time(16,384) = {layer[n]['fwd_bwd_s'] / layer[16384]['fwd_bwd_s']:.2f} (N ratio {n / 16384:g})"
            )


if __name__ == "__main__":
    main()
