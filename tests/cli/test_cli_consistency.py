"""One consistent CLI: one error path, the same exit status for the same problem, help with defaults,
shared split options, output folders checked and locked, validation before anything is written."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from gigaslide.cli.main import build_parser, main
from gigaslide.data.features_io import write_features
from gigaslide.preprocess.tiling_spec import TileSpec


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _cohort(root: Path, n: int = 8, label_col: str = "label") -> tuple[Path, Path]:
    """n slides of 12 tiles, 8-d features, two classes, two slides per case."""
    rng = np.random.default_rng(0)
    spec = TileSpec.create(
        tile_size=256, target_mpp=0.5, slide_mpp=0.5, level_downsamples=[1.0], level0_dims=(1024, 768)
    )
    xs, ys = np.meshgrid(np.arange(0, 1024, 256), np.arange(0, 768, 256))
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)  # (12, 2)
    rows = []
    for i in range(n):
        f = rng.normal(size=(len(coords), 8)).astype(np.float32)
        f[:3] += 3.0 * ((i // 2) % 2)
        write_features(root / "feats" / "h5_files" / f"s{i}.h5", f, coords, coords_attrs=spec.to_attrs())
        rows.append({"slide_id": f"s{i}", "case_id": f"c{i // 2}", label_col: ["lo", "hi"][(i // 2) % 2]})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root / "feats", root / "labels.csv"


def _train(feats: Path, labels: Path, out: Path, *extra: str) -> int:
    return main(["train", "--features", str(feats), "--labels", str(labels), "--out", str(out),
                 "--folds", "2", "--epochs", "1", "--val-fraction", "0", *extra])  # fmt: skip


def _help(command: str) -> str:
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    return " ".join(sub.choices[command].format_help().split())


def test_help_shows_defaults() -> None:
    embed = _help("embed")
    for opt, default in [("--batch-size", "64"), ("--precision", "fp32"), ("--chunk-size", "4096"),
                         ("--device", "auto"), ("--workers", str(min(4, os.cpu_count() or 1)))]:  # fmt: skip
        assert f"(default: {default})" in embed.split(opt, 2)[2].split(" --")[0], opt
    train = _help("train")
    for opt, default in [("--epochs", "20"), ("--cache", "memory"), ("--folds", "10"), ("--model", "abmil")]:
        assert f"(default: {default})" in train.split(f"{opt} ", 2)[2].split(" --")[0], opt
    assert "(default: None)" not in train and "(default: False)" not in train
    assert "(default: 10)" in _help("probe").split("--folds ", 2)[2].split(" --")[0]
    assert "(default: cosine)" in _help("probe").split("--knn-metric ", 2)[2].split(" --")[0]  # no help text
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    nested = next(a for a in sub.choices["gigassl"]._actions if hasattr(a, "choices") and a.choices)
    bank = " ".join(nested.choices["bank"].format_help().split())  # nested subcommands too
    assert "(default: fp32)" in bank.split("--precision ", 2)[2].split(" --")[0]
    convert = _help("convert")
    assert "DST" not in convert and "in the folder given by --out" in convert


def test_split_protocol_options_are_shared() -> None:
    from gigaslide.cli.common import SPLIT_DEFAULTS
    from gigaslide.train.config import TrainConfig

    cfg = TrainConfig()
    assert {k: getattr(cfg, k) for k in SPLIT_DEFAULTS} == SPLIT_DEFAULTS  # probe and train agree
    sub = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)

    def group(cmd: str) -> list[str]:
        g = next(g for g in sub.choices[cmd]._action_groups if g.title == "evaluation protocol")
        return [a.option_strings[0] for a in g._group_actions]

    assert group("train") == group("probe") == [
        "--folds", "--monte-carlo", "--test-fraction", "--val-fraction", "--train-fraction", "--few-shot", "--splits"
    ]  # fmt: skip


def test_train_list_keys(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["train", "--list-keys"])  # no other argument needed
    out = capsys.readouterr().out
    assert e.value.code == 0
    lines = {line.split()[0]: line.split(None, 1)[1] for line in out.splitlines()[1:-1]}
    assert lines["max_tiles"].split() == ["int", "|", "None", "null"] and lines["lr"].split() == [
        "float",
        "0.0002",
    ]
    assert set(lines) >= {"epochs", "patience", "survival_loss", "model_kwargs", "monitor"}


def test_model_typo_writes_nothing_and_corrected_rerun_works(tmp_path: Path, capsys) -> None:
    feats, labels = _cohort(tmp_path)
    out = tmp_path / "run"
    assert _train(feats, labels, out, "--model", "abmill") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gigaslide train: error: model 'abmill'") and "unknown slide model 'abmill'" in err
    assert "\n" not in err and "-v" not in err  # one line, no traceback hint for a user error
    assert sorted(p.name for p in out.iterdir()) == []  # no config.yaml, no splits
    assert _train(feats, labels, out, "--set", "model_kwargs.hiden_dim=4") == 2
    assert "unknown argument(s) ['hiden_dim']" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []
    assert _train(feats, labels, out) == 0  # the corrected rerun into the same --out
    captured = capsys.readouterr()
    assert (out / "config.yaml").exists() and "abmil classification, 2-fold CV" in captured.out
    assert "abmil folds" in captured.err and "2/2" in captured.err  # the bar over folds
    assert "fold 1: 1 ep" in captured.err and "fold 0 epoch 1/1" in captured.err  # and per epoch


def test_train_label_col(tmp_path: Path, capsys) -> None:
    feats, labels = _cohort(tmp_path, label_col="subtype")
    assert _train(feats, labels, tmp_path / "a", "--no-progress") == 2
    err = capsys.readouterr().err
    assert "missing column(s) ['label']" in err and "--label-col" in err and str(labels) in err
    assert _train(feats, labels, tmp_path / "b", "--label-col", "subtype", "--no-progress") == 0
    assert "folds" not in capsys.readouterr().err  # --no-progress hides the bar


@pytest.mark.parametrize("command", ["train", "probe", "tile", "embed", "synth", "convert"])
def test_out_is_a_file(tmp_path: Path, command: str, capsys) -> None:
    taken = tmp_path / "results.txt"
    taken.write_text("x")
    argv = {
        "train": ["train", "--features", str(tmp_path), "--labels", str(tmp_path / "l.csv")],
        "probe": ["probe", "--embeddings", str(tmp_path), "--labels", str(tmp_path / "l.csv")],
        "tile": ["tile", str(tmp_path)],
        "embed": ["embed", str(tmp_path), "--encoder", "resnet18_trunc"],
        "synth": ["synth"],
        "convert": ["convert", str(tmp_path), "--to", "clam"],
    }[command]
    if command == "probe":  # probe reads its inputs first; give it readable ones
        feats, labels = _cohort(tmp_path / "c")
        argv = ["probe", "--embeddings", str(feats), "--labels", str(labels)]
    if command == "train":
        feats, labels = _cohort(tmp_path / "c")
        argv = ["train", "--features", str(feats), "--labels", str(labels)]
    if command == "tile":
        from gigaslide.synth import write_synthetic_slide

        argv = ["tile", str(write_synthetic_slide(tmp_path / "s.tiff", width=256, height=256, seed=0))]
    for out in (taken, taken / "sub"):
        assert main([*argv, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"gigaslide {command}: error: --out {out}") and "is a file" in err, err
        assert "Errno" not in err and "\n" not in err


def test_busy_output_folder_names_the_holder(tmp_path: Path, capsys) -> None:
    from gigaslide.utils.lock import OutputLock

    feats, labels = _cohort(tmp_path)
    out = tmp_path / "run"
    with OutputLock(out, "gigaslide train --out run (the first one)"):
        assert _train(feats, labels, out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"gigaslide train: error: output folder {out} is in use by pid {os.getpid()} on ")
    assert "started 20" in err and "(the first one)" in err and "--wait" in err
    assert not (out / "config.yaml").exists()
    with OutputLock(out, "another run"):  # every batch command with an --out folder takes the lock
        for argv in (["e2e", "--labels", str(labels), "--tiles", str(tmp_path), "--out", str(out)],
                     ["probe", "--embeddings", str(feats), "--labels", str(labels), "--out", str(out)],
                     ["synth", "--n-slides", "1", "--out", str(out)]):  # fmt: skip
            assert main(argv) == 2
            assert f"output folder {out} is in use by pid {os.getpid()}" in capsys.readouterr().err, argv[0]


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ({"time": [-1, 5], "event": [1, 0]}, r"'time' must be a finite number >= 0.*\[1\] a"),
        ({"time": ["12 months", 5], "event": [1, 0]}, r"no units.*\[1\] a"),
        ({"time": [3, 5], "event": ["yes", 0]}, r"'event' must be 0 \(censored\) or 1.*\[1\] a"),
        ({"time": [3, 5], "event": [1, 0], "case_id": None}, r"missing column\(s\) \['case_id'\]"),
    ],
)
def test_probe_checks_labels_as_train_does(tmp_path: Path, rows: dict, message: str, capsys) -> None:
    from gigaslide.data.cohort import Cohort, CohortError

    table = pd.DataFrame({"slide_id": ["a", "b"], "case_id": ["1", "2"], **rows}).dropna(axis=1, how="all")
    labels = tmp_path / "labels.csv"
    table.to_csv(labels, index=False)
    np.savez(tmp_path / "e.npz", embeddings=np.eye(2), slide_ids=np.array(["a", "b"]))
    code = main(["probe", "--embeddings", str(tmp_path / "e.npz"), "--labels", str(labels),
                 "--task", "survival", "--out", str(tmp_path / "o")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(f"gigaslide probe: error: {labels}:") and "\n" not in err
    import re

    assert re.search(message, err), err
    with pytest.raises(CohortError, match=message):  # train's reader: the same check, the same words
        Cohort(labels, tmp_path, task="survival")


def test_heatmap_bad_model_file_is_one_line(tmp_path: Path, capsys) -> None:
    feats, _ = _cohort(tmp_path, n=1)
    bad = tmp_path / "fold0.pt"
    bad.write_bytes(b"this is not a checkpoint")
    code = main(["heatmap", "--slide", str(tmp_path / "s0.tiff"), "--scores", str(feats / "h5_files" / "s0.h5"),
                 "--model", str(bad), "--out", str(tmp_path / "h.png")])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith(f"gigaslide heatmap: error: {bad}: not a readable gigaslide training checkpoint")


def test_weights_only_checkpoint_load(tmp_path: Path) -> None:
    """Training checkpoints load with weights_only=True: a pickled object inside is refused, not run."""
    from gigaslide.train.mil import load_slide_model, save_checkpoint

    state = torch.nn.Linear(2, 2).state_dict()
    meta = {"model": "abmil", "model_kwargs": {}, "in_dim": 8, "n_outputs": 2, "class_names": ["a", "b"]}
    from gigaslide.models.slide import create_slide_model

    good = save_checkpoint(tmp_path / "ok.pt", create_slide_model("abmil", 8, 2).state_dict(), meta)
    _, loaded = load_slide_model(good)
    assert loaded["class_names"] == ["a", "b"]
    torch.save({"state_dict": state, **meta, "evil": _Pickled()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match=r"not a readable gigaslide training checkpoint.*Unpickl"):
        load_slide_model(tmp_path / "evil.pt")


class _Pickled:
    """An arbitrary class: torch.load(weights_only=True) must refuse to build it."""


def test_unexpected_errors_get_the_verbose_hint(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import gigaslide.cli.models as models_cli

    def boom(args: object) -> int:
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(models_cli, "run", boom)
    assert main(["models"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [
        "gigaslide models: unexpected error: RuntimeError: an internal bug",
        "(this is likely a bug; run `gigaslide -v ...` for the full traceback)",
    ]
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["-v", "models"])


def test_small_validation_sets_are_warned() -> None:
    from gigaslide.data.splits import Split
    from gigaslide.experiments.crossval import small_validation_warning

    def split(fold: int, n_val: int) -> Split:
        return Split(fold=fold, train=["t"], val=[f"v{i}" for i in range(n_val)], test=["x"])

    assert small_validation_warning([split(0, 10), split(1, 0)]) is None  # empty ones are warned elsewhere
    msg = small_validation_warning([split(0, 2), split(1, 2), split(2, 12)])
    assert msg is not None and msg.startswith(
        "validation sets of 2 of 3 folds hold only 2 slide(s) (folds [0, 1])"
    )
    assert "3-5 slide(s)" in (small_validation_warning([split(0, 3), split(1, 5)]) or "")


def test_knn_default_k_fits_small_training_sets(caplog: pytest.LogCaptureFixture) -> None:
    from gigaslide.eval.probes import knn_predict_proba

    rng = np.random.default_rng(0)
    X, y, Xt = rng.normal(size=(6, 3)), np.array([0, 1] * 3), rng.normal(size=(4, 3))
    with caplog.at_level("WARNING"):
        default = knn_predict_proba(X, y, Xt, 2)
    assert caplog.records == []  # the default adapts silently
    np.testing.assert_array_equal(default, knn_predict_proba(X, y, Xt, 2, k=3))  # half the training set
    with caplog.at_level("WARNING"):
        knn_predict_proba(X, y, Xt, 2, k=20, fold=3)  # an explicit k too large is still warned
    assert "fold 3: KNN k=20 exceeds the 6 training slide(s)" in caplog.text
