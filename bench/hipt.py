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

``--region-image SLIDE`` replaces the random region by a real one: level 0 of a slide or image
(e.g. ``../shared/data/cmu-1-small-region.svs``, 2,220 x 2,967 px at 0.499 um/px) placed at the
top-left of a white ``--size`` canvas, as ``gigaslide embed --regions`` reads a region that
overhangs the slide. gigaslide then encodes the identical white patches once (``dedup``; exact);
a variant without it is timed too.

``--official-repo DIR`` (a local clone of ``mahmoodlab/HIPT``; never needed by the tests) adds the
official modules themselves: ``HIPT_4K/vision_transformer.py``'s ``vit_small`` and
``vision_transformer4k.py``'s ``vit4k_xs`` are imported from the clone, given the same weights
(``load_state_dict(strict=True)``: our key layout is theirs) and run through ``HIPT_4K.forward``'s
steps (unfold, ViT_256 in minibatches of 256, ``reshape(w, h, 384)``, two transposes, ViT_4096).

A third reference is the floor of fp32 work: ViT_256's matrix products alone (``gemm_floor``),
which no fp32 implementation doing all of the official multiply-adds can beat on the machine.

Every round times each variant once, one after the other (interleaved, so that a machine whose
load changes affects all of them alike); the median per variant is reported with its speed-up
over the official structure and the largest relative difference of its region tokens.

    .venv/bin/python bench/hipt.py --size 2048 --repeats 3 --precision fp32 bf16   # this CPU
    .venv/bin/python bench/hipt.py --device cuda --precision fp32 bf16 fp16        # a GPU
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from torch import Tensor, nn

from gigaslide.models.encoders import create_encoder, create_hipt_vit4k
from gigaslide.models.encoders.hipt_region import HIPTRegionEncoder
from gigaslide.pipeline.extract import autocast_context
from gigaslide.utils.device import resolve_device
from gigaslide.utils.machine import describe_machine


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


def real_region(path: str, size: int) -> Tensor:
    """(1, 3, size, size) region: the slide's level 0 at the top-left on white, normalised (mean = std = 0.5)."""
    from gigaslide.io import open_slide

    slide = open_slide(path, default_mpp=0.5)
    w, h = slide.dimensions
    rgb = slide.read_region((0, 0), 0, (min(w, size), min(h, size)))  # (h, w, 3) uint8
    canvas = torch.full((3, size, size), 255, dtype=torch.uint8)
    canvas[:, : rgb.shape[0], : rgb.shape[1]] = torch.from_numpy(rgb[..., :3].copy()).permute(2, 0, 1)
    return ((canvas.float() / 255.0 - 0.5) / 0.5).unsqueeze(0)


