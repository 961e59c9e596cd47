"""Checkpoint reading and key adaptation: every supported layout round-trips to identical outputs."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import io
import json
import logging
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from gigaslide.models.encoders import create_encoder
from gigaslide.models.encoders.hipt import HIPTViT256
from gigaslide.models.weights import (
    WeightsError,
    WeightsMismatchError,
    adapt_state_dict,
    filter_state_dict,
    load_checkpoint,
    load_weights,
    sha256_file,
)


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GIGASLIDE_WEIGHTS", str(tmp_path / "no-registry.yaml"))


def _tiny(seed: int) -> HIPTViT256:
    torch.manual_seed(seed)
    return HIPTViT256(img_size=64, embed_dim=32, depth=2, num_heads=4).eval()


def _dino_head(seed: int = 5) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "head.mlp.0.weight": torch.randn(64, 32, generator=g),
        "head.mlp.0.bias": torch.randn(64, generator=g),
        "head.last_layer.weight_g": torch.ones(128, 1),
        "head.last_layer.weight_v": torch.randn(128, 64, generator=g),
    }


def _layouts(sd: dict[str, torch.Tensor]) -> dict[str, object]:
    noisy = {k: v + 1.0 for k, v in sd.items()}  # the student must not be chosen over the teacher
    return {
        "plain": sd,
        "dino": {
            "teacher": {**{f"backbone.{k}": v for k, v in sd.items()}, **_dino_head()},
            "student": {**{f"module.backbone.{k}": v for k, v in noisy.items()}, **_dino_head(6)},
            "epoch": 100,
            "args": argparse.Namespace(arch="vit_small", patch_size=16, lr=0.0005),
        },
        "state_dict_module": {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3},
        "model_orig_mod": {"model": {f"_orig_mod.{k}": v for k, v in sd.items()}},
        "encoder_prefix": {f"encoder.{k}": v for k, v in sd.items()},
        "nested_twice": {"state_dict": {"model": {f"model.{k}": v for k, v in sd.items()}}},
        # stacked wrappers: stripping the outer prefix alone matches no key
        "ddp_compile": {f"module._orig_mod.{k}": v for k, v in sd.items()},
        "dino_student_ddp": {**{f"module.backbone.{k}": v for k, v in sd.items()}, **_dino_head()},
        "model_encoder": {"model": {f"model.encoder.{k}": v for k, v in sd.items()}},
        "three_stacked": {f"module._orig_mod.backbone.{k}": v for k, v in sd.items()},
    }


LAYOUTS = ["plain", "dino", "state_dict_module", "model_orig_mod", "encoder_prefix", "nested_twice"]
STACKED = ["ddp_compile", "dino_student_ddp", "model_encoder", "three_stacked"]


@pytest.mark.parametrize("layout", LAYOUTS + STACKED)
def test_torch_layouts_round_trip(tmp_path: Path, layout: str) -> None:
    src, dst = _tiny(0), _tiny(1)
    path = tmp_path / f"{layout}.pth"
    torch.save(_layouts(src.state_dict())[layout], path)
    info = load_weights(dst, path)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)
    assert info["missing"] == [] and info["unexpected"] == []
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["n_tensors"] == len(src.state_dict())
    with_head = layout in ("dino", "dino_student_ddp")
    assert sorted(info["dropped"]) == (sorted(_dino_head()) if with_head else [])


def test_safetensors_file_round_trip(tmp_path: Path) -> None:
    src, dst = _tiny(0), _tiny(1)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in src.state_dict().items()}, str(path))
    load_weights(dst, path)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x), atol=0, rtol=0)


@pytest.mark.parametrize("weights_file", ["model.safetensors", "pytorch_model.bin"])
def test_timm_folder_round_trip(tmp_path: Path, weights_file: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    src = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=64).eval()
    folder = tmp_path / "tiny-timm"
    folder.mkdir()
    config = {
        "architecture": "vit_tiny_patch16_224",
        "num_classes": 10,
        "model_args": {"img_size": 64},
        "pretrained_cfg": {"mean": [0.1, 0.2, 0.3], "std": [0.4, 0.5, 0.6], "input_size": [3, 64, 64]},
    }
    (folder / "config.json").write_text(json.dumps(config))
    sd = src.state_dict()
    if weights_file.endswith(".safetensors"):
        save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / weights_file))
    else:
        torch.save(sd, folder / weights_file)
    enc = create_encoder("timm:vit_tiny_patch16_224", weights=folder)
    assert enc.meta.mean == (0.1, 0.2, 0.3) and enc.meta.std == (0.4, 0.5, 0.6)
    assert enc.meta.input_size == 64 and enc.meta.embed_dim == 192
    assert enc.weights_info["file"] == str((folder / weights_file).resolve())
    assert sorted(enc.weights_info["dropped"]) == ["head.bias", "head.weight"]  # the classifier only
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), src.forward_head(src.forward_features(x), pre_logits=True))


def test_timm_folder_architecture_mismatch(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "resnet18", "pretrained_cfg": {}}))
    torch.save({"w": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="architecture 'resnet18'"):
        create_encoder("timm:vit_tiny_patch16_224", weights=tmp_path)


def test_dino_checkpoint_with_14x14_grid_loads_into_hipt_vit256(tmp_path: Path) -> None:
    """The public vit256_small_dino.pth layout: teacher/backbone., DINO head, 224px (14x14) pos_embed."""
    torch.manual_seed(0)
    src = HIPTViT256(img_size=224).eval()  # HIPT/DINO built the model with img_size 224
    ckpt = {
        "teacher": {**{f"backbone.{k}": v for k, v in src.state_dict().items()}, **_dino_head()},
        "args": argparse.Namespace(arch="vit_small"),
    }
    path = tmp_path / "vit256_small_dino.pth"
    torch.save(ckpt, path)
    enc = create_encoder("hipt_vit256", weights=path)
    assert enc.pos_embed.shape == (1, 197, 384)  # kept as it is: interpolated once per forward pass
    torch.testing.assert_close(enc.pos_embed, src.pos_embed, rtol=0, atol=0)
    with torch.no_grad():  # same features as the original model interpolating at forward time
        for size in (224, 256, 512):
            x = torch.randn(1, 3, size, size)
            torch.testing.assert_close(enc(x), src(x), atol=1e-5, rtol=1e-5)


def test_strict_mismatch_lists_keys_and_counts(tmp_path: Path) -> None:
    src, dst = _tiny(0), _tiny(1)
    sd = src.state_dict()
    del sd["norm.weight"]
    sd.update({f"extra.{i}": torch.zeros(1) for i in range(30)})
    path = tmp_path / "bad.pth"
    torch.save(sd, path)
    before = {k: v.clone() for k, v in dst.state_dict().items()}
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(dst, path)
    msg = str(err.value)
    assert str(path) in msg and "1 missing keys [norm.weight]" in msg
    assert "30 unexpected keys" in msg and "extra.0" in msg and "(30 total)" in msg and "..." in msg
    assert "extra.29" not in msg  # long lists are truncated
    assert all(torch.equal(before[k], v) for k, v in dst.state_dict().items())  # nothing half-loaded


def test_shape_mismatch_strict_and_non_strict(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src, dst = _tiny(0), _tiny(1)
    sd = src.state_dict()
    sd["norm.weight"] = torch.zeros(7)
    path = tmp_path / "shape.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError, match=r"norm.weight: checkpoint \(7,\) vs model \(32,\)"):
        load_weights(dst, path)
    with caplog.at_level(logging.WARNING):
        info = load_weights(dst, path, strict=False)
    assert "strict=False" in caplog.text
    assert info["mismatched"] and info["n_tensors"] == len(sd) - 1
    torch.testing.assert_close(dst.pos_embed, src.pos_embed)  # the rest was loaded
    assert dst.norm.weight.shape == (32,)  # the mismatched tensor was skipped


def test_non_strict_reports_missing_and_unexpected(tmp_path: Path) -> None:
    src, dst = _tiny(0), _tiny(1)
    sd = src.state_dict()
    sd.pop("norm.bias")
    sd["surprise"] = torch.ones(2)
    path = tmp_path / "partial.pth"
    torch.save(sd, path)
    info = load_weights(dst, path, strict=False)
    assert info["missing"] == ["norm.bias"] and info["unexpected"] == ["surprise"]
    torch.testing.assert_close(dst.cls_token, src.cls_token)


def test_prefix_not_stripped_when_it_is_part_of_the_model() -> None:
    class Wrapped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = nn.Linear(2, 2)

    m = Wrapped()
    sd, dropped = adapt_state_dict({"encoder.weight": torch.zeros(2, 2), "encoder.bias": torch.zeros(2)}, m)
    assert set(sd) == {"encoder.weight", "encoder.bias"} and dropped == []


def test_head_keys_kept_for_models_that_do_not_declare_them() -> None:
    m = nn.Sequential(nn.Linear(2, 2))
    sd, dropped = adapt_state_dict({"0.weight": torch.zeros(2, 2), "head.w": torch.zeros(1)}, m)
    assert "head.w" in sd and dropped == []


def test_pickled_objects_refused_unless_trusted(tmp_path: Path) -> None:
    src = _tiny(0)
    path = tmp_path / "pickled.pth"
    torch.save({"model": src.state_dict(), "saved_at": datetime.datetime(2024, 1, 1)}, path)
    with pytest.raises(WeightsError, match="trust_pickle=True"):
        load_checkpoint(path)
    sd = load_checkpoint(path, trust_pickle=True)
    assert set(sd) == set(src.state_dict())


def test_load_checkpoint_errors(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match=r"not found: .*missing\.pth"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(WeightsError, match=r"holds none of model\.safetensors"):
        load_checkpoint(tmp_path / "empty_dir")
    torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "no_tensors.pth")
    with pytest.raises(WeightsError, match=r"found no tensors.*epoch"):
        load_checkpoint(tmp_path / "no_tensors.pth")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match=r"garbage\.safetensors"):
        load_checkpoint(tmp_path / "garbage.safetensors")


def test_checkpoint_key_selects_entry(tmp_path: Path) -> None:
    a, b = {"w": torch.zeros(2)}, {"w": torch.ones(2)}
    torch.save({"teacher": a, "student": b}, tmp_path / "ts.pth")
    assert torch.equal(load_checkpoint(tmp_path / "ts.pth")["w"], a["w"])
    assert torch.equal(load_checkpoint(tmp_path / "ts.pth", checkpoint_key="student")["w"], b["w"])
    with pytest.raises(WeightsError, match="'ema' not found"):
        load_checkpoint(tmp_path / "ts.pth", checkpoint_key="ema")


def test_sha256_is_streamed_and_exact(tmp_path: Path) -> None:
    data = bytes(range(256)) * 5000
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob", chunk_size=1000) == hashlib.sha256(data).hexdigest()


def test_filter_state_dict_returns_model_ready_dict() -> None:
    src, dst = _tiny(0), _tiny(1)
    ckpt = {**{f"backbone.{k}": v for k, v in src.state_dict().items()}, **_dino_head()}
    sd = filter_state_dict(ckpt, dst)
    assert set(sd) == set(dst.state_dict())
    dst.load_state_dict(sd, strict=True)


def test_resnet_checkpoint_without_batchnorm_counters_loads_strictly(tmp_path: Path) -> None:
    torch.manual_seed(3)
    src = create_encoder("resnet18_trunc", weights="random")
    sd = {k: v for k, v in src.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert len(sd) < len(src.state_dict())  # the export really lacks the counters
    torch.save(sd, tmp_path / "legacy.pth")
    dst = create_encoder("resnet18_trunc", weights=tmp_path / "legacy.pth")
    assert dst.weights_info["missing"] == []
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(dst(x), src(x))
    # a real weight missing is still an error
    del sd["conv1.weight"]
    torch.save(sd, tmp_path / "broken.pth")
    with pytest.raises(WeightsMismatchError, match=r"conv1\.weight"):
        create_encoder("resnet18_trunc", weights=tmp_path / "broken.pth")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"<html>404 Not Found</html>\n", r"KeyError|UnpicklingError"),
        (bytes(range(256)) * 8, r"Unsupported operand|UnpicklingError"),
        (b"", r"the file is empty"),
        (b"PK\x03\x04 half a zip", r"RuntimeError"),
    ],
    ids=["text", "random-bytes", "empty", "truncated-zip"],
)
def test_non_checkpoint_file_is_named_as_such(tmp_path: Path, content: bytes, reason: str) -> None:
    path = tmp_path / "weights.pth"
    path.write_bytes(content)
    for trust in (False, True):
        with pytest.raises(WeightsError, match="is not a readable PyTorch checkpoint") as info:
            load_checkpoint(path, trust_pickle=trust)
        msg = str(info.value)
        assert str(path) in msg and "besides tensors" not in msg and "weights_only" not in msg
        assert re.search(reason, msg), msg
    # a truncated real checkpoint: also unreadable, not "Python objects"
    buf = io.BytesIO()
    torch.save(_tiny(0).state_dict(), buf)
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(WeightsError, match=r"weights\.pth is not a readable PyTorch checkpoint"):
        load_checkpoint(path)


def test_truncated_resnet_names_what_it_dropped(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from torchvision.models import resnet18

    from gigaslide.models.encoders.resnet import TruncatedResNet

    torch.manual_seed(0)
    full = resnet18()
    path = tmp_path / "resnet18.pth"
    torch.save(full.state_dict(), path)
    model = TruncatedResNet(resnet18())
    with caplog.at_level(logging.INFO, logger="gigaslide.models.weights"):
        info = load_weights(model, path)
    n_layer4 = sum(k.startswith("layer4.") for k in full.state_dict())
    assert sorted(info["dropped"]) == sorted(k for k in full.state_dict() if k.startswith(("layer4.", "fc.")))
    assert f"dropped layer4.* ({n_layer4} keys), fc.* (2 keys), declared unused" in caplog.text
    torch.testing.assert_close(model.layer3[0].conv1.weight, full.layer3[0].conv1.weight)


def test_declared_extras_kept_when_the_checkpoint_is_another_layout(tmp_path: Path) -> None:
    from torchvision.models import resnet18

    from gigaslide.models.encoders.resnet import TruncatedResNet

    sd = resnet18().state_dict()
    del sd["layer3.0.conv1.weight"]  # not this model's checkpoint: nothing may be dropped silently
    path = tmp_path / "other.pth"
    torch.save(sd, path)
    with pytest.raises(WeightsMismatchError) as err:
        load_weights(TruncatedResNet(resnet18()), path)
    msg = str(err.value)
    n_extra = sum(k.startswith(("layer4.", "fc.")) for k in sd)
    assert "1 missing keys [layer3.0.conv1.weight]" in msg
    assert f"{n_extra} unexpected keys [layer4.0" in msg and f"({n_extra} total)" in msg
