"""`gigaslide pretrain gigassl`, `gigaslide gigassl encode` and `gigaslide gigassl evaluate` end to end (tiny)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "ssl"))
from gigassl_synth import write_synthetic_bank

from gigaslide.cli.main import main


def test_pretrain_encode_evaluate_from_the_command_line(tmp_path: Path, capsys) -> None:
    torch.set_num_threads(1)
    bank, df = write_synthetic_bank(tmp_path / "bank", n_slides=12, n_aug=3, n_tiles=8, dim=8)
    labels = tmp_path / "labels.csv"
    df.to_csv(labels, index=False)
    ssl = tmp_path / "ssl"
    argv = ["pretrain", "gigassl", str(bank), "--out", str(ssl), "--epochs", "2", "--batch-size", "4",
            "--aggregator-arg", "width=16", "--proj-dim", "8", "--warmup-epochs", "1", "--temperature", "0.1",
            "--device", "cpu", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "Giga-SSL checkpoint" in capsys.readouterr().out
    ckpt = torch.load(ssl / "checkpoint.pth", weights_only=False)
    assert ckpt["engine"]["step"] == 6 and ckpt["engine"]["objective"]["gigassl"]["aggregator_kwargs"] == {
        "width": 16
    }
    assert main(argv) == 0  # finished: resumes at the end, trains nothing more
    assert torch.load(ssl / "checkpoint.pth", weights_only=False)["engine"]["step"] == 6

    emb = tmp_path / "emb.npz"
    assert main(["gigassl", "encode", str(bank), "--checkpoint", str(ssl / "checkpoint.pth"), "--out", str(emb),
                 "--views", "4", "--device", "cpu", "--no-progress"]) == 0  # fmt: skip
    with np.load(emb) as z:
        assert z["embeddings"].shape == (12, 16) and int(z["n_views"]) == 4
        np.testing.assert_allclose(np.linalg.norm(z["embeddings"], axis=1), 1.0, rtol=1e-5)

    # the probe command reads the encode output as it is
    assert main(["probe", "--embeddings", str(emb), "--labels", str(labels), "--folds", "3", "--n-boot", "10",
                 "--out", str(tmp_path / "probe")]) == 0  # fmt: skip

    from gigaslide.data.features_io import write_features
    from gigaslide.data.gigassl_bank import GigaSSLBank

    b = GigaSSLBank(bank)
    for i, s in enumerate(b.slides):
        feats, coords = b.view(i, 0)
        write_features(tmp_path / "feats" / "h5_files" / f"{s.slide_id}.h5", feats, coords,
                       coords_attrs=s.spec.to_attrs())  # fmt: skip
    capsys.readouterr()
    out = tmp_path / "eval"
    assert main(["gigassl", "evaluate", "--embeddings", str(emb), "--compare", f"again={emb}", "--features",
                 str(tmp_path / "feats"), "--labels", str(labels), "--budgets", "100%,25%,50", "--folds", "3",
                 "--out", str(out)]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "| 100% |" in printed and "mean pooling" in printed
    table = pd.read_csv(out / "results.csv")
    assert set(table["representation"]) == {"giga-ssl", "again", "mean pooling"}
    assert list(table["budget"].unique()) == ["100%", "25%", "50 slides"]
    same = table.set_index(["budget", "representation"])
    assert same.loc[("100%", "giga-ssl"), "auc_mean"] == same.loc[("100%", "again"), "auc_mean"]
    capsys.readouterr()
    bad = ["gigassl", "evaluate", "--embeddings", str(emb), "--features", str(tmp_path / "feats"), "--labels",
           str(labels), "--budgets", "0%", "--out", str(out)]  # fmt: skip
    assert main(bad) == 2
    err = capsys.readouterr().err.strip()
    assert "budget '0%'" in err and "\n" not in err
