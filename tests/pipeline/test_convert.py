"""Feature-folder conversion between gigaslide, CLAM and TRIDENT layouts."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from gigaslide.cli.main import main
from gigaslide.data.features_io import read_features, write_features
from gigaslide.pipeline.convert import ConvertError, convert_features
from gigaslide.preprocess.tiling_spec import TileSpec

SPEC = TileSpec.create(
    tile_size=224, target_mpp=0.5, slide_mpp=0.25, level_downsamples=[1.0, 4.0], level0_dims=(5000, 4000)
)


def _make_ours(root, n_slides=2, dtype=np.float32):
    rng = np.random.default_rng(0)
    data = {}
    for i in range(n_slides):
        n = 7 + i
        feats = rng.standard_normal((n, 6)).astype(dtype)
        coords = rng.integers(0, 4000, size=(n, 2)).astype(np.int64)
        attrs = {"encoder": "toy_enc", "embed_dim": 6, "random_init": True, "target_mpp": 0.5}
        write_features(root / "h5_files" / f"slide{i}.h5", feats, coords, attrs, SPEC.to_attrs())
        data[f"slide{i}"] = (feats, coords)
    return data


def _coords_attrs(path):
    with h5py.File(path) as f:
        return dict(f["coords"].attrs.items())


@pytest.mark.parametrize("via", ["clam", "trident"])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_round_trip_is_exact(tmp_path, via, dtype):
    data = _make_ours(tmp_path / "ours", dtype=dtype)
    mid = convert_features(tmp_path / "ours", tmp_path / via, via)
    assert not mid.failed and sorted(mid.written) == sorted(data)
    back = convert_features(tmp_path / via, tmp_path / "back", "gigaslide")
    assert not back.failed
    for sid, (feats, coords) in data.items():
        bag = read_features(tmp_path / "back" / "h5_files" / f"{sid}.h5")
        assert bag.features.dtype == dtype
        np.testing.assert_array_equal(bag.features, feats)
        np.testing.assert_array_equal(bag.coords, coords)
        assert bag.spec == SPEC and bag.attrs["encoder"] == "toy_enc"
        orig = _coords_attrs(tmp_path / "ours" / "h5_files" / f"{sid}.h5")
        got = _coords_attrs(tmp_path / "back" / "h5_files" / f"{sid}.h5")
        assert sorted(orig) == sorted(set(got) - {"name"}) and got["name"] == sid  # CLAM's StitchCoords
        for k in orig:
            np.testing.assert_array_equal(orig[k], got[k])
    assert (tmp_path / "back" / "manifest.csv").read_text().startswith("slide_id,status")


def test_clam_layout_has_h5_and_pt(tmp_path):
    data = _make_ours(tmp_path / "ours")
    convert_features(tmp_path / "ours", tmp_path / "clam", "clam")
    for sid, (feats, coords) in data.items():
        pt = torch.load(tmp_path / "clam" / "pt_files" / f"{sid}.pt", weights_only=True)
        np.testing.assert_array_equal(pt.numpy(), feats)
        with h5py.File(tmp_path / "clam" / "h5_files" / f"{sid}.h5") as f:  # CLAM's reading code
            np.testing.assert_array_equal(f["features"][:], feats)
            np.testing.assert_array_equal(f["coords"][:], coords)


def test_trident_layout_and_attrs(tmp_path):
    _make_ours(tmp_path / "ours")
    convert_features(tmp_path / "ours", tmp_path / "tri", "trident")
    path = tmp_path / "tri" / "features_toy_enc" / "slide0.h5"
    with h5py.File(path) as f:
        ca, fa = f["coords"].attrs, f["features"].attrs
        assert ca["patch_size"] == 224  # TRIDENT: tile size at the target magnification
        assert ca["patch_size_level0"] == 448
        assert ca["target_magnification"] == pytest.approx(20.0)
        assert ca["level0_magnification"] == pytest.approx(40.0)
        assert ca["overlap"] == 0
        assert fa["name"] == "slide0" and fa["encoder"] == "toy_enc"
    # a TRIDENT folder given by its parent (job dir) converts back
    out = convert_features(tmp_path / "tri", tmp_path / "back", "gigaslide", slide_ids={"slide1"})
    assert sorted(out.written) == ["slide1"]


def test_foreign_trident_file_without_spec(tmp_path):
    src = tmp_path / "job" / "features_uni_v1"
    src.mkdir(parents=True)
    feats = np.arange(12, dtype=np.float32).reshape(4, 3)
    coords = np.array([[0, 0], [512, 0], [0, 512], [512, 512]], dtype=np.int64)
    with h5py.File(src / "abc.h5", "w") as f:
        f["features"] = feats
        f["coords"] = coords
        f["coords"].attrs.update(
            {"patch_size": 256, "patch_size_level0": 512, "level0_magnification": 40.0, "overlap": 0}
        )
    out = convert_features(tmp_path / "job", tmp_path / "ours", "gigaslide")
    bag = read_features(out.written["abc"])
    np.testing.assert_array_equal(bag.features, feats)
    assert bag.attrs["encoder"] == "uni_v1"
    assert bag.spec is not None and bag.spec.tile_size == 256 and bag.spec.target_mpp == pytest.approx(0.5)


def test_bad_inputs(tmp_path):
    with pytest.raises(ConvertError, match="no features found"):
        convert_features(tmp_path, tmp_path / "o", "clam")
    (tmp_path / "pt_only" / "pt_files").mkdir(parents=True)
    with pytest.raises(ConvertError, match="no tile coordinates"):
        convert_features(tmp_path / "pt_only", tmp_path / "o", "gigaslide")
    with pytest.raises(ValueError, match="--to must be one of"):
        convert_features(tmp_path, tmp_path / "o", "zarr")


def test_cli_records_bad_file_and_exits_1(tmp_path, capsys):
    _make_ours(tmp_path / "ours")
    (tmp_path / "ours" / "h5_files" / "broken.h5").write_bytes(b"garbage")
    rc = main(["convert", str(tmp_path / "ours"), "--out", str(tmp_path / "clam"), "--to", "clam"])
    assert rc == 1
    out = capsys.readouterr().out  # the summary goes to stdout, as in every command
    assert "converted 2 slide(s)" in out and "FAILED broken" in out
    assert (tmp_path / "clam" / "pt_files" / "slide1.pt").exists()


def test_nd_files_copy_to_gigaslide_and_are_refused_for_clam_trident(tmp_path):
    rng = np.random.default_rng(3)
    feats = rng.standard_normal((3, 4, 6)).astype(np.float32)  # (M, T, D) region grids
    mask = rng.random((3, 4)) > 0.5
    coords = rng.integers(0, 4000, size=(3, 2))
    write_features(tmp_path / "ours" / "h5_files" / "r.h5", feats, coords, {"encoder": "toy"}, mask=mask)
    _make_ours(tmp_path / "ours", n_slides=1)  # plus an ordinary (N, D) file
    copy = convert_features(tmp_path / "ours", tmp_path / "copy", "gigaslide")
    assert not copy.failed
    bag = read_features(tmp_path / "copy" / "h5_files" / "r.h5")
    np.testing.assert_array_equal(bag.features, feats)
    np.testing.assert_array_equal(bag.mask, mask)
    assert list(bag.attrs["item_shape"]) == [4, 6]
    for to in ("clam", "trident"):
        s = convert_features(tmp_path / "ours", tmp_path / to, to)
        assert sorted(s.written) == ["slide0"] and sorted(s.failed) == ["r"]
        assert "features of shape (3, 4, 6)" in s.failed["r"] and "--to gigaslide" in s.failed["r"]


def test_foreign_files_get_the_other_tools_attributes(tmp_path):
    """TRIDENT features -> CLAM: patch_level/patch_size CLAM reads; CLAM features -> TRIDENT: patch_size_level0."""
    tri = tmp_path / "job" / "features_uni_v1"
    tri.mkdir(parents=True)
    feats = np.ones((2, 3), np.float32)
    with h5py.File(tri / "abc.h5", "w") as f:
        f["features"] = feats
        f["coords"] = np.array([[0, 0], [512, 0]], dtype=np.int64)
        f["coords"].attrs.update(
            {
                "patch_size": 256,
                "patch_size_level0": 512,
                "level0_magnification": 40,
                "target_magnification": 20,
            }
        )
    out = convert_features(tmp_path / "job", tmp_path / "clam", "clam")
    ca = _coords_attrs(out.written["abc"])
    assert (ca["patch_level"], ca["patch_size"], ca["name"]) == (0, 512, "abc")
    assert "target_magnification" not in ca
    clam = tmp_path / "clam_src" / "h5_files"
    clam.mkdir(parents=True)
    with h5py.File(clam / "s.h5", "w") as f:
        f["features"] = feats
        f["coords"] = np.array([[0, 0], [1024, 0]], dtype=np.int64)
        f["coords"].attrs.update({"patch_size": 256, "patch_level": 1, "downsample": [4.0, 4.0]})
    out = convert_features(tmp_path / "clam_src", tmp_path / "tri", "trident", encoder="r50")
    ta = _coords_attrs(out.written["s"])
    assert (ta["patch_size"], ta["patch_size_level0"], ta["name"]) == (256, 1024, "s")
