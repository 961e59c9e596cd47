"""What a benchmark or a report ran on: CPU model, cores, torch build and threads, GPU.

Figures measured on one machine are quoted with this line beside them (``bench/*.py``,
``docs/benchmarks.md``) so that a reader can tell an idle workstation from a shared 2-core VM.
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else what :mod:`platform` reports."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def describe_machine() -> str:
    """One line: CPU model, logical cores, torch version and CPU threads, the GPU if any, load average."""
    desc = (
        f"{cpu_model()}, {os.cpu_count()} logical cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} CPU threads)"
    )
    desc += f", GPU {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else ", no GPU"
    if hasattr(os, "getloadavg"):
        desc += f", load average {os.getloadavg()[0]:.1f}"
    return desc
