"""`gigaslide` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in ``gigaslide.cli.<module>`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Modules are imported lazily so ``gigaslide --help`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from gigaslide import __version__

# subcommand name -> module under gigaslide.cli
SUBCOMMANDS: dict[str, str] = {
    "synth": "synth",
    "tile": "tile",
    "preview": "preview",
    "embed": "embed",
    "convert": "convert",
    "train": "train",
    "probe": "probe",
    "heatmap": "heatmap",
    "encoders": "encoders",
    "models": "models",
    "e2e": "e2e",
    "demo": "demo",
    "gigassl": "gigassl",
    "pretrain": "pretrain",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gigaslide",
        description="Whole-slide image pipeline: tiling, feature extraction, slide-level learning.",
    )
    parser.add_argument("--version", action="version", version=f"gigaslide {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _name, module in SUBCOMMANDS.items():
        try:
            mod = importlib.import_module(f"gigaslide.cli.{module}")
        except ModuleNotFoundError as e:
            if e.name == f"gigaslide.cli.{module}":
                continue  # subcommand not part of this build
            raise
        p = mod.add_parser(sub)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"gigaslide {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _user_errors() as e:
        # bad input (a file, a label table, a config, weights ...): the message names it and the fix
        if args.verbose:
            raise
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"gigaslide {args.command}: error: {msg}", file=sys.stderr)
        print("(run `gigaslide -v ...` for the full traceback)", file=sys.stderr)
        return 2


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input rather than a bug: shown as one line, exit status 2."""
    from gigaslide.io.base import SlideReadError
    from gigaslide.models.weights import WeightsError

    errors: list[type[BaseException]] = [ValueError, KeyError, OSError, SlideReadError, WeightsError]
    try:
        import yaml

        errors.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        pass
    return tuple(errors)


if __name__ == "__main__":
    raise SystemExit(main())
