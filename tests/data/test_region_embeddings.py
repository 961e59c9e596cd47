"""Slide embeddings from HIPT region folders: mean ViT_4096 region tokens or mean in-slide ViT_256 tokens
(HIPT's KNN evaluation), and `gigaslide probe` on such a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from gigaslide.cli.main import main
from gigaslide.data.embeddings import load_slide_embeddings
from gigaslide.data.region_features import write_region_features

ATTRS = {"encoder": "hipt_vit256", "weights": "w.pth", "weights_sha256": "ab" * 32, "embed_dim": 384}


def region_folder(root: Path, n: int = 24, vit4k: bool = True, seed: int = 0) -> tuple[Path, Path]:
    """``n`` slides of 2-3 regions of 4 patches (the last patch of each region is padding)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        label = i % 2
        m = 2 + i % 2
        feats = rng.normal(size=(m, 4, 6)).astype(np.float32)
        feats[:, :3, 0] += 4.0 * label  # the class shows in real patches only
        feats[:, 3] = 100.0  # padding: must never enter a mean
        mask = np.array([[True, True, True, False]] * m)
        region = rng.normal(size=(m, 5)).astype(np.float32)
        region[:, 1] += 4.0 * label
        write_region_features(
            root / "h5_files" / f"s{i:02d}.h5",
            feats,
            mask,
            np.zeros((m, 2)),
            region if vit4k else None,
            ATTRS,
        )
        rows.append({"slide_id": f"s{i:02d}", "case_id": f"c{i:02d}", "label": ["A", "B"][label]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root, root / "labels.csv"


def test_region_folder_pools_vit4k_tokens_or_in_slide_patches(tmp_path: Path) -> None:
    root, _ = region_folder(tmp_path / "r", n=4)
    from gigaslide.data.region_features import read_region_features

    rf = read_region_features(root / "h5_files" / "s01.h5")
    auto = load_slide_embeddings(root)
    assert auto.vectors.shape == (4, 5) and auto.attrs["region_level"] == "vit4k"
    np.testing.assert_allclose(auto.vectors[1], rf.region_features.astype(np.float64).mean(0), rtol=1e-12)
    patches = load_slide_embeddings(root, region_level="vit256")
    assert patches.vectors.shape == (4, 6) and patches.attrs["region_level"] == "vit256"
    np.testing.assert_allclose(
        patches.vectors[1], rf.features[:, :3].reshape(-1, 6).astype(np.float64).mean(0), rtol=1e-12
    )
    assert patches.vectors.max() < 50  # the padding's value 100 never entered


def test_region_level_vit4k_without_region_tokens_names_file_and_fix(tmp_path: Path) -> None:
    root, _ = region_folder(tmp_path / "r", n=2, vit4k=False)
    assert load_slide_embeddings(root).attrs["region_level"] == "vit256"  # auto falls to ViT_256 tokens
    with pytest.warns(UserWarning, match="unreadable"), pytest.raises(ValueError, match="none of the 2"):
        load_slide_embeddings(root, region_level="vit4k")
    from gigaslide.data.embeddings import _region_mean

    with pytest.raises(ValueError, match=r"s00\.h5: no ViT_4096 region tokens.*--vit4k-weights"):
        _region_mean(root / "h5_files" / "s00.h5", "vit4k")
    with pytest.raises(ValueError, match="region_level must be one of"):
        load_slide_embeddings(root, region_level="cls")


def test_probe_cli_knn_on_region_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root, labels = region_folder(tmp_path / "r", n=24)
    out = tmp_path / "knn"
    rc = main(["probe", "--embeddings", str(root), "--labels", str(labels), "--method", "knn",
               "--folds", "3", "--k", "3", "--region-level", "vit256", "--out", str(out)])  # fmt: skip
    assert rc == 0
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["n_predictions"] == 24 and res["features"]["encoder"] == "hipt_vit256"
    assert res["metrics"]["auc"]["mean"] > 0.7  # the class lives in the real patches' tokens
    assert len(pd.read_csv(out / "predictions.csv")) == 24
    assert "knn" in capsys.readouterr().out.lower()
