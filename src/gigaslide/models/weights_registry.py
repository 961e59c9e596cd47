"""Offline weights registry: a small YAML file mapping encoder names to local weight files.

Users set the paths once, e.g. in ``~/.config/gigaslide/weights.yaml``::

    hipt_vit256: /data/weights/vit256_small_dino.pth
    resnet50_trunc: /data/weights/resnet50-11ad3fa6.pth
    "timm:vit_large_patch16_224": /data/weights/uni        # a folder with config.json

The file location can be changed with the environment variable ``GIGASLIDE_WEIGHTS``.
Relative paths are resolved against the YAML file's folder; ``~`` and ``$VARS`` are expanded.
"""

from __future__ import annotations

import os
from pathlib import Path

import yaml

from gigaslide.models.weights import WeightsError

ENV_VAR = "GIGASLIDE_WEIGHTS"
DEFAULT_PATH = Path("~/.config/gigaslide/weights.yaml")


class WeightsRegistryError(WeightsError):
    """The weights registry YAML is unreadable, lacks an entry, or names a missing file."""


def registry_path() -> Path:
    """Location of the registry YAML: ``$GIGASLIDE_WEIGHTS`` or ``~/.config/gigaslide/weights.yaml``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else DEFAULT_PATH.expanduser()


def read_registry(path: str | os.PathLike[str] | None = None) -> dict[str, Path]:
    """All entries of the registry as ``{encoder name: path}``; ``{}`` when the file does not exist."""
    yml = Path(path).expanduser() if path is not None else registry_path()
    if not yml.is_file():
        return {}
    try:
        data = yaml.safe_load(yml.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as e:
        raise WeightsRegistryError(f"cannot parse the weights registry {yml}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise WeightsRegistryError(
            f"weights registry {yml} must be a mapping 'encoder_name: /path/to/weights', got {type(data).__name__}"
        )
    out: dict[str, Path] = {}
    for name, value in data.items():
        if not isinstance(value, str) or not value.strip():
            raise WeightsRegistryError(
                f"weights registry {yml}: entry {name!r} must be a path string, got {value!r}"
            )
        p = Path(os.path.expandvars(value.strip())).expanduser()
        out[str(name)] = p if p.is_absolute() else (yml.parent / p)
    return out


def lookup_weights(
    name: str, required: bool = False, path: str | os.PathLike[str] | None = None
) -> Path | None:
    """Weights path registered for encoder ``name``.

    Returns ``None`` when there is no entry (or no registry file) unless ``required``, in which case
    a :class:`WeightsRegistryError` names the YAML file and the entry to add. An entry pointing to a
    file that does not exist always raises.
    """
    yml = Path(path).expanduser() if path is not None else registry_path()
    entries = read_registry(yml)
    if name not in entries:
        if required:
            where = "does not exist" if not yml.is_file() else "has no such entry"
            raise WeightsRegistryError(
                f"no weights registered for encoder {name!r}: the registry {yml} {where}. "
                f"Add a line '{name}: /path/to/weights' to it (or set ${ENV_VAR} to another YAML)."
            )
        return None
    target = entries[name]
    if not target.exists():
        raise WeightsRegistryError(
            f"weights registry {yml}: entry {name!r} points to {target}, which does not exist; "
            "fix the path in the YAML file"
        )
    return target
