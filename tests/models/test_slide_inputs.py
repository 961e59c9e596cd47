"""slide_inputs: one function serves every input kind; needs_coords comes from the registry only."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from gigaslide.data.bags import BagBatch, BagDataset, collate_bags
from gigaslide.data.cohort import Cohort
from gigaslide.data.features_io import write_features
from gigaslide.models.slide import (
    INPUT_KINDS,
    SlideModelInfo,
    create_slide_model,
    get_slide_model_info,
    list_slide_models,
    register_slide_model,
    slide_inputs,
)


class Recorder(nn.Module):
    """A stand-in slide model of a given input kind that records what it is called with."""

    def __init__(self, kind: str, accepts_coords: bool = False) -> None:
        super().__init__()
        self.slide_model_info = SlideModelInfo(
            name=f"toy_{kind}", factory=Recorder, description="", paper="", produces_attention=False,
            accepts_coords=accepts_coords or kind == "features_coords", input_kind=kind,
        )  # fmt: skip


def _batch(x: torch.Tensor, coords: bool = True, item_mask: torch.Tensor | None = None) -> BagBatch:
    b, n = x.shape[:2]
    c = torch.arange(b * n * 2).reshape(b, n, 2) if coords else None
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[-1, -1] = False  # one padded item
    return BagBatch(x=x, coords=c, mask=mask, samples=[], bags=[], item_mask=item_mask)


def test_needs_coords_is_derived_from_input_kind_only() -> None:
    for name in list_slide_models():
        info = get_slide_model_info(name)
        assert info.input_kind in INPUT_KINDS and info.needs_coords == (info.input_kind == "features_coords")
    assert Recorder("features_coords").slide_model_info.accepts_coords
    with pytest.raises(ValueError, match="input_kind must be one of"):
        register_slide_model(
            "toy_bad", description="d", paper="p", produces_attention=False, input_kind="pixels"
        )


def test_features_models_get_coords_only_when_they_accept_them() -> None:
    batch = _batch(torch.randn(2, 5, 8))
    kw = slide_inputs(Recorder("features"), batch, labels=torch.tensor([0, 1]))
    assert kw["x"] is batch.x and kw["mask"] is batch.mask and kw["coords"] is None
    assert kw["labels"].tolist() == [0, 1]
    assert slide_inputs(Recorder("features", accepts_coords=True), batch)["coords"] is batch.coords
    model = create_slide_model("abmil", 8, 2, hidden_dims=(8, 4)).eval()
    with torch.no_grad():
        torch.testing.assert_close(
            model(**slide_inputs(model, batch)).logits, model(batch.x, mask=batch.mask).logits
        )
    with pytest.raises(ValueError, match=r"needs tile coordinates \(B, N, 2\).*no `coords` dataset"):
        slide_inputs(Recorder("features_coords"), _batch(torch.randn(2, 5, 8), coords=False))
    with pytest.raises(ValueError, match=r"takes tile features \(B, N, D\).*shape \(2, 5, 3, 8\)"):
        slide_inputs(Recorder("features"), _batch(torch.randn(2, 5, 3, 8)))


def test_region_grids_combine_region_and_token_masks() -> None:
    tokens = torch.rand(2, 3, 4) > 0.3  # (B, M, T)
    batch = _batch(torch.randn(2, 3, 4, 8), item_mask=tokens)
    kw = slide_inputs(Recorder("region_grids"), batch)
    assert kw["mask"].shape == (2, 3, 4) and kw["coords"] is None
    torch.testing.assert_close(kw["mask"], batch.mask[..., None] & tokens)
    no_tokens = slide_inputs(Recorder("region_grids"), _batch(torch.randn(2, 3, 4, 8)))["mask"]
    torch.testing.assert_close(no_tokens, batch.mask[..., None].expand(2, 3, 4))
    with pytest.raises(ValueError, match=r"region token grids \(B, M, T, D\).*token grid"):
        slide_inputs(Recorder("region_grids"), _batch(torch.randn(2, 3, 8)))


def test_images_pass_pixels_and_token_mask() -> None:
    tok = torch.ones(2, 4, 4, dtype=torch.bool)
    batch = BagBatch(x=torch.randn(2, 3, 64, 64), coords=None, mask=None, samples=[], bags=[], item_mask=tok)
    kw = slide_inputs(Recorder("image"), batch)
    assert kw["x"] is batch.x and kw["mask"] is tok and kw["coords"] is None
    with pytest.raises(ValueError, match=r"images \(B, 3, H, W\)"):
        slide_inputs(Recorder("image"), _batch(torch.randn(2, 5, 8)))


def test_region_grid_cohort_flows_to_a_region_model(tmp_path) -> None:
    """N-D feature files (M, T, D) + (M, T) masks -> Cohort -> bags -> slide_inputs (B, M, T, D)."""
    rng = np.random.default_rng(0)
    rows, masks = [], {}
    for i, m in enumerate((3, 5)):
        feats = rng.standard_normal((m, 4, 6)).astype(np.float32)
        masks[f"s{i}"] = rng.random((m, 4)) > 0.4
        write_features(tmp_path / "h5_files" / f"s{i}.h5", feats, np.zeros((m, 2)), mask=masks[f"s{i}"])
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "label": "ab"[i]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    cohort = Cohort(tmp_path / "labels.csv", tmp_path)
    assert cohort.item_shape == (4, 6) and cohort.dim == 6
    ds = BagDataset(cohort, cohort.samples())
    batch = collate_bags([ds[0], ds[1]])
    assert batch.x.shape == (2, 5, 4, 6) and batch.item_mask.shape == (2, 5, 4)
    kw = slide_inputs(Recorder("region_grids"), batch)
    want = np.zeros((2, 5, 4), bool)
    want[0, :3], want[1] = masks["s0"], masks["s1"]
    np.testing.assert_array_equal(kw["mask"].numpy(), want)


def test_region_cohort_trains_through_the_harness_with_an_embedding_only_hipt(tmp_path) -> None:
    """A registered region_grids model (hipt_ap) served by predict() from N-D files, n_classes=0 and 2."""
    from gigaslide.train.mil import predict

    rng = np.random.default_rng(1)
    rows = []
    for i, m in enumerate((2, 3, 4)):
        write_features(tmp_path / "h5_files" / f"s{i}.h5", rng.standard_normal((m, 16, 6)).astype(np.float32),
                       np.arange(m * 2).reshape(m, 2) * 4096, mask=rng.random((m, 16)) > 0.2)  # fmt: skip
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i}", "label": "ab"[i % 2]})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    cohort = Cohort(tmp_path / "labels.csv", tmp_path)
    bags = BagDataset(cohort, cohort.samples())
    for n_classes in (0, 2):
        torch.manual_seed(0)
        model = create_slide_model("hipt_ap", cohort.dim, n_classes, hidden_dim=8, dropout=0.0)
        pred = predict(model, bags, "cpu")
        assert pred.logits.shape == (3, n_classes) and pred.embeddings.shape == (3, 8)
        assert np.isfinite(pred.embeddings).all()
        assert {k: v["scores"].shape for k, v in pred.attention.items()} == {
            "s0": (2,),
            "s1": (3,),
            "s2": (4,),
        }
        with torch.no_grad():  # one bag alone equals its row of the harness's predictions
            single = model(**slide_inputs(model, collate_bags([bags[1]])))
        np.testing.assert_allclose(pred.embeddings[1], single.embedding[0].numpy(), rtol=1e-5, atol=1e-6)
