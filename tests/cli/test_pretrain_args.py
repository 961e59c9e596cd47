"""The DINO options shared by `pretrain dino`, `pretrain hipt-region` and `pretrain longvit`."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from gigaslide.cli.pretrain_args import add_dino_arguments, dino_options
from gigaslide.ssl.dino import DINOConfig
from gigaslide.ssl.hipt_region import stage2_dino_config


def _parse(argv: list[str], warmup: int = 30) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_dino_arguments(p, "tiles", warmup_teacher_temp_epochs=warmup)
    return p.parse_args(argv)


def test_defaults_are_dino_and_hipt_stage2_recipes() -> None:
    cfg = DINOConfig(**dino_options(_parse([])))
    ref = DINOConfig()
    for f in dataclasses.fields(DINOConfig):
        if f.name != "crops":
            assert getattr(cfg, f.name) == getattr(ref, f.name), f.name
    stage2 = stage2_dino_config(**dino_options(_parse([], warmup=0)))
    assert stage2 == stage2_dino_config()


def test_head_and_centre_options_reach_the_config() -> None:
    opts = dino_options(_parse(["--bn-in-head", "--no-norm-last-layer", "--center-momentum", "0.99",
                                "--momentum-teacher", "0.95", "--out-dim", "256"]))  # fmt: skip
    cfg = stage2_dino_config(**opts)
    assert cfg.use_bn_in_head and not cfg.norm_last_layer
    assert (cfg.center_momentum, cfg.momentum_teacher, cfg.out_dim) == (0.99, 0.95, 256)


def test_every_pretrain_command_accepts_them() -> None:
    from gigaslide.cli.main import build_parser

    parser = build_parser()
    for cmd in (["pretrain", "dino", "t", "--encoder", "vit_tiny_d4"], ["pretrain", "hipt-region", "r"],
                ["pretrain", "longvit", "s"]):  # fmt: skip
        args = parser.parse_args([*cmd, "--out", "o", "--bn-in-head", "--no-norm-last-layer"])
        assert args.bn_in_head and not args.norm_last_layer
    with pytest.raises(SystemExit):
        parser.parse_args(["pretrain", "hipt-region", "r", "--out", "o", "--center-momentum", "x"])
