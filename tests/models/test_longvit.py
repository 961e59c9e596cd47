"""LongViT: schedules, encoder layer formula, the image slide model, checkpoint layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gigaslide.models.layers.longnet import LongNetEncoder
from gigaslide.models.layers.longnet_schedule import (
    DILATED_RATIOS,
    gigapath_segment_lengths,
    longvit_schedule,
)
from gigaslide.models.slide import create_slide_model, get_slide_model_info
from gigaslide.models.slide.longvit_weights import (
    gigapath_encoder_config,
    gigapath_encoder_state,
    load_longvit_weights,
    longvit_checkpoint_filter,
)
from gigaslide.models.weights import WeightsMismatchError

torch.set_num_threads(1)
TINY = dict(
    img_size=128, embed_dim=32, depth=2, num_heads=4, segment_lengths=(4, 8, 16), dilated_ratios=(1, 2, 4)
)


def tiny(n_classes: int = 3, seed: int = 0, **kw):
    torch.manual_seed(seed)
    return create_slide_model("longvit", in_dim=3, n_classes=n_classes, **{**TINY, **kw})


def test_table7_schedules_and_gigapath_rule():
    assert longvit_schedule(1024) == ((64, 128, 256, 512, 1024), (1, 2, 4, 8, 16))
    assert longvit_schedule(4096)[0] == (1024, 2048, 4096, 8192, 16384)
    assert longvit_schedule(8192)[0] == (1024, 4096, 8192, 16384, 65536)
    assert longvit_schedule(16384)[0] == (1024, 4096, 16384, 65536, 262144)
    assert longvit_schedule(32768)[0] == (1024, 4096, 32768, 262144, 1048576)
    assert DILATED_RATIOS == (1, 2, 4, 8, 16)
    assert longvit_schedule(2048) == longvit_schedule(1024)  # the reference's fallback
    with pytest.raises(ValueError, match="known sizes: 1024, 4096"):
        longvit_schedule(2048, strict=True)
    assert gigapath_segment_lengths(262144, 256) == (1024, 5792, 32768, 185363, 1048576)


def test_encoder_layer_matches_torchscale_formula_with_dense_schedule():
    """With one (w >= N, r = 1) pair a LongNet layer is a pre-norm layer with sub-LayerNorms."""
    torch.manual_seed(0)
    enc = LongNetEncoder(16, 1, 4, 40, segment_lengths=(64,), dilated_ratios=(1,)).eval()
    for p in enc.parameters():
        torch.nn.init.normal_(p, std=0.3)
    layer = enc.layers[0]
    a = layer.self_attn
    x = torch.randn(2, 11, 16)
    h = F.layer_norm(x, (16,), layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias, 1e-5)
    q, k, v = (
        F.linear(h, m.weight, m.bias).view(2, 11, 4, 4).transpose(1, 2)
        for m in (a.q_proj, a.k_proj, a.v_proj)
    )
    att = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1) @ v
    att = att.transpose(1, 2).reshape(2, 11, 16)
    att = F.layer_norm(att, (16,), a.inner_attn_ln.weight, a.inner_attn_ln.bias, 1e-5)
    x1 = x + F.linear(att, a.out_proj.weight, a.out_proj.bias)
    f = layer.ffn
    h = F.layer_norm(x1, (16,), layer.final_layer_norm.weight, layer.final_layer_norm.bias, 1e-5)
    h = F.gelu(F.linear(h, f.fc1.weight, f.fc1.bias))
    h = F.layer_norm(h, (40,), f.ffn_layernorm.weight, f.ffn_layernorm.bias, 1e-5)
    ref = x1 + F.linear(h, f.fc2.weight, f.fc2.bias)
    torch.testing.assert_close(enc(x), ref, rtol=1e-5, atol=1e-5)


def test_registry_entry_and_default_vit_s_layout():
    info = get_slide_model_info("longvit")
    assert info.input_kind == "image" and not info.produces_attention
    model = create_slide_model("longvit", in_dim=3, n_classes=0, depth=12)
    n_params = sum(p.numel() for p in model.parameters())
    layer = model.encoder.layers[0]
    assert model.embed_dim == 384 and len(model.encoder.layers) == 12
    assert layer.self_attn.num_heads == 16 and layer.ffn.fc1.out_features == 1536
    assert model.patch_embed.proj.kernel_size == (32, 32) and model.pos_embed.shape == (1, 1024, 384)
    assert layer.self_attn.segment_lengths == (64, 128, 256, 512, 1024)
    assert 21e6 < n_params < 23e6  # ViT-S with sub-LayerNorms


def test_forward_backward_embedding_only_and_determinism():
    model = tiny().train()
    x = torch.randn(2, 3, 128, 128)
    out = model(x)
    assert out.logits.shape == (2, 3) and out.embedding.shape == (2, 32) and out.attention is None
    F.cross_entropy(out.logits, torch.tensor([0, 2])).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    emb_only = tiny(n_classes=0).eval()
    o = emb_only(x)
    assert o.logits.shape == (2, 0) and o.embedding.shape == (2, 32)
    torch.testing.assert_close(tiny(n_classes=0).eval()(x).embedding, o.embedding, rtol=0, atol=0)


def test_position_embeddings_interpolated_for_other_grids():
    model = tiny().eval()
    out = model(torch.randn(1, 3, 192, 96))  # 6 x 3 tokens from a 4 x 4 table
    assert out.logits.shape == (1, 3)
    with pytest.raises(ValueError, match="multiple of the patch size 32"):
        model(torch.randn(1, 3, 100, 128))


def test_token_mask_hides_masked_patches():
    model = tiny().eval()
    x = torch.randn(1, 3, 128, 128)
    mask = torch.ones(1, 4, 4, dtype=torch.bool)
    mask[0, 2:, :] = False
    y = model(x, mask=mask).embedding
    x2 = x.clone()
    x2[..., 64:, :] = 50.0  # change only the masked patches
    torch.testing.assert_close(model(x2, mask=mask).embedding, y)
    assert not torch.allclose(model(x2).embedding, model(x).embedding)
    with pytest.raises(ValueError, match="token mask must have shape"):
        model(x, mask=torch.ones(1, 3, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no token in the mask"):
        model(x, mask=torch.zeros(1, 4, 4, dtype=torch.bool))


def test_activation_checkpointing_gives_the_same_gradients():
    x = torch.randn(1, 3, 128, 128)
    grads = []
    for ckpt in (False, True):
        model = tiny(checkpoint_activations=ckpt).train()
        model(x).logits.sum().backward()
        grads.append(model.encoder.layers[0].self_attn.q_proj.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def _reference_finetuned_sd(model):
    sd = {}
    for k, v in model.state_dict().items():
        sd[k if k.startswith(("fc_norm.", "head.")) else f"model.{k}"] = v.clone()
    return sd


def test_loads_finetuned_layout_strictly(tmp_path):
    src = tiny(seed=1).eval()
    path = tmp_path / "mp_rank_00_model_states.pt"
    torch.save({"module": _reference_finetuned_sd(src)}, path)
    dst = tiny(seed=2).eval()
    report = load_longvit_weights(dst, path)
    assert len(report["sha256"]) == 64
    x = torch.randn(1, 3, 128, 128)
    torch.testing.assert_close(dst(x).logits, src(x).logits, rtol=0, atol=0)


def test_loads_dino_pretraining_layout_with_pos_embed_resize(tmp_path):
    torch.manual_seed(3)
    src = tiny(n_classes=0, pooling_norm="norm", img_size=64)  # 2 x 2 pretraining grid
    teacher = {f"backbone.{k}": v for k, v in src.state_dict().items()}
    teacher["head.mlp.0.weight"] = torch.randn(8, 32)
    teacher["head.last_layer.weight_g"] = torch.ones(16, 1)
    path = tmp_path / "longvit_small_patch32_1024.pth"
    torch.save({"teacher": teacher, "student": teacher}, path)
    dst = tiny(n_classes=2)
    with pytest.raises(WeightsMismatchError, match=r"fc_norm.*init_new_head=True"):
        load_longvit_weights(dst, path)
    load_longvit_weights(dst, path, init_new_head=True)
    expected = F.interpolate(
        src.pos_embed.reshape(1, 2, 2, 32).permute(0, 3, 1, 2),
        size=(4, 4),
        mode="bicubic",
        align_corners=False,
    )
    torch.testing.assert_close(dst.pos_embed, expected.permute(0, 2, 3, 1).reshape(1, 16, 32))
    torch.testing.assert_close(dst.encoder.layers[1].ffn.fc2.weight, src.encoder.layers[1].ffn.fc2.weight)
    assert torch.equal(dst.fc_norm.weight, torch.ones(32))
    # the pretraining layout itself (token norm before the mean) loads strictly and reproduces src
    same = tiny(n_classes=0, pooling_norm="norm", img_size=64, seed=9)
    load_longvit_weights(same, path)
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(same.eval()(x).embedding, src.eval()(x).embedding, rtol=0, atol=0)


def test_unknown_layout_is_named():
    with pytest.raises(WeightsMismatchError, match="not a LongViT layout"):
        longvit_checkpoint_filter({"blocks.0.attn.qkv.weight": torch.zeros(1)}, tiny())


def test_gigapath_encoder_layout_loads_into_longnet_encoder():
    torch.manual_seed(4)
    ref = LongNetEncoder(24, 2, 4, 96, (1024, 5792), (1, 2), normalize_output=True)
    ckpt = {f"encoder.{k}": v for k, v in ref.state_dict().items()}
    ckpt.update(
        {
            "patch_embed.proj.weight": torch.zeros(24, 48),
            "cls_token": torch.zeros(1, 1, 24),
            "norm.weight": torch.ones(24),
        }
    )
    cfg = gigapath_encoder_config(ckpt)
    assert cfg == {"dim": 24, "depth": 2, "ffn_dim": 96, "normalize_output": True}
    enc = LongNetEncoder(
        cfg["dim"], cfg["depth"], 4, cfg["ffn_dim"], (1024, 5792), (1, 2), normalize_output=True
    )
    enc.load_state_dict(gigapath_encoder_state(ckpt), strict=True)
    x = torch.randn(1, 9, 24)
    torch.testing.assert_close(enc.eval()(x), ref.eval()(x), rtol=0, atol=0)
    with pytest.raises(WeightsMismatchError, match="not a Prov-GigaPath"):
        gigapath_encoder_state({"blocks.0.x": torch.zeros(1)})
