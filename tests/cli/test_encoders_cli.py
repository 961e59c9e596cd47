"""`gigaslide encoders`: lists the registry with metadata and registered weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gigaslide.cli.main import main
from gigaslide.models.encoders import get_encoder_meta, list_encoders


@pytest.fixture()
def registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yml = tmp_path / "weights.yaml"
    monkeypatch.setenv("GIGASLIDE_WEIGHTS", str(yml))
    return yml


def test_json_lists_every_encoder_with_metadata(
    registry: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "vit256_small_dino.pth").write_bytes(b"x")
    registry.write_text(f"hipt_vit256: {tmp_path / 'vit256_small_dino.pth'}\nresnet50_trunc: gone.pth\n")
    assert main(["encoders", "--json", "--timm", "vit_tiny_patch16_224"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["registry"] == str(registry) and data["registry_error"] is None
    rows = {r["name"]: r for r in data["encoders"]}
    assert list(rows) == [*list_encoders(), "timm:vit_tiny_patch16_224"]
    for name, row in rows.items():
        assert {k: row[k] for k in get_encoder_meta(name).to_dict()} == get_encoder_meta(name).to_dict()
    assert rows["hipt_vit256"]["weights"] == str(tmp_path / "vit256_small_dino.pth")
    assert rows["hipt_vit256"]["weights_exists"] is True
    assert rows["resnet50_trunc"]["weights"] == str(tmp_path / "gone.pth")
    assert rows["resnet50_trunc"]["weights_exists"] is False
    assert rows["resnet18_trunc"]["weights"] is None
    assert rows["timm:vit_tiny_patch16_224"]["embed_dim"] == 192


def test_table_output(registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry.write_text("resnet18_trunc: /nowhere/r18.pth\n")
    assert main(["encoders"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == ["name", "dim", "input", "mpp", "mean/std", "weights"]
    hipt = next(line for line in lines if line.startswith("hipt_vit256 "))
    assert hipt.split()[1:4] == ["384", "256", "0.5"] and "(random init)" in hipt
    r18 = next(line for line in lines if line.startswith("resnet18_trunc "))
    assert "/nowhere/r18.pth" in r18 and "[MISSING FILE]" in r18
    assert f"weights registry: {registry}" in out


def test_broken_registry_and_unknown_timm(registry: Path, capsys: pytest.CaptureFixture[str]) -> None:
    registry.write_text("just a string\n")
    assert main(["encoders", "--json"]) == 2  # bad input: exit status 2 as in every command
    captured = capsys.readouterr()
    assert "must be a mapping" in json.loads(captured.out)["registry_error"]
    assert captured.err.startswith("gigaslide encoders: error:") and "must be a mapping" in captured.err
    registry.unlink()
    assert main(["encoders", "--timm", "no_such_net"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gigaslide encoders: error:") and "timm has no architecture 'no_such_net'" in err
