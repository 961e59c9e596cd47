"""Giga-SSL SimCLR on the engine: resume exactness, checkpoint layout, encoding, evaluation, CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from gigassl_synth import write_synthetic_bank

from gigaslide.experiments.gigassl_eval import (
    Representation,
    budget_name,
    evaluate_representations,
    parse_budget,
)
from gigaslide.ssl.gigassl_encode import encode_gigassl, identity_augmentations
from gigaslide.ssl.simclr import (
    GigaSSLConfig,
    ProjectionMLP,
    load_gigassl_model,
    pretrain_gigassl,
    save_untrained_checkpoint,
)
from gigaslide.train.checkpoint import CHECKPOINT_NAME

TINY = GigaSSLConfig(aggregator_kwargs={"width": 16}, proj_dim=8, warmup_epochs=1, lr=0.1, temperature=0.1)


@pytest.fixture(scope="module")
def bank(tmp_path_factory: pytest.TempPathFactory):
    torch.set_num_threads(1)
    return write_synthetic_bank(
        tmp_path_factory.mktemp("gigassl") / "bank", n_slides=12, n_aug=3, n_tiles=8, dim=8
    )


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=False)["model"]


def test_projector_is_the_official_shape() -> None:
    p = ProjectionMLP(512, 256)
    assert [tuple(m.weight.shape) for m in p.modules() if isinstance(m, torch.nn.Linear)] == [
        (512, 512), (512, 512), (256, 512)
    ]  # fmt: skip
    assert p(torch.randn(4, 512)).shape == (4, 256)


def test_killed_and_resumed_pretraining_equals_uninterrupted(bank, tmp_path: Path, monkeypatch) -> None:
    root, _ = bank
    ref = pretrain_gigassl(
        root, tmp_path / "ref", epochs=2, batch_size=4, cfg=TINY, device="cpu", progress=False
    )
    from gigaslide.ssl import simclr

    calls = {"n": 0}
    original = simclr.SimCLRObjective.train_step

    def dying(self, batch, ctx):
        calls["n"] += 1
        if calls["n"] == 5:  # 3 steps per epoch: dies in epoch 1 after a mid-epoch checkpoint at step 4
            raise KeyboardInterrupt("killed")
        return original(self, batch, ctx)

    monkeypatch.setattr(simclr.SimCLRObjective, "train_step", dying)
    with pytest.raises(KeyboardInterrupt):
        pretrain_gigassl(root, tmp_path / "res", epochs=2, batch_size=4, cfg=TINY, device="cpu", progress=False,
                         checkpoint_every=2)  # fmt: skip
    monkeypatch.setattr(simclr.SimCLRObjective, "train_step", original)
    assert torch.load(tmp_path / "res" / CHECKPOINT_NAME, weights_only=False)["engine"]["step"] == 4
    torch.manual_seed(123)
    res = pretrain_gigassl(root, tmp_path / "res", epochs=2, batch_size=4, cfg=TINY, device="cpu", progress=False,
                           checkpoint_every=2)  # fmt: skip
    a, b = _weights(ref), _weights(res)
    assert a.keys() == b.keys() and any(k.startswith("aggregator.layer4.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_checkpoint_rebuilds_the_model_strictly(bank, tmp_path: Path) -> None:
    root, _ = bank
    ckpt = pretrain_gigassl(
        root, tmp_path / "pt", epochs=1, batch_size=4, cfg=TINY, device="cpu", progress=False
    )
    model, cfg = load_gigassl_model(ckpt)
    assert cfg.aggregator == "sparseconvmil" and cfg.aggregator_kwargs == {"width": 16} and cfg.n_tiles == 5
    sd = _weights(ckpt)
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="not a Giga-SSL checkpoint"):
        torch.save({"x": 1}, tmp_path / "bad.pth")
        load_gigassl_model(tmp_path / "bad.pth")


@pytest.mark.parametrize("aggregator", ["mean", "abmil"])
def test_ablation_aggregators_train(bank, tmp_path: Path, aggregator: str) -> None:
    root, _ = bank
    cfg = GigaSSLConfig(aggregator=aggregator, proj_dim=8, warmup_epochs=0, lr=0.1, temperature=0.1,
                        aggregator_kwargs={"hidden_dim": 16} if aggregator == "mean" else {"hidden_dims": (16, 8)})  # fmt: skip
    ckpt = pretrain_gigassl(root, tmp_path, epochs=1, batch_size=4, cfg=cfg, device="cpu", progress=False)
    rows = (tmp_path / "epochs.csv").read_text().splitlines()
    assert len(rows) == 2 and np.isfinite(float(rows[1].split(",")[2]))
    model, _ = load_gigassl_model(ckpt)
    assert not model.uses_coords


def test_encode_gives_unit_rows_from_bank_and_features_and_is_deterministic(bank, tmp_path: Path) -> None:
    root, _ = bank
    ckpt = save_untrained_checkpoint(8, tmp_path / "u.pth", TINY)
    res = encode_gigassl(root, ckpt, tmp_path / "e.npz", n_views=3, device="cpu", progress=False)
    assert res.embeddings.shape == (12, 16) and len(res.slide_ids) == 12
    np.testing.assert_allclose(np.linalg.norm(res.embeddings, axis=1), 1.0, rtol=1e-5)
    with np.load(tmp_path / "e.npz") as z:
        np.testing.assert_array_equal(z["embeddings"], res.embeddings)
        assert list(z["slide_ids"]) == res.slide_ids
    again = encode_gigassl(root, ckpt, None, n_views=3, device="cpu", progress=False)
    np.testing.assert_array_equal(again.embeddings, res.embeddings)
    # a plain feature folder (identity tiles written as gigaslide embed would)
    from gigaslide.data.features_io import write_features
    from gigaslide.data.gigassl_bank import GigaSSLBank

    b = GigaSSLBank(root)
    for i, s in enumerate(b.slides):
        feats, coords = b.view(i, 0)
        write_features(
            tmp_path / "feats" / "h5_files" / f"{s.slide_id}.h5",
            feats,
            coords,
            coords_attrs=s.spec.to_attrs(),
        )
    plain = encode_gigassl(tmp_path / "feats", ckpt, None, n_views=3, device="cpu", progress=False)
    assert plain.slide_ids == res.slide_ids
    np.testing.assert_allclose(np.linalg.norm(plain.embeddings, axis=1), 1.0, rtol=1e-5)


def test_bank_without_identity_view_is_refused_unless_asked(tmp_path: Path) -> None:
    root, _ = write_synthetic_bank(tmp_path / "b", n_slides=4, n_aug=2, n_tiles=6, dim=8, identity=False)
    ckpt = save_untrained_checkpoint(8, tmp_path / "u.pth", TINY)
    with pytest.raises(ValueError, match=r"no slide could be encoded.*identity"):
        encode_gigassl(root, ckpt, None, n_views=2, device="cpu", progress=False)
    res = encode_gigassl(root, ckpt, None, n_views=2, use_augmented=True, device="cpu", progress=False)
    assert res.embeddings.shape == (4, 16)
    assert identity_augmentations({"augmentations": json.dumps([{"crop_w": 0.7}])}) == []


def test_budgets_parse_and_name() -> None:
    assert parse_budget("100%") == 1.0 and parse_budget("25%") == 0.25 and parse_budget("50") == 50
    assert [budget_name(b) for b in (1.0, 0.25, 50)] == ["100%", "25%", "50 slides"]
    with pytest.raises(ValueError, match="budget"):
        parse_budget("150%")


def test_evaluation_uses_the_same_splits_and_skips_impossible_budgets(bank, tmp_path: Path) -> None:
    _, df = bank
    rng = np.random.default_rng(0)
    y = df["label"].to_numpy()
    good = np.c_[y + 0.1 * rng.normal(size=12), rng.normal(size=(12, 3))]
    noise = rng.normal(size=(12, 4))
    reps = {"good": Representation(good, list(df["slide_id"]), "standard"),
            "noise": Representation(noise, list(df["slide_id"]), "standard")}  # fmt: skip
    table = evaluate_representations(reps, df, tmp_path, budgets=(1.0, 0.5, 4, 50), folds=3, val_fraction=0.2)
    assert list(table["budget"].unique()) == ["100%", "50%", "4 slides", "50 slides"]
    by = table.set_index(["budget", "representation"])
    assert by.loc[("100%", "good"), "auc_mean"] == 1.0
    assert by.loc[("100%", "good"), "n_train"] == by.loc[("100%", "noise"), "n_train"]
    assert by.loc[("4 slides", "good"), "n_train"] == 4
    assert "only" in by.loc[("50 slides", "good"), "note"]
    report = (tmp_path / "report.md").read_text()
    assert "| 100% |" in report and "good" in report and (tmp_path / "results.csv").is_file()
    with pytest.raises(ValueError, match="no noise embedding"):
        evaluate_representations({"noise": Representation(noise[:5], list(df["slide_id"][:5]))}, df, None)
