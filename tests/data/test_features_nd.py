"""N-D feature files: (N, ...) features, (N, ..., 2) coords and (N, ...) masks, complete and chunked."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from gigaslide.data.feature_writer import ChunkedFeatureWriter, partial_path_for
from gigaslide.data.features_io import FeatureBag, read_features, require_2d, write_features

M, T, D = 7, 6, 5  # regions x tokens per region x token dim (HIPT: M x 256 x 384)


def _regions(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(M, T, D) token grids, (M, 2) region corners, (M, T) masks with a few padded tokens."""
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((M, T, D)).astype(np.float32)
    coords = np.stack([np.arange(M) * 4096, np.arange(M) * 3], axis=1).astype(np.int64)
    mask = rng.random((M, T)) > 0.3
    return feats, coords, mask


def test_region_grids_with_mask_round_trip(tmp_path):
    feats, coords, mask = _regions()
    path = write_features(
        tmp_path / "r.h5", feats, coords, {"encoder": "toy"}, {"patch_size": 4096}, mask=mask
    )
    bag = read_features(path)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    np.testing.assert_array_equal(bag.mask, mask)
    assert bag.mask.dtype == np.bool_ and bag.coords.dtype == np.int64
    assert bag.shape == (M, T, D) and bag.item_shape == (T, D) and bag.n_tiles == M
    assert bag.attrs["encoder"] == "toy" and list(bag.attrs["item_shape"]) == [T, D]
    with pytest.raises(ValueError, match="use `item_shape`"):
        _ = bag.dim
    with pytest.raises(ValueError, match=r"r\.h5: features have shape \(7, 6, 5\).*needs \(N, D\)"):
        require_2d(bag, path, "a MIL cohort")


def test_augmentation_bank_with_per_tile_coords(tmp_path):
    """Giga-SSL banks: (A, T, D) features with (A, T, 2) coordinates, no mask."""
    rng = np.random.default_rng(1)
    bank = rng.standard_normal((3, 4, D)).astype(np.float16)
    coords = rng.integers(0, 10_000, size=(3, 4, 2))
    bag = read_features(write_features(tmp_path / "bank.h5", bank, coords))
    assert bag.features.dtype == np.float16 and bag.mask is None
    np.testing.assert_array_equal(bag.features, bank)
    np.testing.assert_array_equal(bag.coords, coords)


def test_single_region_file_is_not_squeezed_but_clam_files_are(tmp_path):
    feats, coords, _ = _regions()
    one = read_features(write_features(tmp_path / "one.h5", feats[:1], coords[:1]))
    assert one.shape == (1, T, D)
    clam = tmp_path / "clam.h5"
    with h5py.File(clam, "w") as f:  # CLAM's (1, N, D) layout
        f["features"] = feats[0][None]
        f["coords"] = np.zeros((T, 2), np.int64)
    assert read_features(clam).shape == (T, D)


def test_2d_files_are_unchanged(tmp_path):
    feats = np.arange(12, dtype=np.float32).reshape(6, 2)
    bag = read_features(write_features(tmp_path / "t.h5", feats, np.zeros((6, 2))))
    assert bag.dim == 2 and bag.item_shape == (2,) and bag.mask is None
    assert "item_shape" not in bag.attrs and isinstance(bag, FeatureBag)
    with h5py.File(tmp_path / "t.h5") as f:
        assert set(f.keys()) == {"features", "coords"}


@pytest.mark.parametrize(
    ("coords", "mask", "match"),
    [
        (np.zeros((M, 3)), None, r"coords of shape \(7, 3\)"),
        (np.zeros((M, T + 1, 2)), None, r"coords of shape \(7, 7, 2\)"),
        (np.zeros((M, 2)), np.ones((M, T + 1), bool), r"mask of shape \(7, 7\)"),
        (np.zeros((M, 2)), np.ones((M, T), np.uint8), "mask must be boolean"),
    ],
)
def test_layout_errors_name_the_file(tmp_path, coords, mask, match):
    feats, _, _ = _regions()
    with pytest.raises(ValueError, match=match):
        write_features(tmp_path / "bad.h5", feats, coords, mask=mask)
    assert not (tmp_path / "bad.h5").exists()


def _writer(path, coords, chunk=2, mask_shape=(T,), fp="fp") -> ChunkedFeatureWriter:
    return ChunkedFeatureWriter(
        path, coords, (T, D), fp, chunk_size=chunk, features_attrs={"encoder": "toy"}, mask_shape=mask_shape
    )


def test_chunked_nd_writer_resumes_with_masks(tmp_path):
    feats, coords, mask = _regions()
    final = tmp_path / "h5_files" / "s.h5"
    with pytest.raises(KeyboardInterrupt), _writer(final, coords) as w:
        assert w.open() == 0
        w.write(feats[:3], mask=mask[:3])  # one chunk of 2 committed, 1 row buffered (lost)
        w.write(feats[3:5], mask=mask[3:5])  # second chunk committed
        raise KeyboardInterrupt
    assert partial_path_for(final).exists() and not final.exists()
    with _writer(final, coords, chunk=3) as w:
        start = w.open()
        assert start == 4
        w.write(feats[start:], mask=mask[start:])
        w.finalize()
    bag = read_features(final)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.mask, mask)
    assert list(bag.attrs["item_shape"]) == [T, D] and bag.attrs["fingerprint"] == "fp"


def test_chunked_nd_writer_discards_partial_of_another_layout(tmp_path, caplog):
    feats, coords, mask = _regions()
    final = tmp_path / "s.h5"
    with _writer(final, coords, mask_shape=None) as w:  # a partial without mask
        w.open()
        w.write(feats[:2])
    with _writer(final, coords) as w:
        assert w.open() == 0  # same fingerprint, but the mask layout differs: start over
        w.write(feats, mask=mask)
        w.finalize()
    assert "mask dataset" in caplog.text
    np.testing.assert_array_equal(read_features(final).mask, mask)


def test_chunked_nd_writer_errors(tmp_path):
    feats, coords, mask = _regions()
    with _writer(tmp_path / "s.h5", coords) as w:
        w.open()
        with pytest.raises(ValueError, match=r"expected a \(B, 6, 5\) batch"):
            w.write(feats[:, :2], mask=mask[:, :2])
        with pytest.raises(ValueError, match="pass mask= with every batch"):
            w.write(feats[:1])
        with pytest.raises(ValueError, match=r"mask must be bool of shape \(1, 6\)"):
            w.write(feats[:1], mask=mask[:1, :3])
        with pytest.raises(ValueError, match="`dim` is for"):
            _ = w.dim
    with pytest.raises(ValueError, match=r"mask of shape \(7, 9\)"):
        _writer(tmp_path / "t.h5", coords, mask_shape=(9,))
    with _writer(tmp_path / "u.h5", coords, mask_shape=None) as w:
        w.open()
        with pytest.raises(ValueError, match="without mask_shape"):
            w.write(feats[:1], mask=mask[:1])


def test_cohort_refuses_mixed_item_shapes(tmp_path):
    import pandas as pd

    from gigaslide.data.cohort import Cohort, CohortError

    feats, coords, _ = _regions()
    write_features(tmp_path / "h5_files" / "a.h5", feats, coords)
    write_features(tmp_path / "h5_files" / "b.h5", feats[:, 0], coords)  # (M, D) tile features
    pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["1", "2"], "label": ["x", "y"]}).to_csv(
        tmp_path / "labels.csv", index=False
    )
    with pytest.raises(CohortError, match=r"disagree on the dimension: dim 6x5: .*a; dim 5: .*b"):
        Cohort(tmp_path / "labels.csv", tmp_path)
