"""Quantization-aware training: ``train --init W --qat``.

The int8 model that ``cnnkit quantize`` writes (ONNX Runtime static QDQ) rounds two things:
every convolution's and linear layer's weights, to int8 with one symmetric scale per output
channel, and the activations they read, to uint8 with one scale and zero point per tensor.
QAT fine-tunes the trained float model with both roundings simulated in its forward pass
(fake quantization, the rounding's gradient taken as 1 inside the range: the straight-through
estimator), so the weights settle where rounding costs little:

- weights: ``torch.fake_quantize_per_channel_affine`` at ``max|w_c| / 127`` per output channel.
  Folding a BatchNorm into the convolution before it (as ORT's pre-processing does) scales each
  output channel by a constant, and symmetric per-channel rounding commutes with that, so the
  unfolded weights see the rounding the folded ones will get;
- activations: ``torch.fake_quantize_per_tensor_affine`` over the running min/max (exponential
  average, 0 always inside) of each layer's input, as min/max calibration sets them.

The transform swaps each ``nn.Conv{1,2,3}d`` and ``nn.Linear`` for a subclass with that
forward (:func:`prepare`); parameters, buffers and ``state_dict`` keys do not change, so the
weights the run saves are an ordinary float model of the same architecture. After training the
workflow writes ``weights/best.int8.onnx`` with ``cnnkit quantize`` (per-channel, min/max,
calibrated on the train split) and reports its metric beside the float one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import CnnkitError

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


def fake_weight(w: torch.Tensor) -> torch.Tensor:
    """``w`` rounded to int8 with one symmetric scale per output channel (dim 0)."""
    scale = w.detach().abs().flatten(1).amax(1).float().clamp(min=1e-8) / 127
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w.float(), scale, zero, 0, -128, 127).to(w.dtype)


class _QATConv:
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self._qat_input(x, self.training), fake_weight(self.weight), self.bias)


class QATConv1d(_QATConv, nn.Conv1d):
    pass


class QATConv2d(_QATConv, nn.Conv2d):
    pass


class QATConv3d(_QATConv, nn.Conv3d):
    pass


class QATLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self._qat_input(x, self.training), fake_weight(self.weight), self.bias)


SWAPS = {nn.Conv1d: QATConv1d, nn.Conv2d: QATConv2d, nn.Conv3d: QATConv3d, nn.Linear: QATLinear}


def prepare(model: nn.Module) -> nn.Module:
    """``model`` with fake quantization in every convolution and linear layer (in place; see
    the module docstring). Raises a one-sentence error when a layer has no int8 form here."""
    swapped, left = 0, []
    for name, m in model.named_modules():
        if type(m) in SWAPS:
            if isinstance(m, nn.Conv2d | nn.Conv1d | nn.Conv3d) and m.padding_mode != "zeros":
                raise CnnkitError(f"--qat cannot quantize layer '{name}' ({m.padding_mode} padding has no int8 "
                                  "convolution in ONNX Runtime)")
            m.__class__ = SWAPS[type(m)]
            m._qat_input = _Range()
            swapped += 1
        elif isinstance(m, nn.modules.conv._ConvNd | nn.Linear) and type(m) not in SWAPS.values():
            left.append(name)  # transposed or custom convolutions: trained in float, quantized as ORT can
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
            del m._qat_input
    return model
