"""Giga-SSL costs on this machine, measured side by side in one run.

1. Bank throughput (``build_gigassl_bank``: read -> augment -> encode -> write) on a synthetic slide,
   against, on the same tiles and threads: (a) the loader's ceiling (``TileLoader`` drained, no
   work), (b) loader + tile augmentation, (c) the encoder alone on random input resident on the
   device. The ratio bank / ceiling says how much of the reading speed survives augmentation and
   encoding; bank / model-only says how well reading and augmenting keep the encoder fed.
2. Sparse convolution, forward + backward, vs the number N of active sites: a 3x3 submanifold
   ``SparseConv2d`` (C -> C) against a dense ``F.conv2d`` on the densified map of the same extent
   (sites drawn at ``--density`` of a square grid), and the whole ``sparseconvmil`` stage
   (ResNet-18 layer4, 256 -> 512) on the same maps.
3. One Giga-SSL step's aggregator cost: ``sparseconvmil`` forward + backward on 2 views of B slides
   x T tiles (the paper: T = 5).
4. Giga-SSL pretraining end to end (``pretrain_gigassl``: bank views, aggregator, projector, NT-Xent,
   Adam, checkpoint) in steps/s on a random-feature bank of 3 x B slides, and encoding
   (``encode_gigassl``: R = 50 views of T = 5 tiles per slide) in seconds per slide, from a plain
   feature folder of the same slides.

    .venv/bin/python bench/gigassl.py              # full run
    .venv/bin/python bench/gigassl.py --quick      # smaller sizes
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from embed import make_tiling
from gigaslide.data.tile_augment import TileAugment
from gigaslide.data.tile_dataset import TileDataset
from gigaslide.data.tile_loader import TileLoader
from gigaslide.models.encoders import create_encoder
from gigaslide.models.layers.sparse_conv import SparseConv2d, SparseMap
from gigaslide.models.slide import create_slide_model
from gigaslide.pipeline.extract import encode_batch, prepare_encoder
from gigaslide.pipeline.gigassl_bank import build_gigassl_bank, draw_views, slide_seed
from gigaslide.preprocess.coords_io import read_coords
from gigaslide.utils.device import resolve_device
from gigaslide.utils.machine import describe_machine
from gigaslide.utils.seed import seed_everything


def timed(fn: Callable[[], object], repeat: int, device: torch.device) -> float:
    """Median seconds of ``fn`` over ``repeat`` runs after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def bench_bank(args: argparse.Namespace, device: torch.device, root: Path) -> None:
    seed_everything(0)
    enc = create_encoder("resnet18_trunc", weights="random")
    make_tiling(root / "tiling", args.width, args.height, enc.meta.input_size, 1.0)
    cf = read_coords(root / "tiling" / "patches" / "bench.h5")
    aug = TileAugment()
    rows, params = draw_views(
        len(cf.coords), args.n_aug, args.n_tiles, aug, True, np.random.default_rng(slide_seed(0, "bench"))
    )
    coords = cf.coords[rows].reshape(-1, 2)
    n = len(coords)
    slide = root / "tiling" / "slides" / "bench.tiff"

    def drain(augment: bool) -> float:
        loader = TileLoader(
            TileDataset(slide, coords, cf.spec), batch_size=args.n_tiles, num_threads=args.workers
        )
        t0 = time.perf_counter()
        for a, (images, _) in enumerate(loader):
            if augment:
                aug(images.to(device).float().div_(255), params[a])
        return n / (time.perf_counter() - t0)

    ceiling = drain(False)
    with_aug = drain(True)
    x = torch.randn(args.n_tiles, 3, enc.meta.input_size, enc.meta.input_size)
    channels_last = prepare_encoder(enc, device)
    model_s = timed(lambda: encode_batch(enc, x, device, "fp32", channels_last), 2, device)
    model_rate = args.n_tiles / model_s
    t0 = time.perf_counter()
    summary = build_gigassl_bank(
        root / "tiling", enc, root / "bank", n_aug=args.n_aug, n_tiles=args.n_tiles, batch_size=args.n_tiles,
        num_workers=args.workers, device=device, progress=False,
    )  # fmt: skip
    bank_rate = n / (time.perf_counter() - t0)
    assert not summary.failed, summary.describe()
    print(f"\n### bank: {args.n_aug} augmentations x {args.n_tiles} tiles = {n} tiles of 256 px, resnet18_trunc, "
          f"{args.workers} reader threads\n")  # fmt: skip
    print("| stage | tiles/s | / loader ceiling |")
    print("|---|---:|---:|")
    for name, rate in [
        ("(a) loader ceiling (TileLoader drained)", ceiling),
        ("(b) loader + tile augmentation", with_aug),
        ("(c) encoder alone (random input on device)", model_rate),
        ("bank end-to-end (read, augment, encode, write)", bank_rate),
    ]:
        print(f"| {name} | {rate:.1f} | {rate / ceiling:.2f} |")
    print(f"\nbank / encoder-alone = {bank_rate / model_rate:.2f}")


