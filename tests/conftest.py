"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real public test slides in ../shared/data; skips the test when the folder is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not found at {SHARED_DATA}")
    return SHARED_DATA


def write_feature_cohort(
    root: Path,
    n_cases: int = 18,
    *,
    task: str = "classification",
    dim: int = 8,
    two_slides_every: int = 3,
    tiles: tuple[int, int] = (8, 16),
    n_signal: int = 3,
    shift: float = 3.0,
    class_names: tuple[str, str] = ("benign", "tumor"),
    seed: int = 1,
) -> Path:
    """A synthetic labelled feature cohort: ``root/h5_files/<slide>.h5`` + ``root/labels.csv``.

    Case ``c`` has two slides when ``c % two_slides_every == 0`` (else one), each with
    ``tiles`` N(0, 1) tiles of ``dim`` features at level-0 corners ``(i * 512, j * 512)`` and a
    256 px / 0.5 um/px tile spec. Classification: label ``c % 2``; the first ``n_signal`` tiles of
    positive slides are shifted by ``shift``. Survival: risk group ``g = c % 3`` shifts them by
    ``shift * g``; log-time ``-g + N(0, 0.3^2)``, event unless ``c % 4 == 0``. Returns the labels CSV.
    """
    import numpy as np
    import pandas as pd

    from gigaslide.data.features_io import write_features
    from gigaslide.preprocess.tiling_spec import TileSpec

    rng = np.random.default_rng(seed)
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.25, level_downsamples=[1.0], level0_dims=(8192, 8192)
    )
    rows = []
    for c in range(n_cases):
        label, group = c % 2, c % 3
        for j in range(2 if c % two_slides_every == 0 else 1):
            n = int(rng.integers(*tiles))
            f = rng.normal(size=(n, dim)).astype(np.float32)
            f[:n_signal] += shift * (label if task == "classification" else group)
            coords = np.stack([np.arange(n) * 512, np.full(n, j * 512)], axis=1)
            sid = f"c{c:02d}_s{j}"
            write_features(root / "h5_files" / f"{sid}.h5", f, coords, coords_attrs=spec.to_attrs())
            row = {"slide_id": sid, "case_id": f"c{c:02d}"}
            if task == "classification":
                row["label"] = class_names[label]
            else:
                row.update(time=float(np.exp(-group + 0.3 * rng.normal())), event=int(c % 4 != 0))
            rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "labels.csv"


@pytest.fixture(scope="session")
def feature_cohort():
    """:func:`write_feature_cohort`, the synthetic feature cohort builder shared by the training tests."""
    return write_feature_cohort
