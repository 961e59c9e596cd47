"""``gigaslide encoders``: list the tile encoders, their metadata and the weights registered for them."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register the ``encoders`` subcommand."""
    p = subparsers.add_parser(
        "encoders",
        help="list tile encoders and their registered weights",
        description=(
            "List the registered tile encoders with embedding size, input size, resolution, "
            "normalisation and the weights file the registry YAML ($GIGASLIDE_WEIGHTS or "
            "~/.config/gigaslide/weights.yaml) names for each. Any timm model is also usable as "
            "'timm:<architecture>'."
        ),
    )
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.add_argument(
        "--timm",
        action="append",
        default=[],
        metavar="ARCH",
        help="also describe timm:<ARCH> (repeatable)",
    )
    return p


def _rows(extra_timm: list[str]) -> tuple[list[dict[str, Any]], str, str | None]:
    from gigaslide.models.encoders import get_encoder_meta, list_encoders
    from gigaslide.models.weights_registry import read_registry, registry_path

    yml = registry_path()
    error: str | None = None
    try:
        entries = read_registry(yml)
    except Exception as e:  # a broken YAML must not hide the encoder list
        entries, error = {}, str(e)
    names = list_encoders() + [a if a.startswith("timm:") else f"timm:{a}" for a in extra_timm]
    names += sorted(n for n in entries if n.startswith("timm:") and n not in names)
    rows = []
    for name in names:
        row = get_encoder_meta(name).to_dict()
        path = entries.get(name)
        row["weights"] = str(path) if path is not None else None
        row["weights_exists"] = bool(path is not None and path.exists())
        rows.append(row)
    return rows, str(yml), error


def _weights_cell(row: dict[str, Any]) -> str:
    if row["weights"] is None:
        return "- (random init)"
    return row["weights"] + ("" if row["weights_exists"] else "  [MISSING FILE]")


def run(args: argparse.Namespace) -> int:
    """Print the encoder table (or JSON); returns 0, or 2 (bad input, as every command) when the
    registry YAML is unreadable. An unknown timm architecture raises (cli.main reports it)."""
    rows, yml, error = _rows(list(args.timm))
    if args.json:
        json.dump({"registry": yml, "registry_error": error, "encoders": rows}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        header = ("name", "dim", "input", "mpp", "mean/std", "weights")
        table = [
            (
                r["name"],
                str(r["embed_dim"]),
                str(r["input_size"]),
                f"{r['mpp']:g}",
                "/".join(f"{v:g}" for v in r["mean"]) + " | " + "/".join(f"{v:g}" for v in r["std"]),
                _weights_cell(r),
            )
            for r in rows
        ]
        widths = [max(len(h), *(len(t[i]) for t in table)) for i, h in enumerate(header)]
        for line in [header, *table]:
            print("  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip())
        print(f"\nweights registry: {yml}")
        for r in rows:
            print(f"  {r['name']}: {r['description']} [{r['paper']}]")
    if error:  # the table is still printed: a broken YAML must not hide the encoder list
        print(f"gigaslide encoders: error: {' '.join(str(error).split())}", file=sys.stderr)
        return 2
    return 0
