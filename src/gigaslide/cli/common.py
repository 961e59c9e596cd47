"""Pieces every subcommand shares: help with defaults, the split-protocol arguments, output folders.

- :class:`HelpFormatter` shows each option's default in ``--help`` (set on every subcommand by
  :func:`gigaslide.cli.main.build_parser`).
- :func:`add_split_arguments`: one argument group for the evaluation protocol (k-fold, Monte Carlo,
  CLAM split files, training budget), used by ``train`` and ``probe``.
- :func:`output_folder`: ``--out`` checked (a folder, writable) and locked for the life of the
  command, so that two runs never write into one folder (:mod:`gigaslide.utils.lock`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from gigaslide.utils.dist import DistInfo
from gigaslide.utils.errors import UserError

# the split protocol's defaults, shared by `train` (through TrainConfig) and `probe`
SPLIT_DEFAULTS: dict[str, Any] = {
    "folds": 10,
    "monte_carlo": None,
    "test_fraction": 0.2,
    "val_fraction": 0.1,
    "train_fraction": 1.0,
    "few_shot": None,
}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to options with a meaningful default that their help does not state."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or default is False
            or default == []
            or default is argparse.SUPPRESS
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)" if text else "(default: %(default)s)"


def add_split_arguments(
    p: argparse.ArgumentParser,
    defaults: Mapping[str, Any] | None = None,
    unset: bool = False,
    label: str = "slides",
) -> argparse._ArgumentGroup:
    """The evaluation-protocol options (k-fold, Monte Carlo, CLAM splits, training budget).

    Args:
        defaults: the protocol's defaults (``SPLIT_DEFAULTS`` keys; missing keys from there).
        unset: leave every option ``None`` when not given (a config file fills it) and only show
            ``defaults`` in the help.
        label: what the few-shot count counts.
    """
    shown = {**SPLIT_DEFAULTS, **(defaults or {})}

    def default(key: str) -> Any:
        return None if unset else shown[key]

    def note(key: str) -> str:
        return f" (default: {shown[key]})" if shown[key] is not None else ""

    g = p.add_argument_group("evaluation protocol")
    g.add_argument(
        "--folds", type=int, default=default("folds"), help="case-grouped stratified folds" + note("folds")
    )
    g.add_argument(
        "--monte-carlo",
        type=int,
        default=None,
        metavar="R",
        help="R random case-grouped stratified splits (Monte Carlo CV) instead of k folds",
    )
    g.add_argument(
        "--test-fraction",
        type=float,
        default=default("test_fraction"),
        help="fraction of cases tested per Monte Carlo split" + note("test_fraction"),
    )
    g.add_argument(
        "--val-fraction",
        type=float,
        default=default("val_fraction"),
        help="validation cases: fraction of the training cases (k-fold) or of all cases (Monte Carlo)"
        + note("val_fraction"),
    )
    g.add_argument(
        "--train-fraction",
        type=float,
        default=default("train_fraction"),
        help="fraction of each training fold kept, e.g. 0.25 for HIPT's data-efficiency runs"
        + note("train_fraction"),
    )
    g.add_argument(
        "--few-shot", type=int, default=None, metavar="N", help=f"N training {label} per class per fold"
    )
    g.add_argument(
        "--splits", type=Path, default=None, help="folder of CLAM/HIPT splits_<k>.csv files to use instead"
    )
    return g


def add_wait_argument(p: argparse.ArgumentParser) -> None:
    """``--wait``: queue behind another run that holds the same output folder instead of refusing."""
    p.add_argument(
        "--wait",
        action="store_true",
        help="if another run is writing into the same --out, wait for it to finish instead of refusing",
    )


def check_output_folder(path: str | os.PathLike[str], flag: str = "--out") -> Path:
    """``path`` as a folder that can be created or written; else a :class:`UserError` naming ``flag``."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p} is a file; {flag} must be a folder (choose another path)")
    for parent in p.parents:  # an existing ancestor that is a file: mkdir would fail with ENOTDIR
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: {parent} is a file, not a folder")
            break
    try:
        p.mkdir(parents=True, exist_ok=True)
    except PermissionError:
        raise UserError(
            f"{flag} {p}: permission denied creating the folder; choose a writable place"
        ) from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {p} is not writable (permission denied); choose a writable folder")
    return p


@contextlib.contextmanager
def output_folder(
    path: str | os.PathLike[str], wait: bool = False, flag: str = "--out", dist_info: DistInfo | None = None
) -> Iterator[Path]:
    """Check ``path`` (see :func:`check_output_folder`) and hold its lock for the ``with`` block."""
    from gigaslide.utils.lock import output_lock

    folder = check_output_folder(path, flag)
    with output_lock(folder, wait=wait, dist_info=dist_info):
        yield folder


def output_file(path: str | os.PathLike[str], default_name: str) -> Path:
    """An output FILE given as ``--out``: a folder (existing, or written with a trailing slash)
    receives ``default_name``; a missing parent folder is created."""
    text = os.fspath(path)
    p = Path(text)
    if p.is_dir() or text.endswith(("/", os.sep)):
        p = p / default_name
    if p.exists() and p.is_dir():
        raise UserError(f"--out {p} is a folder; give a file name")
    check_output_folder(p.parent, "--out's folder")
    return p
