"""Encoder registry: every encoder's contract, references for the truncated ResNets, the weights registry."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from gigaslide.models.encoders import (
    EncoderMeta,
    create_encoder,
    get_encoder_meta,
    list_encoders,
    register_encoder,
)
from gigaslide.models.encoders import registry as registry_mod
from gigaslide.models.weights import WeightsMismatchError
from gigaslide.models.weights_registry import WeightsRegistryError, read_registry

TIMM_NAMES = ["timm:vit_tiny_patch16_224", "timm:resnet18"]
ALL_NAMES = list_encoders() + TIMM_NAMES
# small inputs keep the CPU cost low; the ViTs need their native grid or a multiple of 16
TEST_SIZE = {"hipt_vit256": 256, "timm:vit_tiny_patch16_224": 224}


@pytest.fixture(autouse=True)
def _isolated_registry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    yml = tmp_path / "weights.yaml"
    monkeypatch.setenv("GIGASLIDE_WEIGHTS", str(yml))
    return yml


def test_registered_names() -> None:
    assert {"hipt_vit256", "resnet50_trunc", "resnet18_trunc"} <= set(list_encoders())


@pytest.mark.parametrize("name", ALL_NAMES)
def test_encoder_contract(name: str) -> None:
    torch.manual_seed(0)
    enc = create_encoder(name, weights="random")
    meta = enc.meta
    assert isinstance(meta, EncoderMeta) and meta == get_encoder_meta(name)
    assert enc.weights_info == {"random_init": True}
    assert not enc.training  # returned ready for feature extraction
    size = TEST_SIZE.get(name, 64)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        out = enc(x)
        single = enc(x[1:2])
    assert out.shape == (2, meta.embed_dim) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[1:2], single, atol=1e-5, rtol=1e-5)  # batch independence
    assert not torch.allclose(out[0], out[1])  # different inputs, different embeddings
    torch.manual_seed(0)
    again = create_encoder(name, weights="random")
    with torch.no_grad():
        torch.testing.assert_close(again(x), out, atol=0, rtol=0)  # deterministic given the seed
    enc.train()
    enc(x).pow(2).mean().backward()
    grads = [p.grad for p in enc.parameters() if p.requires_grad]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_meta_is_frozen_and_serialisable() -> None:
    meta = get_encoder_meta("hipt_vit256")
    with pytest.raises(dataclasses.FrozenInstanceError):
        meta.embed_dim = 1  # type: ignore[misc]
    d = meta.to_dict()
    assert d["embed_dim"] == 384 and d["mean"] == [0.5, 0.5, 0.5] and d["mpp"] == 0.5
    assert get_encoder_meta("resnet50_trunc").embed_dim == 1024
    assert get_encoder_meta("resnet18_trunc").embed_dim == 256


def test_hipt_vit256_architecture_and_attention() -> None:
    torch.manual_seed(0)
    enc = create_encoder("hipt_vit256", weights="random")
    assert len(enc.blocks) == 12 and enc.blocks[0].attn.num_heads == 6
    assert enc.pos_embed.shape == (1, 197, 384) and enc.blocks[0].mlp.fc1.out_features == 1536
    assert enc.norm.eps == 1e-6 and enc.blocks[0].attn.qkv.bias is not None
    x = torch.randn(1, 3, 256, 256)
    with torch.no_grad():
        tokens = enc.forward_features(x)
        attn = enc.get_last_selfattention(x)
        assert tokens.shape == (1, 257, 384)
        torch.testing.assert_close(tokens[:, 0], enc(x))
        assert attn.shape == (1, 6, 257, 257)
        torch.testing.assert_close(attn.sum(-1), torch.ones(1, 6, 257))
        assert enc(torch.randn(1, 3, 224, 224)).shape == (1, 384)


def test_hipt_vit256_equals_timm_vit_small() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    enc = create_encoder("hipt_vit256", weights="random")
    ref = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
    ref.load_state_dict(enc.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)  # the learned 14x14 grid: no interpolation on either side
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x), atol=1e-5, rtol=1e-5)


def _torchvision_layer3_pooled(full: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    h = full.maxpool(full.relu(full.bn1(full.conv1(x))))
    h = full.layer3(full.layer2(full.layer1(h)))
    return h.mean(dim=(2, 3))


@pytest.mark.parametrize(
    ("name", "arch", "dim"), [("resnet50_trunc", "resnet50", 1024), ("resnet18_trunc", "resnet18", 256)]
)
def test_trunc_resnet_loads_full_torchvision_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, name: str, arch: str, dim: int
) -> None:
    import torchvision

    torch.manual_seed(3)
    full = getattr(torchvision.models, arch)(weights=None)
    with torch.no_grad():  # non-trivial BN statistics so eval-mode BN matters
        for m in full.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    full.eval()
    path = tmp_path / f"{arch}.pth"
    torch.save(full.state_dict(), path)
    with caplog.at_level(logging.DEBUG, logger="gigaslide.models.weights"):
        enc = create_encoder(name, weights=path)
    assert "dropped layer4.* (" in caplog.text and "fc.* (2 keys), declared unused" in caplog.text
    dropped = enc.weights_info["dropped"]
    assert dropped and all(k.startswith(("layer4.", "fc.")) for k in dropped)
    assert {"fc.weight", "fc.bias"} <= set(dropped)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = enc(x)
        assert out.shape == (2, dim)
        torch.testing.assert_close(out, _torchvision_layer3_pooled(full, x), atol=1e-5, rtol=1e-5)
        fmap = enc.trunk(x)
        assert fmap.shape == (2, dim, 4, 4)
        torch.testing.assert_close(fmap.mean(dim=(2, 3)), out, atol=1e-6, rtol=1e-6)
    assert all(k.split(".")[0] in {"conv1", "bn1", "layer1", "layer2", "layer3"} for k in enc.state_dict())


def test_trunc_resnet_only_drops_documented_prefixes(tmp_path: Path) -> None:
    import torchvision

    sd = torchvision.models.resnet18(weights=None).state_dict()
    sd["layer5.0.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "r18.pth")
    # not the declared layout (a full ResNet): nothing is dropped and the odd key is listed first
    with pytest.raises(WeightsMismatchError, match=r"33 unexpected keys \[layer5.0.weight, layer4.0"):
        create_encoder("resnet18_trunc", weights=tmp_path / "r18.pth")


def test_timm_classifier_checkpoint_loads_into_pooled_encoder(tmp_path: Path) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    full = timm.create_model("resnet18", pretrained=False).eval()  # with its 1000-class fc
    torch.save(full.state_dict(), tmp_path / "r18.pth")
    enc = create_encoder("timm:resnet18", weights=tmp_path / "r18.pth")
    assert sorted(enc.weights_info["dropped"]) == ["fc.bias", "fc.weight"]
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), full.forward_head(full.forward_features(x), pre_logits=True))


def test_timm_errors() -> None:
    with pytest.raises(ValueError, match="timm has no architecture 'no_such_net'"):
        get_encoder_meta("timm:no_such_net")
    with pytest.raises(ValueError, match="global_pool='token'"):
        create_encoder("timm:vit_tiny_patch16_224", weights="random", global_pool="")
    enc = create_encoder("timm:vit_tiny_patch16_224", weights="random", img_size=64)
    assert enc.meta.input_size == 64 and enc(torch.randn(1, 3, 64, 64)).shape == (1, 192)


def test_unknown_encoder_names_the_options() -> None:
    with pytest.raises(ValueError, match=r"unknown encoder 'nope'.*hipt_vit256.*timm:<architecture>"):
        create_encoder("nope")
    with pytest.raises(ValueError, match="unknown encoder"):
        get_encoder_meta("nope")


def test_register_encoder_rejects_duplicates_and_reserved_names() -> None:
    meta = dataclasses.replace(get_encoder_meta("resnet18_trunc"), name="test_tmp_encoder")
    try:
        register_encoder(meta)(lambda **kw: torch.nn.Identity())
        assert "test_tmp_encoder" in list_encoders()
        with pytest.raises(ValueError, match="already registered"):
            register_encoder(meta)(lambda **kw: torch.nn.Identity())
    finally:
        registry_mod._REGISTRY.pop("test_tmp_encoder", None)
    with pytest.raises(ValueError, match="reserved"):
        register_encoder(dataclasses.replace(meta, name="timm:x"))


def test_random_init_warns_loudly(caplog: pytest.LogCaptureFixture, _isolated_registry: Path) -> None:
    with caplog.at_level(logging.WARNING):
        enc = create_encoder("resnet18_trunc")
    assert enc.weights_info == {"random_init": True}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert any(
        "RANDOM weights" in r.getMessage() and str(_isolated_registry) in r.getMessage() for r in warnings
    )


def test_registry_entry_used_when_weights_none(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, _isolated_registry: Path
) -> None:
    import torchvision

    torch.manual_seed(1)
    full = torchvision.models.resnet18(weights=None).eval()
    (tmp_path / "w").mkdir()
    torch.save(full.state_dict(), tmp_path / "w" / "r18.pth")
    _isolated_registry.write_text("resnet18_trunc: w/r18.pth  # relative to the YAML\n")
    with caplog.at_level(logging.INFO):
        enc = create_encoder("resnet18_trunc")
    assert "RANDOM" not in caplog.text and "r18.pth" in caplog.text
    assert enc.weights_info["file"] == str((tmp_path / "w" / "r18.pth").resolve())
    assert (
        create_encoder("resnet18_trunc", weights="registry").weights_info["sha256"]
        == enc.weights_info["sha256"]
    )
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), _torchvision_layer3_pooled(full, x), atol=1e-5, rtol=1e-5)
    # weights="random" ignores the registry (and still warns)
    assert create_encoder("resnet18_trunc", weights="random").weights_info == {"random_init": True}


def test_registry_errors_name_yaml_and_entry(tmp_path: Path, _isolated_registry: Path) -> None:
    with pytest.raises(WeightsRegistryError, match=r"'hipt_vit256'.*weights.yaml does not exist"):
        create_encoder("hipt_vit256", weights="registry")
    _isolated_registry.write_text("resnet18_trunc: /nonexistent/r18.pth\n")
    with pytest.raises(
        WeightsRegistryError, match=r"weights.yaml: entry 'resnet18_trunc' points to /nonexistent"
    ):
        create_encoder("resnet18_trunc")
    with pytest.raises(WeightsRegistryError, match=r"has no such entry.*'hipt_vit256: /path/to/weights'"):
        create_encoder("hipt_vit256", weights="registry")
    _isolated_registry.write_text("- just\n- a list\n")
    with pytest.raises(WeightsRegistryError, match="must be a mapping"):
        read_registry()
    _isolated_registry.write_text("hipt_vit256: 3\n")
    with pytest.raises(WeightsRegistryError, match="entry 'hipt_vit256' must be a path"):
        read_registry()


def test_registry_expands_env_and_home(
    monkeypatch: pytest.MonkeyPatch, _isolated_registry: Path, tmp_path: Path
) -> None:
    monkeypatch.setenv("MY_WEIGHTS", str(tmp_path))
    _isolated_registry.write_text('"timm:resnet18": $MY_WEIGHTS/r.pth\nhipt_vit256: ~/h.pth\n')
    entries = read_registry()
    assert entries["timm:resnet18"] == tmp_path / "r.pth"
    assert entries["hipt_vit256"] == Path("~/h.pth").expanduser()
