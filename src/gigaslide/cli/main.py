"""`gigaslide` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in ``gigaslide.cli.<module>`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Only the module of the command being run is imported (``gigaslide tile`` never imports
scikit-learn, pandas or torch); ``gigaslide --help`` lists every command from the first line
of its module docstring, read without importing it.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

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
    "demo": "demo",
}


def _summary(module: str) -> str | None:
    """First line of a CLI module's docstring without importing it ("`gigaslide x`: " removed); None if absent."""
    spec = importlib.util.find_spec(f"gigaslide.cli.{module}")
    if spec is None or spec.origin is None:
        return None
    doc = ast.get_docstring(ast.parse(Path(spec.origin).read_text(encoding="utf-8"))) or ""
    line = doc.strip().splitlines()[0] if doc.strip() else ""
    if line.lstrip("`").startswith("gigaslide") and ": " in line:  # "`gigaslide x`: what it does."
        line = line.split(": ", 1)[1]
    return line.rstrip(".")


def _command_in(argv: Sequence[str]) -> str | None:
    """The subcommand named in ``argv`` (top-level options take no value), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; given ``argv``, only the named command's module is imported (others: help line)."""
    command = _command_in(argv) if argv is not None else None
    lazy = argv is not None
    parser = argparse.ArgumentParser(
        prog="gigaslide",
        description="Whole-slide image pipeline: tiling, feature extraction, slide-level learning.",
    )
    parser.add_argument("--version", action="version", version=f"gigaslide {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS.items():
        if lazy and name != command:
            summary = _summary(module)
            if summary is not None:  # None: subcommand not part of this build
                sub.add_parser(name, help=summary, add_help=False)
            continue
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
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
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
