"""Training checkpoints of the engine: atomic save, strict resume, RNG states.

One file, ``checkpoint.pth``, holds everything a run needs to continue exactly where it stopped::

    {<module name>: state_dict, ...,      e.g. "student", "teacher" (DINO's own layout) or "model"
     "optimizer": optimizer state,
     "epoch": int,                        the next epoch to run (DINO's convention)
     "engine": {"step", "micro", "scaler", "rng", "objective", "history"},
     "config": {"optim": {...}, "engine": {...}}}

Random-number states (Python, NumPy, torch CPU and CUDA) are stored as plain lists and tensors so
the file loads with ``torch.load(weights_only=True)``: no pickled code runs when a checkpoint is read.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gigaslide.utils.atomic import atomic_path

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(ValueError):
    """A training checkpoint that cannot be read or does not belong to this run."""


def rng_state() -> dict[str, Any]:
    """The current Python, NumPy and torch (CPU + every CUDA device) random states, as plain data."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [
            kind,
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(pos),
            int(has_gauss),
            float(cached),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_training_state(path: str | os.PathLike[str], payload: dict[str, Any]) -> Path:
    """Atomically write a training checkpoint (temporary file + rename): never half-written."""
    with atomic_path(path) as tmp:
        torch.save(payload, tmp)
    return Path(path)


def load_training_state(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_training_state` (tensors and plain data only)."""
    path = Path(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(
            f"{path}: cannot read the training checkpoint ({e}); delete it to start the run over"
        ) from e
    if not isinstance(ckpt, dict) or "engine" not in ckpt or "optimizer" not in ckpt:
        raise CheckpointError(
            f"{path}: not a gigaslide training checkpoint (no 'engine'/'optimizer' entries); "
            "point --out at a new folder"
        )
    return ckpt
