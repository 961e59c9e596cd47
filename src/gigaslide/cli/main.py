"""`gigaslide` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in ``gigaslide.cli.<module>`` and exposes
``add_parser(subparsers) -> argparse.ArgumentParser`` and ``run(args) -> int``.
Errors take ONE path, here: bad input (``ValueError``, ``KeyError``, ``OSError``, unreadable
slides or weights, a busy output folder: :class:`gigaslide.utils.errors.UserError`) prints
``gigaslide COMMAND: error: MESSAGE`` on one line and exits with status 2; anything else is a bug,
printed on one line with a hint to rerun with ``-v`` for the traceback (exit status 1). Warnings
print as one line (``gigaslide COMMAND: warning: MESSAGE``), never with source lines.
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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gigaslide import __version__
from gigaslide.cli.common import HelpFormatter

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
    "hipt-attention": "hipt_attention",
    "encoders": "encoders",
    "models": "models",
    "e2e": "e2e",
    "demo": "demo",
    "gigassl": "gigassl",
    "pretrain": "pretrain",
    "slide-images": "slide_images",
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
        _show_defaults(p)
        p.set_defaults(_run=mod.run)
    return parser


def _show_defaults(parser: argparse.ArgumentParser) -> None:
    """Every option's default in ``--help``: this parser and its nested subcommands."""
    parser.formatter_class = HelpFormatter
    for action in parser._actions:
        unset = action.default in (None, False, argparse.SUPPRESS) or action.default == []
        if action.help is None and action.option_strings and not unset:
            action.help = "(default: %(default)s)"  # argparse shows nothing for options without help
        if isinstance(action, argparse._SubParsersAction):
            for child in set(action.choices.values()):
                _show_defaults(child)


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
    saved = warnings.formatwarning
    if not args.verbose:
        warnings.formatwarning = _one_line_warning(args.command)
    try:
        return _run(args)
    finally:
        warnings.formatwarning = saved


def _run(args: argparse.Namespace) -> int:
    """Run the subcommand; every error it raises is reported here, in one line."""
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"gigaslide {args.command}: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except _user_errors() as e:
        # bad input (a file, a label table, a config, weights ...): the message names it and the fix
        if args.verbose:
            raise
        print(f"gigaslide {args.command}: error: {_message(e)}", file=sys.stderr)
        return 2
    except Exception as e:  # a bug: one line, and how to see the traceback
        if args.verbose:
            raise
        print(
            f"gigaslide {args.command}: unexpected error: {type(e).__name__}: {_message(e)}", file=sys.stderr
        )
        print("(this is likely a bug; run `gigaslide -v ...` for the full traceback)", file=sys.stderr)
        return 1


def _message(e: BaseException) -> str:
    """The exception's message on one line (KeyError without its quotes)."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    return " ".join(str(msg).split()) or type(e).__name__


def _one_line_warning(command: str) -> Any:
    """A ``warnings.formatwarning`` that prints ``gigaslide COMMAND: warning: MESSAGE`` (no source line)."""

    def fmt(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> str:
        return f"gigaslide {command}: warning: {' '.join(str(message).split())}\n"

    return fmt


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that describe bad input rather than a bug: shown as one line, exit status 2."""
    from gigaslide.io.base import SlideReadError
    from gigaslide.models.weights import WeightsError
    from gigaslide.utils.errors import UserError

    errors: list[type[BaseException]] = [
        UserError,
        ValueError,
        KeyError,
        OSError,
        SlideReadError,
        WeightsError,
    ]
    try:
        import yaml

        errors.append(yaml.YAMLError)
    except ImportError:  # pragma: no cover - pyyaml is a dependency
        pass
    return tuple(errors)


if __name__ == "__main__":
    raise SystemExit(main())
