"""resolve_device: the one place that turns --device values into torch devices."""

from __future__ import annotations

import pytest
import torch

from gigaslide.utils.device import resolve_device


def test_cpu_auto_and_device_objects() -> None:
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")
    want = torch.device("cuda", 1) if torch.cuda.is_available() else torch.device("cpu")
    if torch.cuda.device_count() > 1 or not torch.cuda.is_available():
        assert resolve_device("auto", local_rank=1) == want


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a CPU-only machine")
def test_cuda_requests_fail_clearly_without_cuda() -> None:
    for name in ("cuda", "cuda:1", torch.device("cuda", 0)):
        with pytest.raises(ValueError, match="CUDA is not available; use --device cpu"):
            resolve_device(name)


def test_invalid_names_are_rejected_with_the_choices() -> None:
    with pytest.raises(ValueError, match=r"invalid device 'gpu0'.*auto, cpu, cuda or cuda:<index>"):
        resolve_device("gpu0")
