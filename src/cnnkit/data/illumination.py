"""Illumination normalization: the image made independent of how it was lit, before the network.

``--illumination`` at training time picks one; it is recorded in the model card
(``input.illumination``) and runs inside the model's core, after the pixels are scaled to
[0, 1] and before the mean/std normalization, in training and at inference alike (so predict,
val, serve and exported files apply it with no extra step, and corruptions are seen through it):

- ``standardize``: per-image standardization over all pixels and channels (TensorFlow's
  ``per_image_standardization``), mapped back to mean 0.5 and standard deviation 0.25: undoes
  a global change of brightness and contrast, keeps colour;
- ``grayworld``: gray-world colour constancy, each channel scaled so its mean is the mean over
  channels (Buchsbaum, 1980): undoes a colour cast from the light;
- ``equalize``: histogram equalization of the luma (each pixel's luma, in 256 levels, replaced
  by the share of the image's pixels at or below it; the channels scaled alike, so hue is
  kept): undoes a monotone change of the tone curve, gamma included.

All three work on batches ``(B, C, H, W)`` and single images ``(C, H, W)``, and export to ONNX.
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.core.choices import ILLUMINATION

EPS = 1e-6
BINS = 256  # equalize: luma histogram levels, as for 8-bit images


def illuminate(x: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` in [0, 1] (``(B, C, H, W)`` or ``(C, H, W)``) normalized for illumination by ``mode``."""
    if mode == "none":
        return x
    single = x.ndim == 3
    if single:
        x = x[None]
    if mode == "standardize":
        b = x.shape[0]
        flat = x.reshape(b, -1)
        mean = flat.mean(1).view(b, 1, 1, 1)
        std = flat.std(1, unbiased=False).clamp_min(1.0 / flat.shape[1] ** 0.5).view(b, 1, 1, 1)
        out = 0.5 + 0.25 * (x - mean) / std
    elif mode == "grayworld":
        means = x.mean((2, 3), keepdim=True)
        out = (x * (means.mean(1, keepdim=True) / means.clamp_min(EPS))).clamp(0, 1)
    elif mode == "equalize":
        b, c, h, w = x.shape
        luma = x.mean(1) if c != 3 else 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
        levels = (luma.reshape(b, -1) * (BINS - 1)).round().long().clamp(0, BINS - 1)
        counts = torch.zeros(b, BINS, dtype=x.dtype, device=x.device).scatter_add(1, levels, torch.ones_like(luma.reshape(b, -1)))
        cdf = counts.cumsum(1) / levels.shape[1]  # the share of pixels at or below each level
        new = cdf.gather(1, levels).view(b, 1, h, w)
        out = (x * (new / luma.view(b, 1, h, w).clamp_min(EPS))).clamp(0, 1)
    else:
        raise ValueError(f"illumination must be one of {', '.join(ILLUMINATION)}, got '{mode}'")
    return out[0] if single else out


class Illumination(nn.Module):
    """:func:`illuminate` as a module (inside the core) and as a transform (on one image)."""

    def __init__(self, mode: str):
        super().__init__()
        if mode not in ILLUMINATION:
            raise ValueError(f"illumination must be one of {', '.join(ILLUMINATION)}, got '{mode}'")
        self.mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return illuminate(x, self.mode)

    def extra_repr(self) -> str:
        return self.mode