def gemm_floor(vit256: nn.Module, n_patches: int, batch: int = 64) -> Tensor:
    """Only the matrix products of ViT_256 over ``n_patches`` patches (fp32): a floor for any fp32 code.

    The same shapes and multiply-adds as every block's qkv, q k^T, attention x v, proj, fc1 and fc2
    (with the model's weights), on preallocated contiguous operands, without bias, LayerNorm,
    softmax, GELU, residuals or layout copies. An implementation that performs all of ViT_256's
    multiply-adds in fp32 cannot be faster than this on the machine; the ratio official / floor is
    the largest fp32 speed-up left by kernel work alone.
    """
    blk0 = vit256.blocks[0]
    d, heads = blk0.attn.qkv.in_features, blk0.attn.num_heads
    n = 1 + (256 // vit256.patch_embed.patch_size) ** 2  # tokens per patch, CLS included
    dev = blk0.attn.qkv.weight.device
    out = torch.zeros(0)
    for start in range(0, n_patches, batch):
        b = min(batch, n_patches - start)
        x = torch.zeros(b * n, d, device=dev)
        q = torch.zeros(b * heads, n, d // heads, device=dev)
        k_t = torch.zeros(b * heads, d // heads, n, device=dev)
        for blk in vit256.blocks:
            torch.mm(x, blk.attn.qkv.weight.t())  # (B*N, 3D)
            s = torch.bmm(q, k_t)  # (B*heads, N, N)
            torch.bmm(s, q)  # (B*heads, N, D/heads)
            torch.mm(x, blk.attn.proj.weight.t())  # (B*N, D)
            h = torch.mm(x, blk.mlp.fc1.weight.t())  # (B*N, 4D)
            out = torch.mm(h, blk.mlp.fc2.weight.t())  # (B*N, D)
    return out


def official_modules(repo: str, vit256: nn.Module, vit4k: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The official ViT_256 / ViT_4096 classes from a local HIPT clone, loaded strictly with our weights."""
    import sys

    sys.path.insert(0, str(Path(repo) / "HIPT_4K"))
    import vision_transformer as vits  # type: ignore[import-not-found]
    import vision_transformer4k as vits4k  # type: ignore[import-not-found]

    m256 = vits.vit_small(patch_size=16, num_classes=0)
    m4k = vits4k.vit4k_xs()
    m256.load_state_dict(vit256.state_dict(), strict=True)
    m4k.load_state_dict(vit4k.state_dict(), strict=True)
    for m in (m256, m4k):
        m.requires_grad_(False)  # as get_vit256 / get_vit4k do
    return m256.eval(), m4k.eval()


def official_forward(m256: nn.Module, m4k: nn.Module, region: Tensor) -> Tensor:
    """The steps of the official ``HIPT_4K.forward`` on a square (1, 3, S, S) region, official modules."""
    w_256 = h_256 = region.shape[-1] // 256
    batch = region.unfold(2, 256, 256).unfold(3, 256, 256)  # (1, 3, w, h, 256, 256)
    batch = batch.permute(0, 2, 3, 1, 4, 5).reshape(-1, 3, 256, 256)  # '(b p1 p2) c w h'
    feats = [m256(batch[i : i + 256]).detach().cpu() for i in range(0, batch.shape[0], 256)]
    grid = torch.vstack(feats).reshape(w_256, h_256, 384).transpose(0, 1).transpose(0, 2).unsqueeze(0)
    return m4k(grid.to(region.device))  # (1, 192)


# -- timing --------------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> tuple[float, Tensor]:
    """Seconds of one call of ``fn`` and its output."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--repeats", type=int, default=1, help="rounds; each times every variant once, interleaved"
    )
    p.add_argument("--size", type=int, default=4096, help="region side in px (multiple of 256)")
    p.add_argument("--batch-size", type=int, default=64, help="ViT_256 patches per call (ours)")
    p.add_argument("--precision", nargs="+", choices=["fp32", "bf16", "fp16"], default=["fp32"],
                   help="ours, autocast (bf16: AMX on recent Xeons, tensor cores on GPUs)")  # fmt: skip
    p.add_argument("--device", default="auto")
    p.add_argument("--region-image", default=None,
                   help="slide/image whose level 0 fills the region's top-left (white padding)")  # fmt: skip
    p.add_argument("--official-repo", default=None,
                   help="local clone of mahmoodlab/HIPT: also time its own modules (same weights)")  # fmt: skip
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
    plain = HIPTRegionEncoder(vit256, vit4k, batch_size=args.batch_size, dedup=False).eval()
    region = torch.randn(1, 3, args.size, args.size, device=dev)
    if args.region_image:
        region = real_region(args.region_image, args.size).to(dev)
    small = torch.randn(1, 3, 512, 512, device=dev)

    def run_ours(x: Tensor, precision: str, model: HIPTRegionEncoder = ours) -> Tensor:
        with torch.inference_mode(), autocast_context(dev, precision):
            return model(x).region.float()

    variants = {
        "official structure (minibatch 256, explicit attention, fp32)": lambda: official_structure(
            vit256, vit4k, region
        )
    }
    if args.official_repo:
        m256, m4k = official_modules(args.official_repo, vit256, vit4k)
        m256, m4k = m256.to(dev), m4k.to(dev)
        variants["official code (HIPT_4K modules from --official-repo, fp32)"] = lambda: official_forward(
            m256, m4k, region
        )
    if args.per_patch:
        variants["official structure, one patch at a time"] = lambda: official_structure(
            vit256, vit4k, region, 1
        )
    for prec in args.precision:
        variants[f"gigaslide (batch {args.batch_size}, SDPA, {prec})"] = lambda prec=prec: run_ours(
            region, prec
        )
    n_patches = (args.size // 256) ** 2
    floor = f"fp32 matrix products alone, {n_patches} patches (floor; output not comparable)"
    variants[floor] = lambda: gemm_floor(vit256, n_patches, args.batch_size)
    if args.region_image:
        variants[f"gigaslide (batch {args.batch_size}, SDPA, fp32, no dedup)"] = lambda: run_ours(
            region, "fp32", plain
        )
    print(f"machine: {describe_machine()}; device {dev}")
    print(f"region {args.size} px = {(args.size // 256) ** 2} patches; {args.repeats} interleaved round(s)")
    official_structure(vit256, vit4k, small)  # warm-up (kernels, allocator) on a 512 px region
    for prec in args.precision:
        run_ours(small, prec)
    times: dict[str, list[float]] = {name: [] for name in variants}
    outputs: dict[str, Tensor] = {}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            t, outputs[name] = timed(fn, dev)
            times[name].append(t)
    base = next(iter(variants))
    ref = outputs[base]
    t_base = statistics.median(times[base])
    for name in variants:
        t = statistics.median(times[name])
        rel = float("nan") if name == floor else float((outputs[name] - ref).abs().max() / ref.abs().max())
        runs = ", ".join(f"{x:.1f}" for x in times[name])
        print(f"{name:<62s} {t:8.2f} s/region (runs: {runs})  {1.0 / t:7.4f} regions/s  "
              f"x{t_base / t:5.2f}  max rel diff {rel:.1e}")  # fmt: skip


if __name__ == "__main__":
    main()
