"""`gigaslide models`: list the registered slide-level models (MIL aggregators and heads)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "models",
        help="list the slide-level models usable with `gigaslide train --model`",
        description="List the slide model registry with each entry's paper and capabilities.",
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    return p


def run(args: argparse.Namespace) -> int:
    from gigaslide.models.slide import get_slide_model_info, list_slide_models

    rows = []
    for name in list_slide_models():
        info = get_slide_model_info(name)
        rows.append(
            {
                "name": name,
                "attention": info.produces_attention,
                "input": info.input_kind,
                "coords": "needs" if info.needs_coords else ("accepts" if info.accepts_coords else "no"),
                "paper": info.paper,
                "description": info.description,
            }
        )
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    width = max(len(r["name"]) for r in rows)
    print(f"{'name':<{width}}  attention  input            coords   paper")
    for r in rows:
        att = "yes" if r["attention"] else "no"
        print(f"{r['name']:<{width}}  {att:<9}  {r['input']:<15}  {r['coords']:<7}  {r['paper']}")
    return 0
