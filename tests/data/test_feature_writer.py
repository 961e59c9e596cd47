"""Chunked, resumable feature writer: commits, resume, fingerprint mismatch, atomic finish."""

from __future__ import annotations

import logging

import h5py
import numpy as np
import pytest

from gigaslide.data.feature_writer import (
    ROWS_DONE_ATTR,
    ChunkedFeatureWriter,
    array_sha256,
    make_fingerprint,
    partial_path_for,
    stored_fingerprint,
)
from gigaslide.data.features_io import read_features

N, D = 23, 5


def _data(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((N, D)).astype(np.float32)
    coords = np.stack([np.arange(N) * 256, np.arange(N) * 7], axis=1).astype(np.int64)
    return feats, coords


def _writer(path, coords, fp="fp-a", chunk=4, dtype=np.float32) -> ChunkedFeatureWriter:
    return ChunkedFeatureWriter(
        path, coords, D, fp, chunk_size=chunk, dtype=dtype,
        features_attrs={"encoder": "toy", "embed_dim": D}, coords_attrs={"patch_size": 256},
    )  # fmt: skip


def test_complete_write_roundtrips_through_read_features(tmp_path):
    feats, coords = _data()
    final = tmp_path / "h5_files" / "s1.h5"
    with _writer(final, coords) as w:
        assert w.open() == 0
        for i in range(0, N, 3):  # batches not aligned with chunks
            w.write(feats[i : i + 3])
        assert w.rows_done == 20  # 5 full chunks of 4 committed, 3 rows buffered
        w.finalize()
    assert final.exists() and not partial_path_for(final).exists()
    bag = read_features(final)
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.coords, coords)
    assert bag.attrs["encoder"] == "toy" and bag.attrs["fingerprint"] == "fp-a"
    with h5py.File(final) as f:
        assert f["coords"].attrs["patch_size"] == 256
        assert f["features"].dtype == np.float32
    assert stored_fingerprint(final) == "fp-a"


def test_interrupt_keeps_complete_chunks_and_resume_finishes_identically(tmp_path):
    feats, coords = _data()
    final = tmp_path / "s1.h5"
    with pytest.raises(KeyboardInterrupt), _writer(final, coords) as w:
        w.open()
        w.write(feats[:10])  # 2 chunks committed, 2 rows buffered
        raise KeyboardInterrupt
    part = partial_path_for(final)
    assert part.name == ".s1.partial.h5" and part.exists() and not final.exists()
    with h5py.File(part) as f:
        assert int(f.attrs[ROWS_DONE_ATTR]) == 8
    with _writer(final, coords, chunk=6) as w:  # chunk size may change between runs
        start = w.open()
        assert start == 8 and w.resumed_from == 8
        w.write(feats[start:])
        w.finalize()
    np.testing.assert_array_equal(read_features(final).features, feats)


def test_fingerprint_mismatch_discards_partial_with_warning(tmp_path, caplog):
    feats, coords = _data()
    final = tmp_path / "s1.h5"
    with _writer(final, coords, fp="old") as w:
        w.open()
        w.write(feats[:8])
    with caplog.at_level(logging.WARNING), _writer(final, coords, fp="new") as w:
        assert w.open() == 0
        w.write(feats)
        w.finalize()
    assert "fingerprint mismatch" in caplog.text
    assert stored_fingerprint(final) == "new"
    np.testing.assert_array_equal(read_features(final).features, feats)


def test_corrupt_partial_is_discarded(tmp_path, caplog):
    feats, coords = _data()
    final = tmp_path / "s1.h5"
    partial_path_for(final).write_bytes(b"not an hdf5 file")
    with caplog.at_level(logging.WARNING), _writer(final, coords) as w:
        assert w.open() == 0
        w.write(feats)
        w.finalize()
    assert "unreadable" in caplog.text


def test_float16_storage_and_empty_slide(tmp_path):
    feats, coords = _data()
    final = tmp_path / "half.h5"
    with _writer(final, coords, dtype=np.float16) as w:
        w.open()
        w.write(feats)
        w.finalize()
    got = read_features(final).features
    assert got.dtype == np.float16
    np.testing.assert_array_equal(got, feats.astype(np.float16))
    empty = tmp_path / "empty.h5"
    with _writer(empty, np.zeros((0, 2), np.int64)) as w:
        assert w.open() == 0
        w.finalize()
    assert read_features(empty).features.shape == (0, D)


def test_errors_name_the_problem(tmp_path):
    feats, coords = _data()
    final = tmp_path / "s.h5"
    with _writer(final, coords) as w:
        w.open()
        with pytest.raises(ValueError, match=r"\(B, 5\)"):
            w.write(feats[:, :3])
        w.write(feats[:20])
        with pytest.raises(ValueError, match="24 rows for 23 coordinates"):
            w.write(feats[:4])
    with _writer(final, coords) as w:
        w.open()
        with pytest.raises(RuntimeError, match="only 20 of 23"):
            w.finalize()
    assert not final.exists()
    with pytest.raises(ValueError, match="float32 or float16"):
        _writer(final, coords, dtype=np.float64)


def test_fingerprint_helpers_are_stable_and_sensitive():
    a = np.arange(6, dtype=np.int64).reshape(3, 2)
    assert array_sha256(a) == array_sha256(a.copy())
    assert array_sha256(a) != array_sha256(a.astype(np.int32))
    assert make_fingerprint(encoder="x", precision="fp32") == make_fingerprint(precision="fp32", encoder="x")
    assert make_fingerprint(encoder="x", precision="fp32") != make_fingerprint(encoder="x", precision="fp16")
