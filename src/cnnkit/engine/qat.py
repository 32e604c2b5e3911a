"""Quantization-aware training: ``train --init W --qat``.

The int8 model that ``cnnkit quantize`` writes (ONNX Runtime static QDQ) rounds two things:
every convolution's and linear layer's weights, to int8 with one symmetric scale per output
channel, and the activations they read, to uint8 with one scale and zero point per tensor.
QAT fine-tunes the trained float model with both roundings simulated in its forward pass
(fake quantization, the rounding's gradient taken as 1 inside the range: the straight-through
estimator), so the weights settle where rounding costs little:

- weights: ``torch.fake_quantize_per_channel_affine`` at ``max|w_c| / 64`` per output channel
  (the 7-bit weights ``cnnkit quantize`` writes by default; see ``methods.quantize``).
  Folding a BatchNorm into the convolution before it (as ORT's pre-processing does) scales each
  output channel by a constant, and symmetric per-channel rounding commutes with that, so the
  unfolded weights see the rounding the folded ones will get. With ``--qat-weights
  per-tensor`` the one scale is set on the folded weights (the BatchNorm's running statistics),
  as ORT will set it, and those BatchNorms keep their running statistics through the
  fine-tuning (see :func:`_frozen_statistics`);
- activations: ``torch.fake_quantize_per_tensor_affine`` over the running min/max (exponential
  average, 0 always inside) of each tensor, as min/max calibration sets them. ONNX Runtime's
  QDQ quantizer rounds every tensor between two quantized nodes, not only the inputs of
  convolutions, so the simulation rounds (:data:`REMOVABLE`, :data:`ACTIVATIONS`):

  - the input of every convolution and linear layer;
  - the output of every BatchNorm (the folded convolution's output) that no activation
    module follows, as it feeds a residual addition;
  - the input and output of every activation that stays a node of its own (Hardswish,
    Hardsigmoid, Sigmoid, SiLU, ...);
  - only the output of ReLU, ReLU6 and Hardtanh: ORT removes them and gives their range to the
    node before, so the convolution's output is rounded once, on ``[0, max]``.

  On a MobileNetV3 trained on digits, the logits of the int8 file are 14.3 dB from fp32 (SQNR);
  the simulation with these roundings 14.7 dB, with convolution inputs alone 16.6 dB (60% of
  the noise power).

The transform swaps each ``nn.Conv{1,2,3}d`` and ``nn.Linear`` for a subclass with that
forward and adds forward hooks to the BatchNorm and activation modules (:func:`prepare`);
parameters, buffers and ``state_dict`` keys do not change, so the weights the run saves are
an ordinary float model of the same architecture. After training the
workflow writes ``weights/best.int8.onnx`` with ``cnnkit quantize`` (per-channel, min/max,
calibrated on the train split) and reports its metric beside the float one.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError
from cnnkit.methods.quantize import WEIGHT_BITS

MOMENTUM = 0.05  # of the running activation range


class _Range:
    """The running min/max of one layer's input (uint8 per tensor)."""

    def __init__(self):
        self.lo: torch.Tensor | None = None
        self.hi: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, training: bool) -> torch.Tensor:
        if training or self.lo is None:
            with torch.no_grad():
                lo, hi = x.detach().min().clamp(max=0).float(), x.detach().max().clamp(min=0).float()
                if self.lo is None:
                    self.lo, self.hi = lo, hi
                else:
                    self.lo = self.lo.to(lo.device) * (1 - MOMENTUM) + lo * MOMENTUM
                    self.hi = self.hi.to(hi.device) * (1 - MOMENTUM) + hi * MOMENTUM
        lo, hi = self.lo.to(x.device), self.hi.to(x.device)
        scale = ((hi - lo) / 255).clamp(min=1e-8)
        zero = torch.round(-lo / scale).clamp(0, 255).to(torch.int32)
        return torch.fake_quantize_per_tensor_affine(x.float(), scale, zero, 0, 255).to(x.dtype)

    def __deepcopy__(self, memo):  # the EMA copy of the model gets its own range
        r = _Range()
        r.lo = None if self.lo is None else self.lo.clone()
        r.hi = None if self.hi is None else self.hi.clone()
        return r


def fake_weight(w: torch.Tensor, bits: int = WEIGHT_BITS, per_channel: bool = True,
                fold: torch.Tensor | None = None) -> torch.Tensor:
    """``w`` rounded with symmetric scales to the integers ORT writes: -64..64 for 7 bits
    (``cnnkit quantize``'s default), -127..127 for 8; one scale per output channel (dim 0), or
    one for the whole tensor.

    ``fold``: the factor per output channel that folding the next BatchNorm multiplies the
    weights by (``|gamma| / sqrt(var + eps)``). Per channel it does not matter (the rounding
    commutes with it); one scale per tensor is set on the folded weights, which is the scale
    ``s / fold_c`` per channel on the unfolded ones."""
    top = 64 if bits == 7 else 127
    peak = w.detach().abs().flatten(1).amax(1).float()
    if per_channel:
        scale = peak.clamp(min=1e-8) / top
    else:
        k = torch.ones_like(peak) if fold is None else fold.detach().float().abs().clamp(min=1e-12)
        scale = ((peak * k).max().clamp(min=1e-8) / top) / k
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -top, top).to(w.dtype)


def _fold(bn: nn.Module | None) -> torch.Tensor | None:
    """The factor per channel that folding ``bn`` into the layer before multiplies it by."""
    if bn is None or bn.running_var is None:
        return None
    k = torch.rsqrt(bn.running_var + bn.eps)
    return k * bn.weight if bn.weight is not None else k


