"""`gigaslide pretrain <recipe>`: self-supervised pretraining, one module per recipe.

Each recipe lives in ``gigaslide.cli.<module>`` with ``add_parser(subparsers)`` and ``run(args)``,
registered in :data:`RECIPES` (imported lazily, as the top-level commands are).
"""

from __future__ import annotations

import argparse
import importlib

# recipe name -> module under gigaslide.cli
RECIPES: dict[str, str] = {
    "dino": "pretrain_dino",
    "gigassl": "pretrain_gigassl",
    "longvit": "pretrain_longvit",
    "hipt-region": "pretrain_hipt_region",
}


def add_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pretraining (DINO, Giga-SSL, ...)",
        description="Self-supervised pretraining of encoders and slide models. Choose a recipe.",
    )
    recipes = p.add_subparsers(dest="recipe", metavar="RECIPE")
    for _name, module in RECIPES.items():
        mod = importlib.import_module(f"gigaslide.cli.{module}")
        rp = mod.add_parser(recipes)
        rp.set_defaults(_recipe_run=mod.run)
    p.set_defaults(_pretrain_parser=p)
    return p


def run(args: argparse.Namespace) -> int:
    recipe_run = getattr(args, "_recipe_run", None)
    if recipe_run is None:
        args._pretrain_parser.print_help()
        return 2
    return int(recipe_run(args) or 0)
