"""The package's one-way layering: io -> preprocess -> data -> models -> (pipeline, train) -> (ssl, eval) -> experiments -> cli.

Every import between gigaslide subpackages (module level or inside functions) must point to a lower
layer, or stay inside its own subpackage. ``models`` in particular never imports ``io``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import gigaslide

PKG = Path(gigaslide.__file__).parent
RANK = {
    "utils": 0,
    "io": 1,
    "synth": 1,
    "preprocess": 2,
    "data": 3,
    "models": 4,
    "pipeline": 5,
    "train": 5,
    "ssl": 6,  # recipes run on train.engine and read tiling outputs through pipeline
    "eval": 6,
    "experiments": 7,
    "cli": 8,
}


def _imports(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found += [(node.lineno, n) for n in names if n.startswith("gigaslide.")]
    return found


def _layer_files() -> list[Path]:
    return sorted(p for p in PKG.rglob("*.py") if p.relative_to(PKG).parts[0] in RANK)


def test_every_subpackage_has_a_rank() -> None:
    subpackages = {p.name for p in PKG.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    assert subpackages <= set(RANK), subpackages - set(RANK)


@pytest.mark.parametrize("path", _layer_files(), ids=lambda p: str(p.relative_to(PKG)))
def test_imports_point_down_the_layers(path: Path) -> None:
    own = path.relative_to(PKG).parts[0]
    bad = []
    for line, name in _imports(path):
        target = name.split(".")[1]
        if target not in RANK or target == own:
            continue
        if RANK[target] >= RANK[own]:
            bad.append(f"line {line}: {name} ({own} may not import {target})")
    assert not bad, "\n".join(bad)