def _frozen_statistics(module: nn.Module, args) -> None:
    """Per-tensor QAT: the BatchNorm normalizes with (and keeps) its running statistics, the
    ones ORT folds. Left to update, a channel whose rounded weights are all zero gets a running
    variance near 0, so its folding factor ``1 / sqrt(var + eps)`` explodes, sets the one scale
    of the whole tensor, and rounds every other channel to zero: the fine-tuning collapsed to
    chance on a MobileNetV3 that way."""
    module.training = False


def _qat_weight(layer: nn.Module) -> torch.Tensor:
    return fake_weight(layer.weight, per_channel=layer._qat_per_channel, fold=_fold(layer.__dict__.get("_qat_bn")))


class _QATConv:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._qat_input(x, self.training), _qat_weight(self), self.bias)


class QATConv1d(_QATConv, nn.Conv1d):
    pass


class QATConv2d(_QATConv, nn.Conv2d):
    pass


class QATConv3d(_QATConv, nn.Conv3d):
    pass


class QATLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._qat_input(x, self.training), _qat_weight(self), self.bias)


SWAPS = {nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d, nn.Linear: QATLinear}
REMOVABLE = (nn.ReLU, nn.ReLU6, nn.Hardtanh)  # ORT folds these into the range of the node before
ACTIVATIONS = (nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.SiLU, nn.GELU, nn.Mish, nn.Tanh, nn.LeakyReLU, nn.ELU)


def _round_output(module: nn.Module, args, output):
    return module._qat_output(output, module.training) if isinstance(output, torch.Tensor) else output


def _round_input(module: nn.Module, args):
    if args and isinstance(args[0], torch.Tensor):
        return (module._qat_act_input(args[0], module.training), *args[1:])
    return None


def _neighbours(model: nn.Module):
    """Every pair of modules registered one after the other under the same parent: the order
    ``Sequential`` runs and the usual ``conv, bn, act`` attribute order."""
    for parent in model.modules():
        yield from itertools.pairwise(parent.children())


def _activation_follows(model: nn.Module) -> set[int]:
    """``id`` of every BatchNorm that an activation module follows: the next module registered
    beside it (``Sequential`` and the usual ``conv, bn, act`` attribute order), or its own
    ``act`` (timm's ``BatchNormAct2d``)."""
    out = {id(a) for a, b in _neighbours(model)
           if isinstance(a, nn.modules.batchnorm._BatchNorm) and isinstance(b, REMOVABLE + ACTIVATIONS)}
    return out | {id(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                  and isinstance(getattr(m, "act", None), REMOVABLE + ACTIVATIONS)}


def _batchnorm_after(model: nn.Module) -> dict[int, nn.Module]:
    """``{id(conv): bn}`` for each convolution that a BatchNorm of its width follows (registered
    next to it: ``Sequential`` and the ``conv, bn`` attribute order), the pairs ORT folds."""
    return {id(a): b for a, b in _neighbours(model) if isinstance(a, nn.modules.conv._ConvNd)
            and isinstance(b, nn.modules.batchnorm._BatchNorm) and b.num_features == a.out_channels}


def prepare(model: nn.Module, per_channel: bool = True) -> nn.Module:
    """``model`` with fake quantization in every convolution and linear layer (in place; see
    the module docstring), weights rounded with one scale per output channel or, with
    ``per_channel=False``, one per (folded) tensor. Raises a one-sentence error when a layer
    has no int8 form here."""
    swapped, left = 0, []
    batchnorms = _batchnorm_after(model)
    for name, m in model.named_modules():
        if type(m) in SWAPS:
            if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and m.padding_mode != "zeros":
                raise CnnkitError(f"--qat cannot quantize layer '{name}' ({m.padding_mode} padding has no int8 "
                                  "convolution in ONNX Runtime)")
            m.__class__ = SWAPS[type(m)]
            m._qat_input = _Range()
            m._qat_per_channel = per_channel
            m.__dict__["_qat_bn"] = bn = batchnorms.get(id(m))  # not a submodule: state_dict keys stay the same
            if bn is not None and not per_channel:
                bn.register_forward_pre_hook(_frozen_statistics)
            swapped += 1
        elif isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and type(m) not in SWAPS.values():
            left.append(name)  # transposed or custom convolutions: trained in float, quantized as ORT can
    followed = _activation_follows(model)
    for m in model.modules():
        if isinstance(m, ACTIVATIONS):
            m._qat_act_input = _Range()
            m.register_forward_pre_hook(_round_input)
        if isinstance(m, REMOVABLE + ACTIVATIONS) or (isinstance(m, nn.modules.batchnorm._BatchNorm)
                                                      and id(m) not in followed):
            m._qat_output = _Range()
            m.register_forward_hook(_round_output)
    model._qat_float_layers = left
    if not swapped:
        raise CnnkitError("--qat found no convolution or linear layer to quantize in this model")
    return model


def release(model: nn.Module) -> nn.Module:
    """Undo :func:`prepare` (the float layers back, their weights as trained)."""
    back = {v: k for k, v in SWAPS.items()}
    for m in model.modules():
        if type(m) in back:
            m.__class__ = back[type(m)]
            del m._qat_input, m._qat_per_channel
            m.__dict__.pop("_qat_bn", None)
        for hooks, hook, attr in ((m._forward_pre_hooks, _frozen_statistics, None),
                                  (m._forward_pre_hooks, _round_input, "_qat_act_input"),
                                  (m._forward_hooks, _round_output, "_qat_output")):
            for key in [k for k, f in hooks.items() if f is hook]:
                del hooks[key]
            if attr and hasattr(m, attr):
                delattr(m, attr)
    return model
