"""The corruptions beyond ImageNet-C, cnnkit's own: occlusion and three changes of the light.

Kernels with the signature of :mod:`cnnkit.methods.corruptions` (images ``(B, C, H, W)`` in
[0, 1], a severity 1-5, a CPU ``torch.Generator``), which lists them with the 15 of ImageNet-C
and documents each.
"""

from __future__ import annotations

import math

import numpy as np
import torch

OCCLUDED = [0.10, 0.25, 0.40, 0.55, 0.70]


def occlusion(x: torch.Tensor, s: int, g: torch.Generator, boxes: list[torch.Tensor] | None = None) -> torch.Tensor:
    """One mid-grey rectangle per object covering ``OCCLUDED[s - 1]`` of its box (aspect
    ratio drawn between 1:2 and 2:1, kept inside the box); without boxes the object is the
    whole image."""
    x = x.clone()
    b, _c, h, w = x.shape
    share = OCCLUDED[s - 1]
    for i in range(b):
        objs = boxes[i] if boxes is not None and len(boxes[i]) else torch.tensor([[0.0, 0.0, w, h]])
        for x1, y1, x2, y2 in objs.tolist():
            bw, bh = max(1.0, x2 - x1), max(1.0, y2 - y1)
            aspect = math.exp((float(torch.rand(1, generator=g)) * 2 - 1) * math.log(2))
            rw = min(bw, math.sqrt(share * bw * bh * aspect))
            rh = min(bh, share * bw * bh / rw)
            rw = min(bw, share * bw * bh / rh)
            left = x1 + float(torch.rand(1, generator=g)) * (bw - rw)
            top = y1 + float(torch.rand(1, generator=g)) * (bh - rh)
            c0, c1 = max(0, round(left)), min(w, round(left + rw))
            r0, r1 = max(0, round(top)), min(h, round(top + rh))
            x[i, :, r0:r1, c0:c1] = 0.5
    return x


def gamma(x, s, g):
    return x.clamp_min(0) ** [1.5, 2.0, 2.5, 3.0, 3.5][s - 1]


def shadow(x, s, g):
    """A straight shadow edge through a random point at a random angle; the shadowed side
    keeps ``[0.7, 0.55, 0.4, 0.3, 0.2]`` of its light, over a soft edge 5% of the size wide."""
    keep = [0.7, 0.55, 0.4, 0.3, 0.2][s - 1]
    b, _c, h, w = x.shape
    r = torch.rand(b, 3, generator=g)
    px, py, theta = r[:, 0] * w, r[:, 1] * h, r[:, 2] * 2 * math.pi
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5,
                            indexing="ij")
    side = (xs[None] - px.view(b, 1, 1)) * torch.cos(theta).view(b, 1, 1) + \
        (ys[None] - py.view(b, 1, 1)) * torch.sin(theta).view(b, 1, 1)
    dark = torch.sigmoid(side / (0.05 * max(h, w) / 4))
    light = 1 - (1 - keep) * dark
    return x * light[:, None].to(x.device, x.dtype)


def _kelvin_rgb(k: float) -> np.ndarray:
    """The RGB of a black body at ``k`` kelvin (Tanner Helland's fit to Mitchell Charity's table)."""
    t = k / 100
    r = 255.0 if t <= 66 else 329.698727446 * (t - 60) ** -0.1332047592
    gr = 99.4708025861 * math.log(t) - 161.1195681661 if t <= 66 else 288.1221695283 * (t - 60) ** -0.0755148492
    bl = 255.0 if t >= 66 else (0.0 if t <= 19 else 138.5177312231 * math.log(t - 10) - 305.0447927307)
    return np.clip([r, gr, bl], 0, 255) / 255


WARM = [4500, 3800, 3200, 2700, 2000]
COLD = [8000, 10000, 12500, 15000, 20000]


def colour_temperature(x, s, g):
    """Each image lit by a warm or a cold light (even odds): channel gains of that light
    against 6,500 K daylight, scaled so the strongest gain is 1."""
    if x.shape[1] == 1:
        return x
    white = _kelvin_rgb(6500)
    gains = []
    for cold in (torch.rand(len(x), generator=g) < 0.5).tolist():
        gain = _kelvin_rgb((COLD if cold else WARM)[s - 1]) / white
        gains.append(gain / gain.max())
    return x * torch.tensor(np.array(gains), dtype=x.dtype, device=x.device).view(len(x), 3, 1, 1)