def random_sites(n: int, density: float, seed: int) -> tuple[torch.Tensor, int]:
    side = max(1, int(np.ceil(np.sqrt(n / density))))
    g = torch.Generator().manual_seed(seed)
    flat = torch.randperm(side * side, generator=g)[:n]
    return torch.stack([torch.zeros_like(flat), flat // side, flat % side], dim=1), side


def bench_sparse(args: argparse.Namespace, device: torch.device) -> None:
    c = args.channels
    convs = {alg: SparseConv2d(c, c, 3, 1, algorithm=alg).to(device) for alg in ("scatter", "gather")}
    convs["gather"].load_state_dict(convs["scatter"].state_dict())
    stage = create_slide_model("sparseconvmil", in_dim=256, n_classes=0).to(device).train()
    print(f"\n### sparse vs dense, forward + backward, median of {args.repeat}\n")
    print(f"| density | N sites | grid | scatter 3x3 {c}->{c} ms | gather ms | dense conv2d on grid ms | "
          "dense / scatter | sparseconvmil stage (256->512) ms |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for density in args.density:
        for n in args.sites:
            coords, side = random_sites(n, density, n)
            coords = coords.to(device)
            feats = torch.randn(n, c, device=device, requires_grad=True)
            ms = {}
            for alg, conv in convs.items():
                # a fresh map each call: the neighbour search is part of the cost
                ms[alg] = 1e3 * timed(
                    lambda conv=conv, f=feats, xy=coords: (
                        conv(SparseMap(f, xy, 1)).features.square().sum().backward()
                    ),
                    args.repeat,
                    device,
                )
            td = float("nan")
            if side <= args.dense_max:
                dense = torch.zeros(1, c, side, side, device=device)
                dense[0, :, coords[:, 1], coords[:, 2]] = feats.detach().t()
                dense.requires_grad_(True)
                td = 1e3 * timed(
                    lambda dense=dense: (
                        F.conv2d(dense, convs["scatter"].weight, padding=1).square().sum().backward()
                    ),
                    args.repeat,
                    device,
                )
            tst = float("nan")
            if n <= args.stage_max:
                x = torch.randn(1, n, 256, device=device)
                xy = coords[:, [2, 1]].unsqueeze(0).double()
                tst = 1e3 * timed(
                    lambda x=x, xy=xy: stage(x, coords=xy).embedding.square().sum().backward(),
                    args.repeat,
                    device,
                )
            dense_s = f"{td:.1f}" if td == td else "- (too large)"
            ratio = f"{td / ms['scatter']:.2f}" if td == td else "-"
            stage_s = f"{tst:.1f}" if tst == tst else "-"
            print(f"| {density} | {n} | {side}x{side} | {ms['scatter']:.1f} | {ms['gather']:.1f} | {dense_s} | "
                  f"{ratio} | {stage_s} |")  # fmt: skip


def bench_step(args: argparse.Namespace, device: torch.device) -> None:
    model = create_slide_model("sparseconvmil", in_dim=256, n_classes=0).to(device).train()
    b, t = args.batch, 5
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2 * b, t, 256, generator=g).to(device)
    cells = torch.randint(0, 40, (2 * b, t, 2), generator=g).to(device)

    def step() -> None:
        model(x, coords=cells).embedding.square().sum().backward()

    ms = timed(step, args.repeat, device) * 1e3
    print(f"\n### one SSL step's aggregator: sparseconvmil fwd+bwd on 2 views x {b} slides x {t} tiles: {ms:.1f} ms "
          f"({1e3 / ms:.1f} steps/s, model only)")  # fmt: skip


def write_random_bank(root: Path, n_slides: int, n_aug: int, n_tiles: int, dim: int) -> tuple[Path, Path]:
    """A bank and a plain feature folder of random features on a 32 x 32 tile grid."""
    from gigaslide.data.features_io import write_features
    from gigaslide.data.gigassl_bank import BankWriter
    from gigaslide.preprocess.tiling_spec import TileSpec

    spec = TileSpec.create(tile_size=256, target_mpp=1.0, slide_mpp=0.5, level_downsamples=[1.0],
                           level0_dims=(20000, 20000))  # fmt: skip
    rng = np.random.default_rng(0)
    grid = np.array([(i, j) for i in range(32) for j in range(32)])
    for s in range(n_slides):
        rows = np.stack([rng.choice(len(grid), n_tiles, replace=False) for _ in range(n_aug)])
        coords = np.rint(grid[rows] * spec.level0_stride).astype(np.int64)  # (n_aug, n_tiles, 2)
        feats = rng.normal(size=(n_aug, n_tiles, dim)).astype(np.float32)
        with BankWriter(root / "bank" / "h5_files" / f"s{s}.h5", coords, dim, "bench",
                        features_attrs={"slide_id": f"s{s}"}, coords_attrs=spec.to_attrs()) as w:  # fmt: skip
            w.open()
            for a in range(n_aug):
                w.write(feats[a])
            w.finalize()
        write_features(root / "features" / "h5_files" / f"s{s}.h5", feats[0], coords[0],
                       coords_attrs=spec.to_attrs())  # fmt: skip
    return root / "bank", root / "features"


def bench_pretrain_encode(args: argparse.Namespace, device: torch.device, root: Path) -> None:
    from gigaslide.data.gigassl_views import GigaSSLViews
    from gigaslide.ssl.gigassl_encode import encode_gigassl
    from gigaslide.ssl.simclr import GigaSSLConfig, pretrain_gigassl

    b = args.batch
    bank, feats = write_random_bank(root, 3 * b, 2, 16, 256)
    cfg = GigaSSLConfig(warmup_epochs=0)
    views = GigaSSLViews(bank, batch_size=b, n_tiles=5, seed=0)
    ms_views = timed(lambda: views.batch(0, 0), args.repeat, torch.device("cpu")) * 1e3
    print(
        f"\n### drawing one minibatch of views (2 x {b} slides x 5 tiles, read from the bank): {ms_views:.0f} ms"
    )
    pretrain_gigassl(bank, root / "warm", epochs=1, batch_size=b, cfg=cfg, device=device, progress=False)
    t0 = time.perf_counter()
    ckpt = pretrain_gigassl(
        bank, root / "ssl", epochs=1, batch_size=b, cfg=cfg, device=device, progress=False
    )
    dt = time.perf_counter() - t0
    print(f"### Giga-SSL pretraining end to end (views + sparseconvmil + projector + NT-Xent + Adam + "
          f"checkpoint), B = {b} slides, T = 5: {3 / dt:.2f} steps/s ({dt / 3 * 1e3:.0f} ms/step)")  # fmt: skip
    n = min(3 * b, args.encode_slides)
    for p in sorted((feats / "h5_files").glob("*.h5"))[n:]:
        p.unlink()
    t0 = time.perf_counter()
    encode_gigassl(feats, ckpt, None, n_views=50, device=device, progress=False)
    dt = time.perf_counter() - t0
    print(f"### encode: R = 50 views x T = 5 tiles per slide, {n} slides: {dt / n * 1e3:.0f} ms/slide")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    p.add_argument("--n-aug", type=int, default=4)
    p.add_argument("--n-tiles", type=int, default=64)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--height", type=int, default=4096)
    p.add_argument("--channels", type=int, default=256)
    p.add_argument("--sites", type=int, nargs="+", default=[100, 1000, 5000, 20000])
    p.add_argument(
        "--density", type=float, nargs="+", default=[0.5, 0.05], help="active fraction of the grid"
    )
    p.add_argument("--dense-max", type=int, default=320, help="largest grid side timed densely")
    p.add_argument("--stage-max", type=int, default=5000, help="most sites for the sparseconvmil stage")
    p.add_argument("--batch", type=int, default=256, help="slides per SSL minibatch (paper: 256)")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--encode-slides", type=int, default=64, help="slides timed by the encode benchmark")
    p.add_argument("--only-ssl", action="store_true", help="run only part 4 (pretraining and encoding)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable timings on a shared machine)"
    )
    p.add_argument("--quick", action="store_true", help="small sizes")
    args = p.parse_args()
    if args.quick:
        args.n_aug, args.n_tiles, args.sites, args.batch, args.repeat = 2, 32, [100, 1000, 4000], 64, 2
        args.density, args.stage_max, args.encode_slides = [0.5, 0.05], 1000, 16
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    print(f"machine: {describe_machine()}; device {device}; torch threads {torch.get_num_threads()}")
    if not args.only_ssl:
        with tempfile.TemporaryDirectory() as tmp:
            bench_bank(args, device, Path(tmp))
        bench_sparse(args, device)
        bench_step(args, device)
    with tempfile.TemporaryDirectory() as tmp:
        bench_pretrain_encode(args, device, Path(tmp))


if __name__ == "__main__":
    main()
