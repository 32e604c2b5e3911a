"""Attention and pooling blocks: each changes the model, keeps shapes, trains, and round-trips."""

from __future__ import annotations

import json

import pytest
import torch

from cnnkit.errors import ModelError
from cnnkit.models import create_model
from cnnkit.models.blocks import ATTENTION, POOLS, PowerMeanPool, SpatialPyramidPool

ATTN_TYPES = {"se": "SEModule", "cbam": "CbamModule", "eca": "EcaModule"}


def _types(model):
    return {type(m).__name__ for m in model.modules()}


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18"])
@pytest.mark.parametrize("attention", ATTENTION)
def test_attention_is_inserted_and_keeps_shapes(arch, attention):
    torch.manual_seed(0)
    plain = create_model(arch, 6, 3)
    model = create_model(arch, 6, 3, attention=attention)
    assert ATTN_TYPES[attention] in _types(model) and ATTN_TYPES[attention] not in _types(plain)
    assert sum(p.numel() for p in model.parameters()) > sum(p.numel() for p in plain.parameters())
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, 6)
    out.sum().backward()
    attn_params = [p for n, p in model.named_parameters() if any(k in n for k in ("fc1", "fc2", "conv", "se."))
                   and p.grad is not None]
    assert attn_params


@pytest.mark.parametrize("arch", ["smallcnn", "resnet18", "densenet121"])
@pytest.mark.parametrize("pool", POOLS)
def test_pooling_keeps_output_shape_and_changes_features(arch, pool):
    torch.manual_seed(0)
    model = create_model(arch, 4, 3, pool=pool).eval()
    x = torch.randn(2, 3, 64, 64)
    assert model(x).shape == (2, 4)
    emb = model.forward_head(model.forward_features(x), pre_logits=True)
    base = create_model(arch, 4, 3).eval()
    base.load_state_dict({k: v for k, v in model.state_dict().items() if k in base.state_dict()
                          and base.state_dict()[k].shape == v.shape}, strict=False)
    base_emb = base.forward_head(base.forward_features(x), pre_logits=True)
    assert emb.shape[1] == base_emb.shape[1] * (21 if pool == "spp" else 1)
    if pool != "avg":
        assert emb.shape != base_emb.shape or not torch.allclose(emb, base_emb)


def test_power_mean_pools_by_formula():
    x = torch.rand(2, 3, 5, 5) + 0.1
    lp = PowerMeanPool(3.0)(x)
    assert torch.allclose(lp, x.pow(3).mean((-2, -1)).pow(1 / 3), atol=1e-6)
    gem = PowerMeanPool(3.0, learnable=True)
    gem(x).sum().backward()
    assert gem.p.grad is not None and gem.p.grad.abs() > 0
    spp = SpatialPyramidPool()(x)
    assert spp.shape == (2, 3 * 21)
    assert torch.allclose(spp[:, :3], x.mean((-2, -1)), atol=1e-6)


def test_unsupported_combinations_are_one_sentence():
    with pytest.raises(ModelError, match="--attention is supported for smallcnn and the resnet family, not 'convnext_tiny'"):
        create_model("convnext_tiny", 3, attention="se")
    with pytest.raises(ModelError, match=r"--pool gem is not supported for 'MobileNetV3'"):
        create_model("mobilenet_v3_small", 3, pool="gem")
    with pytest.raises(ModelError, match="unknown pooling 'mean'"):
        create_model("smallcnn", 3, pool="mean")


def test_train_with_attention_and_gem_then_reload(cli, tmp_path):
    import cnnkit

    r = cli("classify", "train", "--data", "digits", "--epochs", "2", "--imgsz", "12", "--attention", "eca",
            "--pool", "gem", "--out", tmp_path / "run")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["top1"] > 0.8
    card = json.loads((tmp_path / "run" / "weights" / "best.json").read_text())
    assert card["model_kwargs"]["attention"] == "eca" and card["model_kwargs"]["pool"] == "gem"
    model = cnnkit.load(tmp_path / "run")
    assert "EcaModule" in _types(model.model) and "PowerMeanPool" in _types(model.model)
    assert cnnkit.val("classify", tmp_path / "run", "digits", verbose=False)["top1"] == pytest.approx(res["top1"], abs=1e-6)
