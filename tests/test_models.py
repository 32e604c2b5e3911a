"""Registry contract tests (every registered model) and factory errors."""

from __future__ import annotations

import pytest
import torch

from cnnkit.errors import ModelError
from cnnkit.models import create_model, list_models, register_model

ALL = list_models()


def test_registry_covers_required_families():
    for name in ("smallcnn", "resnet18", "resnet34", "resnet50", "mobilenet_v3_small",
                 "mobilenet_v3_large", "efficientnet_b0", "densenet121", "convnext_tiny"):
        assert name in ALL


@pytest.mark.parametrize("name", ALL)
def test_forward_shape_and_gradients(name):
    torch.manual_seed(0)
    in_chans = 1 if name == "smallcnn" else 3
    model = create_model(name, num_classes=7, in_chans=in_chans)
    x = torch.randn(2, in_chans, 64, 64)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    no_grad = [n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not no_grad, f"parameters without a finite gradient: {no_grad[:5]}"
    # (timm zero-initialises the last norm of each residual block, so some gradients are 0 at
    # init; every parameter must still be connected to the output)


@pytest.mark.parametrize("name", ["smallcnn", "resnet18", "mobilenet_v3_small"])
def test_classifier_interface(name):
    model = create_model(name, num_classes=5, in_chans=3).eval()
    x = torch.randn(1, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.ndim == 4
    emb = model.forward_head(feats, pre_logits=True)
    assert emb.ndim == 2 and emb.shape[0] == 1
    model.reset_classifier(11)
    assert model(x).shape == (1, 11)


def test_grayscale_input():
    assert create_model("resnet18", 3, in_chans=1).eval()(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def test_unknown_model_suggests_close_names():
    with pytest.raises(ModelError, match=r"unknown model 'resnet19'; did you mean 'resnet18'"):
        create_model("resnet19", 10)


def test_duplicate_registration_is_an_error():
    with pytest.raises(ValueError, match="already registered"):
        register_model(lambda **kw: None, name="smallcnn")


def test_pretrained_offline_is_one_sentence(monkeypatch):
    import cnnkit.models.timm_models as tm

    monkeypatch.setattr(tm, "HUB_HOST", ("127.0.0.1", 9))  # nothing listens there
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelError, match=r"^pretrained weights for 'resnet18.tv_in1k' need a download and there is no network; start from local weights with --init PATH"):
        create_model("resnet18", 10, pretrained=True)


def test_smallcnn_has_no_pretrained_weights():
    with pytest.raises(ModelError, match="no published pretrained weights"):
        create_model("smallcnn", 10, pretrained=True)


def test_timm_passthrough():
    m = create_model("timm:resnet10t", 4, in_chans=3).eval()
    assert m(torch.randn(1, 3, 32, 32)).shape == (1, 4)
    with pytest.raises(ModelError, match="timm has no model 'nonexistent_net'"):
        create_model("timm:nonexistent_net", 4)
