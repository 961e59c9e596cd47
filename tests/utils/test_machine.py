from __future__ import annotations

import os

import torch

from gigaslide.utils.machine import cpu_model, describe_machine


def test_describe_machine_names_cpu_cores_torch_and_gpu() -> None:
    line = describe_machine()
    assert line.startswith(cpu_model())
    assert f"{os.cpu_count()} logical cores" in line
    assert f"torch {torch.__version__} ({torch.get_num_threads()} CPU threads)" in line
    assert ("GPU " in line) if torch.cuda.is_available() else (", no GPU" in line)
    assert cpu_model().strip() and "\n" not in line
