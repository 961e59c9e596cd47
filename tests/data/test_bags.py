"""Bag dataset: per-slide / per-case bags, seeded tile subsampling, padded collation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.data.bags import BagDataset, collate_bags
from gigaslide.data.cohort import Cohort
from gigaslide.data.features_io import write_features


@pytest.fixture
def cohort(tmp_path: Path) -> Cohort:
    rows = []
    for i, (case, n) in enumerate([("A", 10), ("A", 6), ("B", 3)]):
        feats = np.full((n, 3), float(i), np.float32) + np.arange(n, dtype=np.float32)[:, None] / 100
        coords = np.stack([np.arange(n) * 100 + i, np.full(n, i)], axis=1)
        write_features(tmp_path / "h5_files" / f"s{i}.h5", feats, coords)
        rows.append({"slide_id": f"s{i}", "case_id": case, "label": case})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return Cohort(tmp_path / "labels.csv", tmp_path)


def test_slide_bag_matches_file(cohort: Cohort) -> None:
    ds = BagDataset(cohort, cohort.samples())
    bag = ds[1]
    np.testing.assert_array_equal(bag.features.numpy(), cohort.load("s1").features)
    np.testing.assert_array_equal(bag.coords.numpy(), cohort.load("s1").coords)
    assert bag.features.dtype == torch.float32 and bag.slide_index.tolist() == [0] * 6


def test_case_bag_concatenates_slides(cohort: Cohort) -> None:
    ds = BagDataset(cohort, cohort.samples(case_level=True))
    bag = ds[0]
    assert bag.sample.slide_ids == ("s0", "s1") and bag.features.shape == (16, 3)
    assert bag.slide_index.tolist() == [0] * 10 + [1] * 6
    assert bag.tile_index.tolist() == list(range(10)) + list(range(6))
    np.testing.assert_array_equal(bag.features[10:].numpy(), cohort.load("s1").features)


def test_subsampling_is_seeded_per_epoch(cohort: Cohort) -> None:
    samples = cohort.samples(case_level=True)
    ds = BagDataset(cohort, samples, max_tiles=5, train=True, seed=3)
    a = ds[0]
    assert a.features.shape == (5, 3)
    again = BagDataset(cohort, samples, max_tiles=5, train=True, seed=3)[0]
    assert torch.equal(a.features, again.features)
    # the kept rows are exactly the source rows named by slide_index/tile_index
    for f, s, t in zip(a.features, a.slide_index, a.tile_index):
        np.testing.assert_array_equal(f.numpy(), cohort.load(("s0", "s1")[int(s)]).features[int(t)])
    draws = set()
    for epoch in range(6):
        ds.set_epoch(epoch)
        draws.add(tuple(ds[0].tile_index.tolist() + ds[0].slide_index.tolist()))
    assert len(draws) > 1  # a new subset each epoch
    assert BagDataset(cohort, samples, max_tiles=5, train=False)[0].features.shape == (
        16,
        3,
    )  # eval: all tiles
    assert ds[1].features.shape == (3, 3)  # smaller bags untouched


def test_collate_pads_and_masks(cohort: Cohort) -> None:
    ds = BagDataset(cohort, cohort.samples())
    batch = collate_bags([ds[0], ds[2]])
    assert batch.x.shape == (2, 10, 3) and batch.coords.shape == (2, 10, 2)
    assert batch.mask.sum(dim=1).tolist() == [10, 3]
    assert torch.all(batch.x[1, 3:] == 0) and torch.equal(batch.x[1, :3], ds[2].features)
    with pytest.raises(ValueError):
        collate_bags([])
