"""End-to-end training step: naive vs gradient-cached, time and peak memory against K tiles per slide.

Each (mode, K) runs in a fresh process (peak memory = that process's high-water mark) doing one
warm-up step and ``--steps`` timed steps of ResNet-18-trunc + gated ABMIL on random tiles through
:class:`gigaslide.train.e2e.E2EObjective` on the training engine. Printed side by side in one run:
seconds per step, peak RSS (CPU) or peak CUDA memory, and the cached/naive ratios.

    python bench/e2e.py --ks 32 64 128 256 --size 224 --chunk 32            # CPU
    python bench/e2e.py --device cuda --precision bf16 --ks 256 1024 4096   # GPU
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time


def one(args: argparse.Namespace) -> None:
    import torch

    from gigaslide.data.slide_tiles import SlideBatch
    from gigaslide.models.encoders import create_encoder
    from gigaslide.models.slide import create_slide_model
    from gigaslide.train.e2e import E2EObjective
    from gigaslide.train.engine import Engine, EngineConfig, OptimConfig

    torch.manual_seed(0)
    device = torch.device(args.device)
    enc = create_encoder("resnet18_trunc", weights="random")
    enc.train()
    agg = create_slide_model("gated_abmil", enc.meta.embed_dim, 2)
    x = torch.randn(args.k, 3, args.size, args.size)

    class Data:
        def __len__(self) -> int:
            return args.steps + 1

        def batches(self, epoch: int, start: int = 0):
            for i in range(start, len(self)):
                yield SlideBatch("s", x, torch.tensor([i % 2]), [args.k], None)

    obj = E2EObjective(enc, agg, mode=args.mode, chunk_size=args.chunk if args.mode == "cached" else None)
    engine = Engine(
        obj, OptimConfig(lr=1e-5), EngineConfig(epochs=1, progress=False, precision=args.precision), device
    )
    times: list[float] = []
    orig = obj.train_step

    def timed(batch, ctx):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        out = orig(batch, ctx)
        if not out.backward_done:
            out.loss.backward(retain_graph=False)
            out.backward_done = True
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        return out

    obj.train_step = timed  # type: ignore[method-assign]
    engine.fit(Data())
    peak = (
        torch.cuda.max_memory_allocated() / 2**20
        if device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    )
    print(json.dumps({"s_per_step": sum(times[1:]) / max(len(times) - 1, 1), "peak_mb": peak}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ks", type=int, nargs="+", default=[32, 64, 128, 256])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--chunk", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per run (0 = default)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="naive", help=argparse.SUPPRESS)
    ap.add_argument("--k", type=int, default=32, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        one(args)
        return
    print(
        f"ResNet-18-trunc + gated ABMIL, {args.size} px tiles, chunk {args.chunk}, {args.device} {args.precision}"
    )
    print(
        f"{'K':>6} {'naive s/step':>13} {'cached s/step':>14} {'time ratio':>11} {'naive MB':>10} {'cached MB':>10}"
    )
    for k in args.ks:
        res = {}
        for mode in ("naive", "cached"):
            cmd = [sys.executable, __file__, "--one", "--mode", mode, "--k", str(k), "--size", str(args.size),
                   "--chunk", str(args.chunk), "--steps", str(args.steps), "--device", args.device,
                   "--precision", args.precision, "--threads", str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
            res[mode] = json.loads(lines[-1]) if proc.returncode == 0 and lines else None
        n, c = res["naive"], res["cached"]
        fmt = lambda r, key, spec: format(r[key], spec) if r else "OOM/failed"  # noqa: E731
        ratio = f"{c['s_per_step'] / n['s_per_step']:.2f}" if n and c else "-"
        print(f"{k:>6} {fmt(n, 's_per_step', '13.2f'):>13} {fmt(c, 's_per_step', '14.2f'):>14} {ratio:>11} "
              f"{fmt(n, 'peak_mb', '10.0f'):>10} {fmt(c, 'peak_mb', '10.0f'):>10}")  # fmt: skip


if __name__ == "__main__":
    main()
