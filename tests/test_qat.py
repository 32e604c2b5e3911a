"""Quantization-aware training (`train --init W --qat`): the simulated rounding is the int8
grid, gradients pass through it, the saved weights stay an ordinary float model, and the run
writes an int8 ONNX file that reloads and validates."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import cnnkit
from cnnkit.engine.qat import fake_weight, prepare, release


@pytest.mark.parametrize("bits,top", [(7, 64), (8, 127)])
def test_fake_weights_sit_on_the_per_channel_int8_grid(bits, top):
    """The integers ORT writes: -64..64 with 7-bit weights (cnnkit quantize's default), -127..127."""
    torch.manual_seed(0)
    w = torch.randn(6, 3, 3, 3) * torch.tensor([0.01, 0.1, 1, 5, 20, 100]).view(6, 1, 1, 1)
    q = fake_weight(w, bits)
    scale = w.abs().flatten(1).amax(1) / top
    steps = q / scale.view(6, 1, 1, 1)
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= top + 0.001
    assert steps.abs().flatten(1).amax(1).round().eq(top).all()
    assert ((q - w).abs() <= scale.view(6, 1, 1, 1) / 2 + 1e-6).all()  # rounding, not truncation


def test_every_tensor_ort_quantizes_is_rounded():
    """BatchNorm outputs feeding an addition, both sides of a Hardswish, a ReLU's output (ORT
    folds the ReLU into the range before it, so the BatchNorm before a ReLU is not rounded)."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(),
                      nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8), nn.Hardswish(), nn.Conv2d(8, 8, 1), nn.BatchNorm2d(8))
    prepare(m)
    assert not hasattr(m[1], "_qat_output") and hasattr(m[2], "_qat_output")  # BN -> ReLU: once, after the ReLU
    assert not hasattr(m[4], "_qat_output")  # BN -> Hardswish: the Hardswish rounds its input
    assert hasattr(m[5], "_qat_act_input") and hasattr(m[5], "_qat_output") and hasattr(m[7], "_qat_output")
    seen = {}
    for i in (1, 5, 7):
        m[i].register_forward_hook(lambda mod, inp, out, i=i: seen.update({i: (inp[0], out)}))
    m.train()
    m(torch.rand(4, 3, 10, 10))
    assert len(torch.unique(seen[1][1])) > 256  # not rounded: the ReLU's output is
    for out in (seen[5][0], seen[5][1], seen[7][1]):  # hooks run in order: these see rounded tensors
        assert len(torch.unique(out.detach())) <= 256
    release(m)
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in m.modules() if mod not in (m[1], m[5], m[7]))
    assert not any(hasattr(mod, "_qat_output") or hasattr(mod, "_qat_act_input") for mod in m.modules())


def test_prepared_layers_round_their_inputs_and_pass_gradients():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    keys = list(m.state_dict())
    plain = copy.deepcopy(m)
    prepare(m)
    assert list(m.state_dict()) == keys  # the saved weights stay an ordinary float model
    x = torch.rand(16, 3, 8, 8)
    m.train()
    m(x).sum().backward()
    assert m[0].weight.grad.abs().sum() > 0 and m[4].weight.grad.abs().sum() > 0  # straight-through
    # the conv's input is rounded to at most 256 levels over its range, 0 exactly representable
    seen = {}
    m[0].register_forward_pre_hook(lambda mod, inp: seen.update(x=inp[0]))
    m.eval()
    with torch.no_grad():
        y = m(x)
        levels = m[0]._qat_input(seen["x"], False)
        plain.load_state_dict(m.state_dict())
        ref = plain.eval()(x)
    assert len(torch.unique(levels)) <= 256 and 0 < (y - ref).abs().max() < 0.1
    release(m)
    assert type(m[0]) is nn.Conv2d and not hasattr(m[0], "_qat_input")


def test_a_layer_without_an_int8_convolution_is_named():
    from cnnkit.errors import CnnkitError

    m = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"))
    with pytest.raises(CnnkitError, match=r"cannot quantize layer '1' \(reflect padding"):
        prepare(m)
    with pytest.raises(CnnkitError, match="no convolution or linear layer"):
        prepare(nn.Sequential(nn.ReLU()))


def test_per_tensor_weights_sit_on_one_grid_after_batchnorm_folding():
    """--qat-weights per-tensor: one scale for the folded weights (w * |gamma| / sqrt(var + eps)),
    the scale ORT sets after folding, so the folded simulated weights lie on one integer grid."""
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(3, 6, 3, bias=False), nn.BatchNorm2d(6)
    with torch.no_grad():
        conv.weight.mul_(torch.tensor([0.01, 0.1, 1, 5, 20, 100]).view(6, 1, 1, 1))
        bn.running_var.copy_(torch.tensor([0.5, 1, 2, 4, 8, 16.0]))
        bn.weight.copy_(torch.tensor([1, -2, 0.5, 3, 1, 0.1]))
    k = bn.weight.abs() / torch.sqrt(bn.running_var + bn.eps)
    folded = conv.weight * k.view(6, 1, 1, 1)
    for fold, ref in ((k, folded), (None, conv.weight)):
        q = fake_weight(conv.weight, per_channel=False, fold=fold)
        got = q * (1 if fold is None else k.view(6, 1, 1, 1))
        scale = ref.abs().max() / 64
        steps = got / scale
        assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 64.001
        assert ((got - ref).abs() <= scale / 2 + 1e-5).all()
    m = prepare(nn.Sequential(conv, bn, nn.ReLU()), per_channel=False)
    assert m[0].__dict__["_qat_bn"] is m[1] and "0._qat_bn.weight" not in m.state_dict()
    before = m[1].running_var.clone()
    m.train()(torch.rand(4, 3, 8, 8))
    assert torch.equal(m[1].running_var, before)  # the statistics ORT folds stay put
    release(m)
    assert not m[1]._forward_pre_hooks
    assert "_qat_bn" not in m[0].__dict__


def test_qat_fine_tunes_and_writes_an_int8_file_that_reloads(digits_run, cli, tmp_path):
    """Per-tensor here (per-channel, the default, runs in the README's command)."""
    r = cli("classify", "train", "--data", "digits", "--init", digits_run, "--qat", "--epochs", "1", "--lr", "1e-4",
            "--qat-weights", "per-tensor", "--out", tmp_path / "qat")
    assert r.code == 0, r.err
    res = json.loads((tmp_path / "qat" / "results.json").read_text())
    int8 = tmp_path / "qat" / res["int8"]["file"]
    assert int8.name == "best.int8.onnx" and int8.is_file()
    assert res["int8"]["val"]["top1"] >= res["top1"] - 0.02, res
    card = json.loads((tmp_path / "qat" / "weights" / "best.json").read_text())
    assert card["provenance"]["qat"] is True and card["provenance"]["qat_weights"] == "per-tensor"
    m = cnnkit.load(int8)
    assert m.backend.name == "onnx" and m.card.extra["quantized"]["per_channel"] is False
    again = cnnkit.val("classify", int8, "digits", verbose=False)
    assert again["top1"] == pytest.approx(res["int8"]["val"]["top1"], abs=1e-6)
    r = cli("classify", "train", "--data", "digits", "--qat", "--out", tmp_path / "x")
    assert r.code == 2 and "give them with --init" in r.err and r.err.count("\n") == 1
    r = cli("classify", "train", "--data", "digits", "--qat-weights", "per-tensor", "--out", tmp_path / "z")
    assert r.code == 2 and "--qat-weights needs --qat" in r.err and "Traceback" not in r.err
    r = cli("medical", "train", "--qat", "--out", tmp_path / "y")  # medical training takes no --init
    assert r.code == 2 and "No such option '--qat'" in r.err
