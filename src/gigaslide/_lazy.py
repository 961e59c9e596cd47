"""Lazy package exports: public names imported from their submodule on first access.

Packages list ``name -> defining module`` and set ``__getattr__ = lazy_getattr(__name__, exports)``,
so ``import gigaslide`` (and each subpackage) stays cheap while ``from gigaslide.data import
TileDataset`` still works.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any


def lazy_getattr(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` resolving ``exports`` lazily and caching them on the package."""

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
