"""Fixtures for the io tests: a synthetic tiled JPEG pyramid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from io_synthetic import tissue_like, write_pyramid


@pytest.fixture(scope="session")
def synthetic_image() -> np.ndarray:
    return tissue_like(1000, 1300)


@pytest.fixture(scope="session")
def pyramid_tiff(tmp_path_factory: pytest.TempPathFactory, synthetic_image: np.ndarray) -> Path:
    """3-level JPEG (YCbCr-coded) tiled pyramid, 1300x1000 px at 0.5 um/px."""
    return write_pyramid(tmp_path_factory.mktemp("pyr") / "pyramid.tiff", synthetic_image)
