"""One way to turn a ``--device`` value into a :class:`torch.device`, for every command and library call.

``"auto"`` picks ``cuda:<local_rank>`` when CUDA is available (the GPU of this torchrun process) and
the CPU otherwise; explicit CUDA requests are checked against the visible GPUs so that a typo or a
CPU-only machine fails with a message saying what to pass instead.
"""

from __future__ import annotations

import torch


def resolve_device(device: str | torch.device = "auto", local_rank: int | None = None) -> torch.device:
    """``"auto"`` -> ``cuda:<local_rank>`` when CUDA is available, else CPU; validates CUDA requests.

    Args:
        device: ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or a :class:`torch.device`.
        local_rank: this process's GPU under torchrun (used for ``"auto"`` and a bare ``"cuda"``).

    Raises:
        ValueError: CUDA requested but unavailable, or an index beyond the visible GPUs.
    """
    if isinstance(device, torch.device):
        dev = device
    elif device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank or 0)
        return torch.device("cpu")
    else:
        try:
            dev = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"invalid device {device!r} ({e}); use auto, cpu, cuda or cuda:<index>") from e
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r} requested but CUDA is not available; use --device cpu")
        if dev.index is None:
            dev = torch.device("cuda", local_rank or 0)
        if dev.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {dev} requested but only {torch.cuda.device_count()} GPU(s) are visible"
            )
    return dev
