"""Arguments shared by the pretraining commands: DINO's head, optimisation schedule and teacher with its
defaults (`pretrain dino`, `pretrain hipt-region`, `pretrain longvit`), and the run options of all of them."""

from __future__ import annotations

import argparse
from typing import Any


def key_value(text: str) -> tuple[str, Any]:
    """``KEY=VALUE`` with the value parsed as YAML (``depth=2``, ``drop=0.1``, ``name=vit``)."""
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    key, value = text.split("=", 1)
    import yaml

    return key.strip(), yaml.safe_load(value)


def add_dino_arguments(p: argparse.ArgumentParser, unit: str, warmup_teacher_temp_epochs: int = 30) -> None:
    """DINO's head, schedules and teacher options (``unit``: what one batch item is, for the lr help)."""
    p.add_argument("--out-dim", type=int, default=65536, help="DINO head prototypes K")
    p.add_argument("--head-hidden-dim", type=int, default=2048)
    p.add_argument("--head-bottleneck-dim", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4, help=f"learning rate per 256 {unit} of global batch")
    p.add_argument("--min-lr", type=float, default=1e-6)
    p.add_argument("--warmup-epochs", type=int, default=10, help="linear lr warm-up (capped at --epochs)")
    p.add_argument("--weight-decay", type=float, default=0.04)
    p.add_argument("--weight-decay-end", type=float, default=0.4)
    p.add_argument("--momentum-teacher", type=float, default=0.996, help="teacher EMA momentum (cosine to 1)")
    p.add_argument("--teacher-temp", type=float, default=0.04)
    p.add_argument("--warmup-teacher-temp", type=float, default=0.04)
    p.add_argument("--warmup-teacher-temp-epochs", type=int, default=warmup_teacher_temp_epochs,
                   help="teacher temperature warm-up (capped at --epochs)")  # fmt: skip
    p.add_argument("--freeze-last-layer", type=int, default=1, help="epochs without head last-layer updates")
    p.add_argument("--clip-grad", type=float, default=3.0, help="per-parameter gradient norm clip (0 = off)")
    p.add_argument("--drop-path", type=float, default=0.1, help="student stochastic depth rate")
    p.add_argument("--bn-in-head", action="store_true",
                   help="BatchNorm in the head's MLP (DINO's --use_bn_in_head; off in DINO and HIPT's recipes)")  # fmt: skip
    p.add_argument("--norm-last-layer", action=argparse.BooleanOptionalAction, default=True,
                   help="weight-normalised last layer with its norm fixed (DINO's default)")  # fmt: skip
    p.add_argument("--center-momentum", type=float, default=0.9, help="EMA momentum of the teacher's centre")


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    """Where and how a pretraining run executes: precision, device, seed, progress bar."""
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="AMP on CUDA")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:<i>")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def dino_options(args: argparse.Namespace) -> dict[str, Any]:
    """The :class:`gigaslide.ssl.dino.DINOConfig` fields set by :func:`add_dino_arguments`."""
    return {
        "out_dim": args.out_dim, "head_hidden_dim": args.head_hidden_dim,
        "head_bottleneck_dim": args.head_bottleneck_dim, "lr": args.lr, "min_lr": args.min_lr,
        "warmup_epochs": args.warmup_epochs, "weight_decay": args.weight_decay,
        "weight_decay_end": args.weight_decay_end, "momentum_teacher": args.momentum_teacher,
        "teacher_temp": args.teacher_temp, "warmup_teacher_temp": args.warmup_teacher_temp,
        "warmup_teacher_temp_epochs": args.warmup_teacher_temp_epochs,
        "freeze_last_layer": args.freeze_last_layer, "clip_grad": args.clip_grad,
        "drop_path_rate": args.drop_path, "use_bn_in_head": args.bn_in_head,
        "norm_last_layer": args.norm_last_layer, "center_momentum": args.center_momentum,
    }  # fmt: skip
