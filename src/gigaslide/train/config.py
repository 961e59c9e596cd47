"""`TrainConfig`: every knob of slide-level training, loadable from YAML and ``key=value`` overrides.

Precedence (lowest to highest): dataclass defaults < YAML file < explicit CLI flags < ``--set key=value``.
Defaults follow CLAM/HIPT: AdamW, lr 2e-4, weight decay 1e-5, bag batch size 1, 4 survival bins
from event-time quantiles of the training fold.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from gigaslide.utils.atomic import atomic_write_text

TASKS = ("classification", "survival")
SURVIVAL_LOSSES = ("nll", "cox", "nll+cox")
MONITORS = ("loss", "metric")


@dataclass
class TrainConfig:
    """Configuration of one cross-validated training run (see ``docs`` for each field's meaning)."""

    task: str = "classification"
    model: str = "abmil"
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # optimisation
    epochs: int = 20
    lr: float = 2e-4
    min_lr: float = 0.0
    weight_decay: float = 1e-5
    lr_schedule: str = "cosine"  # "cosine" or "constant"
    warmup_epochs: float = 1.0
    accum_steps: int = 1  # bags per optimizer step (bag batch size is 1)
    grad_clip: float | None = None
    aux_weight: float = 1.0  # weight of the model's auxiliary loss (CLAM instance clustering)
    # bag augmentation: at most this many random tiles per bag and epoch during training (None = all)
    max_tiles: int | None = None
    # model selection / early stopping on the validation fold
    monitor: str = "loss"  # "loss" (lower is better) or "metric" (val AUC / c-index, higher is better)
    early_stopping: bool = True
    patience: int = 10
    min_epochs: int = 5
    # survival
    survival_loss: str = "nll"  # "nll", "cox" or "nll+cox"
    n_bins: int = 4
    nll_alpha: float = 0.0
    nll_baseline_init: bool = True  # NLL: output bias starts at the training fold's baseline hazards
    cox_weight: float = 1.0
    # data / splits
    folds: int = 10
    monte_carlo: int | None = None  # R random splits (Monte Carlo CV) instead of k folds
    test_fraction: float = 0.2  # test cases per Monte Carlo split
    val_fraction: float = 0.1
    train_fraction: float = 1.0
    few_shot: int | None = None
    case_level: bool = False
    classes: list[str] | None = None
    cache: str = "memory"  # "memory", "lazy" or "mmap"
    # evaluation
    bootstrap: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ``ValueError`` naming the bad field and the accepted values."""
        checks = [
            (self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}"),
            (self.survival_loss in SURVIVAL_LOSSES, f"survival_loss must be one of {SURVIVAL_LOSSES}"),
            (self.monitor in MONITORS, f"monitor must be one of {MONITORS}, got {self.monitor!r}"),
            (self.lr_schedule in ("cosine", "constant"), "lr_schedule must be 'cosine' or 'constant'"),
            (self.cache in ("memory", "lazy", "mmap"), "cache must be 'memory', 'lazy' or 'mmap'"),
            (self.epochs >= 1, f"epochs must be >= 1, got {self.epochs}"),
            (self.accum_steps >= 1, f"accum_steps must be >= 1, got {self.accum_steps}"),
            (self.lr > 0, f"lr must be > 0, got {self.lr}"),
            (self.folds >= 1, f"folds must be >= 1, got {self.folds}"),
            (
                0.0 < self.train_fraction <= 1.0,
                f"train_fraction must be in (0, 1], got {self.train_fraction}",
            ),
            (0.0 <= self.val_fraction < 1.0, f"val_fraction must be in [0, 1), got {self.val_fraction}"),
            (self.monte_carlo is None or self.monte_carlo >= 1, "monte_carlo must be >= 1 or null"),
            (
                0.0 < self.test_fraction < 1.0 and self.test_fraction + self.val_fraction < 1.0,
                f"test_fraction must be in (0, 1) with test_fraction + val_fraction < 1, got "
                f"{self.test_fraction} + {self.val_fraction}",
            ),
            (self.n_bins >= 1, f"n_bins must be >= 1, got {self.n_bins}"),
            (self.max_tiles is None or self.max_tiles >= 1, "max_tiles must be >= 1 or null"),
            (self.few_shot is None or self.few_shot >= 1, "few_shot must be >= 1 or null"),
            (self.patience >= 1 and self.min_epochs >= 0, "patience must be >= 1 and min_epochs >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"invalid training config: {msg}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _field_types() -> dict[str, Any]:
    return typing.get_type_hints(TrainConfig)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    """Check/convert ``value`` to the annotated type of field ``name``."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if hint is float and isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if hint is bool and isinstance(value, bool):
        return value
    if hint is str and isinstance(value, (str, int, float)) and not isinstance(value, bool):
        return str(value)
    if origin is list and isinstance(value, (list, tuple)):
        return [str(v) for v in value]
    if origin is dict and isinstance(value, dict):
        return dict(value)
    raise ValueError(f"config key {name!r}: expected {hint}, got {value!r} ({type(value).__name__})")


def config_from_dict(
    data: dict[str, Any], base: TrainConfig | None = None, source: str = "config"
) -> TrainConfig:
    """Return ``base`` (or the defaults) updated with ``data``; unknown keys raise naming the valid ones."""
    hints = _field_types()
    unknown = sorted(set(data) - set(hints))
    if unknown:
        raise ValueError(f"{source}: unknown training config key(s) {unknown}; valid keys: {sorted(hints)}")
    merged = (base or TrainConfig()).to_dict()
    for key, value in data.items():
        merged[key] = _coerce(key, value, hints[key])
    return TrainConfig(**merged)


def load_config(path: str | os.PathLike[str], base: TrainConfig | None = None) -> TrainConfig:
    """Load a YAML mapping of config keys (a file written by :func:`save_config` loads back identically)."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read training config ({e})") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a training config must be a YAML mapping of key: value")
    data.pop("_meta", None)  # informational block written by save_config
    return config_from_dict(data, base=base, source=str(path))


def apply_overrides(cfg: TrainConfig, overrides: list[str] | None) -> TrainConfig:
    """Apply ``key=value`` strings; values are parsed as YAML (``lr=1e-3``, ``classes=[a,b]``, ``max_tiles=null``).

    ``model_kwargs.<name>=value`` sets one model keyword argument.
    """
    data: dict[str, Any] = {}
    kwargs = dict(cfg.model_kwargs)
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not of the form key=value (e.g. --set lr=1e-4)")
        key, raw = item.split("=", 1)
        key = key.strip()
        value = yaml.safe_load(raw) if raw.strip() else None
        if key.startswith("model_kwargs."):
            kwargs[key.split(".", 1)[1]] = value
        else:
            data[key] = value
    if kwargs != cfg.model_kwargs:
        data.setdefault("model_kwargs", kwargs)
    return config_from_dict(data, base=cfg, source="--set")


def save_config(cfg: TrainConfig, path: str | os.PathLike[str], meta: dict[str, Any] | None = None) -> Path:
    """Atomically write the config as YAML; ``meta`` (label map, versions) goes under ``_meta``."""
    data = cfg.to_dict()
    if meta:
        data["_meta"] = meta
    return atomic_write_text(path, yaml.safe_dump(data, sort_keys=False))


def replace(cfg: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of ``cfg`` with ``changes``."""
    return dataclasses.replace(cfg, **changes)


def describe_keys() -> str:
    """Every config key (for a ``--config`` YAML or ``--set key=value``) with its type and default."""
    hints = _field_types()
    rows = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        kind = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
        rows.append((f.name, kind, "null" if default is None else yaml.safe_dump(default).strip()))
    rows = [(k, t, d.removesuffix("\n...")) for k, t, d in rows]
    w0, w1 = max(len(r[0]) for r in rows), max(len(r[1]) for r in rows)
    lines = [f"{'key':<{w0}}  {'type':<{w1}}  default", *(f"{k:<{w0}}  {t:<{w1}}  {d}" for k, t, d in rows)]
    lines.append("set with --set KEY=VALUE (YAML values; model_kwargs.NAME=VALUE for one model argument)")
    return "\n".join(lines)
