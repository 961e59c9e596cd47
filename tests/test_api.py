"""The top-level lazy API resolves every advertised name to the object its module defines."""

from __future__ import annotations

import importlib

import pytest

import gigaslide


@pytest.mark.parametrize("name", sorted(gigaslide._LAZY))
def test_lazy_name_resolves_to_module_object(name: str) -> None:
    expected = getattr(importlib.import_module(gigaslide._LAZY[name]), name)
    assert getattr(gigaslide, name) is expected


def test_unknown_name_raises_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no_such_thing"):
        gigaslide.no_such_thing  # noqa: B018


def test_cli_lists_every_subcommand() -> None:
    from gigaslide.cli.main import SUBCOMMANDS, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(SUBCOMMANDS)


SUBPACKAGES = ["gigaslide.data", "gigaslide.models", "gigaslide.preprocess"]


@pytest.mark.parametrize(
    ("package", "name"),
    [(pkg, n) for pkg in SUBPACKAGES for n in sorted(importlib.import_module(pkg)._LAZY)],
)
def test_subpackage_lazy_exports(package: str, name: str) -> None:
    pkg = importlib.import_module(package)
    expected = getattr(importlib.import_module(pkg._LAZY[name]), name)
    assert getattr(pkg, name) is expected
    assert name in vars(pkg)  # cached on the package after the first access


@pytest.mark.parametrize("package", SUBPACKAGES)
def test_subpackage_unknown_name(package: str) -> None:
    with pytest.raises(AttributeError, match=f"module '{package}' has no attribute 'nope'"):
        importlib.import_module(package).nope  # noqa: B018
