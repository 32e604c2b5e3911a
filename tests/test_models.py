"""Registry contract tests (every registered model of every task, timm's tests/test_models.py
style) and factory errors."""

from __future__ import annotations

import pytest
import torch

from cnnkit.errors import ModelError
from cnnkit.models import create_model, list_models, register_model

ALL = list_models(task="classify")
EVERY = list_models()


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


# ---- every family, through its task pipeline: the contract export, CAM and distillation rely on ----
def _card(name: str):
    from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
    from cnnkit.models.registry import model_entry

    task = model_entry(name).task
    if task == "classify":
        chans = 1 if name == "smallcnn" else 3
        return ModelCard("classify", name, ["a", "b", "c"], InputSpec(32, 32, chans, mean=(0.5,) * chans,
                                                                      std=(0.25,) * chans))
    if task in ("detect", "instance"):
        kwargs = {"imgsz": 64, **({"width": 8} if name == "fastdet" else {})}
        names = ("scores", "boxes") if name == "fastdet" else ("boxes", "scores", "labels") + (
            ("masks",) if task == "instance" else ())
        return ModelCard(task, name, ["a", "b"], InputSpec(64, 64, 3, "letterbox"),
                         OutputSpec(names, "fastdet" if name == "fastdet" else "detections"), kwargs,
                         {"iou": 0.6, "nms": "hard", "max_det": 100})
    if task == "segment":
        return ModelCard("segment", name, ["bg", "a", "b"], InputSpec(64, 64, 3), OutputSpec(("logits",), "seg-logits"),
                         {"encoder": "smallcnn"})
    classify = name.startswith("densenet")
    return ModelCard("medical", name, ["bg", "a"], InputSpec(32, 32, 1, "volume" if classify else "sliding3d",
                                                             value_range=None, normalize="zscore", dims=3),
                     OutputSpec(("logits",), "softmax" if classify else "volume-logits"),
                     extra={"head": "classify" if classify else "segment"})


def _train_loss(card, model, x):
    """A scalar reaching every parameter: the task's own losses for detectors (they need
    targets), the sum of squared core outputs otherwise."""
    from cnnkit.runtime.pipeline import pipeline_for

    if card.task in ("detect", "instance"):
        t = {"boxes": torch.tensor([[8.0, 10.0, 40.0, 44.0]]), "labels": torch.tensor([1])}
        if card.task == "instance":
            t["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8)
            t["masks"][0, 10:44, 8:40] = 1
        from cnnkit.tasks.detect.losses import FastDetLoss
        from cnnkit.tasks.detect.task import DetectTask

        task = DetectTask(card.classes, masks=card.task == "instance",
                          loss=FastDetLoss.for_model(model) if card.arch == "fastdet" else None)
        batch = {"images": x, "targets": [dict(t) for _ in range(len(x))]}
        return task.loss(task.forward(model, batch), batch)["loss"]
    return sum(o.float().square().mean() for o in pipeline_for(card).core(model)(x))


@pytest.mark.parametrize("name", EVERY)
def test_every_family_meets_the_pipeline_contract(name, tmp_path):
    """Forward shapes and finite outputs, a gradient for every parameter, named feature stages
    that all run, and ONNX parity of the core (fp32, 1e-4)."""
    from cnnkit.methods.export import _export_onnx, max_difference
    from cnnkit.runtime.backend import OrtBackend
    from cnnkit.runtime.pipeline import pipeline_for

    torch.manual_seed(0)
    card = _card(name)
    pipe = pipeline_for(card)
    model = pipe.build()
    x = pipe.example_input(2)
    model.train()
    _train_loss(card, model, x).backward()
    # a backbone inside a detector or segmenter keeps its classifier head (for --init by name) but never
    # runs it: the classifier and timm's layers after the last stage (mobilenetv3's conv_head)
    unused = {id(p) for n, m in model.named_modules() if n and hasattr(m, "get_classifier")
              for part in (m.get_classifier(), getattr(m, "conv_head", None), getattr(m, "norm_head", None))
              if isinstance(part, torch.nn.Module) for p in part.parameters()}
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in unused
               and (p.grad is None or not torch.isfinite(p.grad).all())]
    assert not missing, f"parameters without a finite gradient: {missing[:5]}"
    model.eval()
    stages = pipe.feature_layers(model)
    assert stages, "no named feature stages"
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o, n=n: seen.append(n)) for n, m in stages.items()]
    core = pipe.core(model).eval()
    x = pipe.example_input(1 if pipe.fixed_batch else 2)
    with torch.no_grad():
        out = core(x)
    for h in handles:
        h.remove()
    assert set(seen) == set(stages), set(stages) - set(seen)
    out = out if isinstance(out, tuple) else (out,)
    assert len(out) == len(card.output.names) and all(torch.isfinite(o.float()).all() for o in out)
    if card.task in ("classify", "medical") and card.head == "classify":
        assert out[0].shape == (len(x), card.num_classes)
    elif card.task in ("segment", "medical"):
        assert out[0].shape == (len(x), card.num_classes, *x.shape[2:])
    path = tmp_path / "core.onnx"
    _export_onnx(core, x, path, card, False, 17, not pipe.fixed_batch)
    ort = OrtBackend(path)
    assert max_difference(out, ort(x)) <= 1e-4
    if not pipe.fixed_batch:  # the exported batch dimension is dynamic: three samples at once
        x3 = torch.cat([x, x[:1]]) if len(x) == 2 else x.repeat(3, *[1] * (x.ndim - 1))
        with torch.no_grad():
            out3 = core(x3)
        assert max_difference(out3 if isinstance(out3, tuple) else (out3,), ort(x3)) <= 1e-4
