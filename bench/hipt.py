"""HIPT region throughput: the full ViT_256 + ViT_4096 forward on 4096 px regions, ours vs the official structure.

Both sides run the same weights on the same random regions in one process, one after the other:

* ``gigaslide``: :class:`~gigaslide.models.encoders.hipt_region.HIPTRegionEncoder`: the region is
  unrolled into its 256 patches, ViT_256 runs over them in batches of ``--batch-size`` with
  PyTorch's fused scaled-dot-product attention, then ViT_4096 over the 16x16 token grid; under
  ``inference_mode``, with autocast to ``--precision`` (bf16/fp16 for GPUs).
* ``official structure``: a re-statement, written here, of the public ``HIPT_4K.forward`` path:
  the same unfold into 256 patches, ViT_256 in minibatches of 256, attention computed explicitly
  (``softmax((q @ k^T) * scale)`` materialised per block, as the official ``Attention`` does,
  which also returns it), no inference mode, fp32. ``--per-patch`` also times it patch by patch.

Prints regions/s of each and the ratio, and the largest relative difference of the region tokens.

    .venv/bin/python bench/hipt.py --regions 2                      # this CPU
    .venv/bin/python bench/hipt.py --device cuda --precision bf16   # a GPU (not measured here)
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from gigaslide.models.encoders import create_encoder, create_hipt_vit4k
from gigaslide.models.encoders.hipt_region import HIPTRegionEncoder
from gigaslide.pipeline.extract import autocast_context, resolve_device


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    desc = f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"
    if torch.cuda.is_available():
        desc += f", GPU {torch.cuda.get_device_name(0)}"
    return desc


# -- the official forward structure, re-stated ------------------------------------------------------
def explicit_block(blk: nn.Module, x: Tensor) -> Tensor:
    """One pre-norm block with attention materialised as in the official ``Attention`` (it returns it too)."""
    b, n, d = x.shape
    a = blk.attn
    qkv = a.qkv(blk.norm1(x)).reshape(b, n, 3, a.num_heads, d // a.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = ((q @ k.transpose(-2, -1)) * a.scale).softmax(dim=-1)  # (B, heads, N, N)
    x = x + a.proj((attn @ v).transpose(1, 2).reshape(b, n, d))
    return x + blk.mlp(blk.norm2(x))


def explicit_vit(model: nn.Module, x: Tensor) -> Tensor:
    """prepare_tokens -> explicit blocks -> norm -> CLS, for ViT_256 (pixels) or ViT_4096 (token grid)."""
    t = model.prepare_tokens(x)
    for blk in model.blocks:
        t = explicit_block(blk, t)
    return model.norm(t)[:, 0]


def official_structure(vit256: nn.Module, vit4k: nn.Module, region: Tensor, minibatch: int = 256) -> Tensor:
    """HIPT_4K.forward on one (1, 3, 4096, 4096) region: unfold, ViT_256 in minibatches of 256, ViT_4096."""
    _, _, h, w = region.shape
    rows, cols = h // 256, w // 256
    patches = region.unfold(2, 256, 256).unfold(3, 256, 256)  # (1, 3, rows, cols, 256, 256)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(rows * cols, 3, 256, 256)
    feats = [
        explicit_vit(vit256, patches[i : i + minibatch]).detach().cpu()
        for i in range(0, len(patches), minibatch)
    ]
    grid = torch.vstack(feats).reshape(rows, cols, 384).permute(2, 0, 1).unsqueeze(0).to(region.device)
    return explicit_vit(vit4k, grid)  # (1, 192)


# -- timing --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_it(fn, n: int, device: torch.device) -> tuple[float, Tensor]:
    """Mean seconds per call of ``fn`` over ``n`` calls, and the last output."""
    sync(device)
    t0 = time.perf_counter()
    for _ in range(n):
        out = fn()
    sync(device)
    return (time.perf_counter() - t0) / n, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--regions", type=int, default=1, help="timed regions per side (after a small warm-up)")
    p.add_argument("--size", type=int, default=4096, help="region side in px (multiple of 256)")
    p.add_argument("--batch-size", type=int, default=64, help="ViT_256 patches per call (ours)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="ours (autocast)")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    p.add_argument(
        "--per-patch", action="store_true", help="also time the official structure one patch at a time"
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dev = resolve_device(args.device)
    torch.manual_seed(0)
    vit256 = create_encoder("hipt_vit256", weights="random").to(dev).eval()
    vit4k = create_hipt_vit4k().to(dev).eval()
    for m in (vit256, vit4k):
        m.requires_grad_(False)  # as the official get_vit256 / get_vit4k do
    ours = HIPTRegionEncoder(vit256, vit4k, batch_size=args.batch_size).eval()
    region = torch.randn(1, 3, args.size, args.size, device=dev)
    small = torch.randn(1, 3, 512, 512, device=dev)

    def run_ours(x: Tensor) -> Tensor:
        with torch.inference_mode(), autocast_context(dev, args.precision):
            return ours(x).region

    print(f"machine: {machine()}; device {dev}")
    print(
        f"region {args.size} px = {(args.size // 256) ** 2} patches; {args.regions} timed region(s) per side"
    )
    (
        official_structure(vit256, vit4k, small),
        run_ours(small),
    )  # warm-up (kernels, allocator) on a 512 px region
    t_off, ref = time_it(lambda: official_structure(vit256, vit4k, region), args.regions, dev)
    rows = [("official structure (minibatch 256, explicit attention, fp32)", t_off)]
    if args.per_patch:
        t_pp, _ = time_it(lambda: official_structure(vit256, vit4k, region, 1), args.regions, dev)
        rows.append(("official structure, one patch at a time", t_pp))
    t_ours, got = time_it(lambda: run_ours(region), args.regions, dev)
    rows.append((f"gigaslide (batch {args.batch_size}, SDPA, {args.precision})", t_ours))
    for name, t in rows:
        print(f"{name:<62s} {t:8.2f} s/region  {1.0 / t:7.4f} regions/s")
    print(f"speed-up gigaslide / official structure: {t_off / t_ours:.2f}x")
    rel = (got.float() - ref).abs().max() / ref.abs().max()
    print(f"max |ours - official structure| / max |official| (region tokens) = {float(rel):.2e}")


if __name__ == "__main__":
    main()
