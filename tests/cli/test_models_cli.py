"""`gigaslide models` lists every registered slide model with its metadata."""

from __future__ import annotations

import json

from gigaslide.cli.main import main
from gigaslide.models.slide import get_slide_model_info, list_slide_models


def test_models_json_lists_registry(capsys) -> None:
    assert main(["models", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["name"] for r in rows] == list_slide_models()
    for r in rows:
        info = get_slide_model_info(r["name"])
        assert r["attention"] == info.produces_attention and r["paper"] == info.paper
        assert r["input"] == info.input_kind
    assert {"abmil", "clam_sb", "transmil", "dsmil", "mean", "feature_max", "topk_mil"} <= {
        r["name"] for r in rows
    }


def test_models_table(capsys) -> None:
    assert main(["models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:4] == ["name", "attention", "input", "coords"]
    assert lines[1].split()[:4] == ["abmil", "yes", "features", "no"]
    assert len(lines) == 1 + len(list_slide_models())
