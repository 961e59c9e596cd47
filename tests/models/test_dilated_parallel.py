"""Sequence-parallel dilated attention and LongViT: 2 gloo processes on CPU equal one process."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from gigaslide.models.layers import DilatedAttention
from gigaslide.models.layers.dilated_parallel import check_parallel_schedule
from gigaslide.models.slide import create_slide_model

WORLD, N, D, H = 2, 48, 16, 4
PAIRS = ((8, 24, 48, 96), (1, 2, 4, 8))  # 8 | chunk, 24 = chunk, 48 and 96 span both ranks
VIT = dict(
    img_size=128, embed_dim=16, depth=2, num_heads=4, segment_lengths=(4, 8, 16), dilated_ratios=(1, 2, 4)
)


def _inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(2, N, D, generator=g, dtype=torch.float64)
    pad = torch.zeros(2, N, dtype=torch.bool)
    pad[0, 30:] = True
    pad[1, :5] = True
    img = torch.randn(1, 3, 128, 128, generator=g)
    return x, weight, pad, img


def _attn() -> DilatedAttention:
    torch.manual_seed(1)
    return DilatedAttention(D, H, *PAIRS).double()


def _vit():
    torch.manual_seed(2)
    return create_slide_model("longvit", in_dim=3, n_classes=2, **VIT)


def _run(attn, x, weight, pad):
    x = x.clone().requires_grad_(True)
    attn.zero_grad()
    y = attn(x, key_padding_mask=pad)
    (y * weight).sum().backward()
    return y.detach(), x.grad, {n: p.grad.clone() for n, p in attn.named_parameters()}


def _worker(rank: int, init: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    x, weight, pad, img = _inputs()
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    res = {}
    attn = _attn()
    attn.set_sequence_parallel(True)
    for name, mask in (("plain", None), ("masked", pad)):
        y, gx, gp = _run(attn, x[:, rows], weight[:, rows], None if mask is None else mask[:, rows])
        res[name] = (y, gx, gp)
    vit = _vit().eval()
    vit.set_sequence_parallel(True)
    band = img[:, :, rank * 64 : (rank + 1) * 64].clone().requires_grad_(True)
    out = vit(band)
    out.logits.sum().backward()
    res["vit"] = (out.logits.detach(), band.grad, {n: p.grad.clone() for n, p in vit.named_parameters()})
    torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.distributed
def test_sequence_parallel_equals_one_process(tmp_path: Path) -> None:
    mp.spawn(_worker, args=(f"file://{tmp_path / 'rdv'}", str(tmp_path)), nprocs=WORLD, join=True)
    res = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    x, weight, pad, img = _inputs()
    for name, mask in (("plain", None), ("masked", pad)):
        y, gx, gp = _run(_attn(), x, weight, mask)
        torch.testing.assert_close(torch.cat([res[r][name][0] for r in range(WORLD)], dim=1), y)
        torch.testing.assert_close(torch.cat([res[r][name][1] for r in range(WORLD)], dim=1), gx)
        for p in gp:  # parameter gradients: the sum over ranks (what DDP's all-reduce forms)
            torch.testing.assert_close(
                sum(res[r][name][2][p] for r in range(WORLD)), gp[p], msg=f"{name} {p}"
            )
    vit = _vit().eval()
    full = img.clone().requires_grad_(True)
    out = vit(full)
    out.logits.sum().backward()
    for r in range(WORLD):
        torch.testing.assert_close(res[r]["vit"][0], out.logits, rtol=1e-4, atol=1e-5)
    # every rank computes the same loss: the input gradient comes back WORLD times (once per rank's loss)
    # and the mean of the parameter gradients over ranks (DDP's average) is the one-process gradient
    band_grads = torch.cat([res[r]["vit"][1] for r in range(WORLD)], dim=2)
    torch.testing.assert_close(band_grads / WORLD, full.grad, rtol=1e-4, atol=1e-6)
    for n, p in vit.named_parameters():
        mean = sum(res[r]["vit"][2][n] for r in range(WORLD)) / WORLD
        torch.testing.assert_close(mean, p.grad, rtol=1e-4, atol=1e-6, msg=n)


def test_parallel_schedule_errors_name_the_pair() -> None:
    with pytest.raises(ValueError, match="dilation ratio 16"):
        check_parallel_schedule(((8, 16),), chunk=24, world=2)
    with pytest.raises(ValueError, match="segment length 16 does not divide"):
        check_parallel_schedule(((16, 1),), chunk=24, world=2)
    with pytest.raises(ValueError, match="segment length 36 is not a multiple"):
        check_parallel_schedule(((36, 1),), chunk=24, world=2)


def test_one_process_ignores_the_parallel_flag() -> None:
    x, _, pad, _ = _inputs()
    attn = _attn()
    y = attn(x, key_padding_mask=pad)
    attn.set_sequence_parallel(True)
    torch.testing.assert_close(attn(x, key_padding_mask=pad), y)
