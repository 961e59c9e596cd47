"""A bank's identity view (`gigassl bank --identity-view`): it is `embed`'s output, and `encode` reads it."""

from __future__ import annotations

import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "pipeline"))
from embed_synthetic import make_tiling_dir, tiny_encoder

from gigaslide.cli.main import main
from gigaslide.data.gigassl_bank import GigaSSLBank
from gigaslide.pipeline.embed_job import run_embedding
from gigaslide.pipeline.gigassl_bank import build_gigassl_bank
from gigaslide.ssl.gigassl_encode import encode_gigassl
from gigaslide.ssl.simclr import GigaSSLConfig, save_untrained_checkpoint

torch.set_num_threads(1)
KW = {"n_aug": 2, "n_tiles": 8, "batch_size": 16, "num_workers": 1, "device": "cpu", "progress": False}
TINY = GigaSSLConfig(aggregator_kwargs={"width": 16}, proj_dim=8, n_tiles=5)
N_TILES = {"a": 48, "b": 16}  # 8 x 6 and 4 x 4 tissue tiles


@pytest.fixture(scope="module")
def tiling(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiling_dir(tmp_path_factory.mktemp("tiling"), {"a": (1024, 768), "b": (512, 512)})


@pytest.fixture(scope="module")
def encoder() -> torch.nn.Module:
    return tiny_encoder()


def _encode(source: Path, ckpt: Path) -> tuple[np.ndarray, list[str]]:
    res = encode_gigassl(source, ckpt, None, n_views=4, device="cpu", seed=3, progress=False)
    assert not res.failed
    return res.embeddings, res.slide_ids


def test_identity_view_is_embed_and_encoding_a_bank_equals_encoding_embed(
    tiling: Path, encoder: torch.nn.Module, tmp_path: Path
) -> None:
    bank_dir, feats_dir = tmp_path / "bank", tmp_path / "feats"
    ckpt = save_untrained_checkpoint(256, tmp_path / "u.pth", TINY)
    # a bank built without the identity view is refused, naming the file and the fix
    first = build_gigassl_bank(tiling, encoder, bank_dir, **KW)
    assert not first.failed and first.tiles == 2 * 2 * 8
    with pytest.raises(
        ValueError, match=r"a\.h5: the bank has no non-augmented \(identity\) view.*--identity-view"
    ):
        encode_gigassl(bank_dir, ckpt, None, n_views=2, device="cpu", progress=False)
    before = {s: (bank_dir / "h5_files" / f"{s}.h5").stat().st_mtime_ns for s in N_TILES}
    # a rerun with --identity-view adds it: every tissue tile once, the augmented bank untouched
    second = build_gigassl_bank(tiling, encoder, bank_dir, identity_view=True, **KW)
    assert not second.failed and second.tiles == sum(N_TILES.values())
    assert before == {s: (bank_dir / "h5_files" / f"{s}.h5").stat().st_mtime_ns for s in N_TILES}
    assert build_gigassl_bank(tiling, encoder, bank_dir, identity_view=True, **KW).tiles == 0  # all done
    embedded = run_embedding(tiling, encoder, feats_dir, device="cpu", progress=False)
    assert not embedded.failed
    bank = GigaSSLBank(bank_dir)
    for i, s in enumerate(bank.slides):
        path = bank.identity_file(i)
        assert path == bank_dir / "identity" / "h5_files" / f"{s.slide_id}.h5"
        with h5py.File(path) as f, h5py.File(feats_dir / "h5_files" / f"{s.slide_id}.h5") as g:
            assert f["features"].shape == (N_TILES[s.slide_id], 256)
            np.testing.assert_allclose(f["features"][:], g["features"][:], rtol=1e-5, atol=1e-6)
            np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
            assert f["features"].attrs["encoder"] == s.attrs["encoder"] == "resnet18_trunc"
            assert f["features"].attrs["weights_sha256"] == s.attrs["weights_sha256"]
    # encoding the bank (its identity views) equals encoding the embed folder
    from_bank, ids_bank = _encode(bank_dir, ckpt)
    from_feats, ids_feats = _encode(feats_dir, ckpt)
    assert ids_bank == ids_feats == ["a", "b"]
    np.testing.assert_allclose(from_bank, from_feats, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(from_bank, axis=1), 1.0, rtol=1e-5)
    # an identity view from another encoder is refused, naming both files
    with h5py.File(bank_dir / "identity" / "h5_files" / "b.h5", "r+") as f:
        f["features"].attrs["weights_sha256"] = "0" * 64
    res = encode_gigassl(bank_dir, ckpt, None, n_views=2, device="cpu", progress=False)
    assert res.slide_ids == ["a"] and "identity view made with weights_sha256" in res.failed["b"]
    assert "identity/h5_files/b.h5" in res.failed["b"] and "h5_files/b.h5" in res.failed["b"]


def test_cli_bank_identity_view(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tiling = make_tiling_dir(tmp_path / "tiles", {"c": (512, 256)})
    code = main(
        ["gigassl", "bank", str(tiling), "--encoder", "resnet18_trunc", "--weights", "random", "--out",
         str(tmp_path / "bank"), "--n-aug", "1", "--n-tiles", "3", "--identity-view", "--device", "cpu",
         "--workers", "1", "--no-progress"]
    )  # fmt: skip
    assert code == 0
    assert "banked 1 slide(s)" in capsys.readouterr().out
    with h5py.File(tmp_path / "bank" / "identity" / "h5_files" / "c.h5") as f:
        assert f["features"].shape == (8, 256)  # 4 x 2 tiles, all of them
    with h5py.File(tmp_path / "bank" / "h5_files" / "c.h5") as f:
        assert f["features"].shape == (1, 3, 256)
    ckpt = save_untrained_checkpoint(256, tmp_path / "u.pth", TINY)
    args = ["--checkpoint", str(ckpt), "--views", "2", "--device", "cpu", "--no-progress", "--out"]
    assert main(["gigassl", "encode", str(tmp_path / "bank"), *args, str(tmp_path / "e.npz")]) == 0
    with np.load(tmp_path / "e.npz") as z:
        assert z["embeddings"].shape == (1, 16) and list(z["slide_ids"]) == ["c"]
    (tmp_path / "bank" / "identity" / "h5_files" / "c.h5").unlink()
    assert main(["gigassl", "encode", str(tmp_path / "bank"), *args, str(tmp_path / "f.npz")]) != 0
    err = capsys.readouterr().err
    assert "c.h5: the bank has no non-augmented (identity) view" in err and "--identity-view" in err


def test_a_crash_in_the_identity_view_fails_one_slide_and_the_rerun_completes(
    tiling: Path, encoder: torch.nn.Module, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gigaslide.data.feature_writer import ChunkedFeatureWriter

    out = tmp_path / "bank"
    original = ChunkedFeatureWriter.write
    calls = {"n": 0}

    def flaky(self: ChunkedFeatureWriter, features: np.ndarray, mask: np.ndarray | None = None) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # slide a's identity view, second batch of 16 tiles
            raise RuntimeError("simulated crash")
        original(self, features, mask)

    monkeypatch.setattr(ChunkedFeatureWriter, "write", flaky)
    first = build_gigassl_bank(tiling, encoder, out, identity_view=True, **KW)
    assert set(first.failed) == {"a"} and "simulated crash" in first.failed["a"]
    assert not (out / "h5_files" / "a.h5").exists() and (out / "identity" / "h5_files" / "b.h5").exists()
    monkeypatch.setattr(ChunkedFeatureWriter, "write", original)
    second = build_gigassl_bank(tiling, encoder, out, identity_view=True, **KW)
    assert not second.failed and second.tiles == N_TILES["a"] + 2 * 8  # only slide a, both parts
    ref = build_gigassl_bank(tiling, encoder, tmp_path / "ref", identity_view=True, **KW)
    assert not ref.failed
    for part in ("h5_files", "identity/h5_files"):
        for s in N_TILES:
            with h5py.File(out / part / f"{s}.h5") as f, h5py.File(tmp_path / "ref" / part / f"{s}.h5") as g:
                np.testing.assert_allclose(f["features"][:], g["features"][:], rtol=1e-5, atol=1e-6)
                np.testing.assert_array_equal(f["coords"][:], g["coords"][:])
