"""Missing or incomplete pixels: simulate them, and give the model the mask.

:class:`DropPixels` removes a fraction of an image (single pixels or square patches) after
normalization and either zero-fills the holes (0 is the dataset mean after normalization) or
also appends the observation mask as an extra input channel (1 = observed), so that a model
trained with ``--missing-input mask`` can tell "dark" from "unknown". Hand-written: torchvision
has random erasing of one box, not a pixel or multi-patch budget with a returned mask.
"""

from __future__ import annotations

import math

import torch

MISSING_MODES = ("pixel", "patch")
MISSING_INPUTS = ("zero", "mask")


def missing_mask(shape: tuple[int, int], ratio: float, mode: str = "patch", patch: int = 0,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """A float ``(H, W)`` mask with about ``ratio`` of its entries 0 (missing) and the rest 1.

    ``pixel``: each pixel missing independently. ``patch``: square patches of side ``patch``
    (default ``max(2, min(H, W) // 8)``) at random places until the missing share reaches
    ``ratio``.
    """
    h, w = shape
    if ratio <= 0:
        return torch.ones(h, w)
    if mode == "pixel":
        return (torch.rand(h, w, generator=generator) >= ratio).float()
    side = patch or max(2, min(h, w) // 8)
    m = torch.ones(h, w)
    target = ratio * h * w
    missing = 0.0
    for _ in range(int(math.ceil(4 * target / (side * side))) + 8):  # overlaps need extra draws
        if missing >= target:
            break
        y = int(torch.randint(0, max(1, h - side + 1), (1,), generator=generator))
        x = int(torch.randint(0, max(1, w - side + 1), (1,), generator=generator))
        m[y:y + side, x:x + side] = 0
        missing = float((m == 0).sum())
    return m


class DropPixels(torch.nn.Module):
    """Drop a share of a normalized ``(C, H, W)`` image; return ``(C, H, W)`` or ``(C + 1, H, W)``.

    Args:
        ratio: the missing share, or ``(low, high)`` to draw it per image (training uses
            ``(0, P)`` so one model sees every level up to ``P``).
        mode: ``pixel`` or ``patch``.
        mask_channel: append the observation mask (1 = observed) as the last channel.
    """

    def __init__(self, ratio: float | tuple[float, float], mode: str = "patch", mask_channel: bool = False):
        super().__init__()
        self.ratio, self.mode, self.mask_channel = ratio, mode, mask_channel

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        r = self.ratio
        if isinstance(r, tuple):
            r = r[0] + (r[1] - r[0]) * float(torch.rand(()))
        m = missing_mask(tuple(img.shape[-2:]), r, self.mode).to(img.dtype)
        out = img * m
        return torch.cat([out, m[None]], 0) if self.mask_channel else out


class AddMaskChannel(torch.nn.Module):
    """Append an all-observed mask channel (inference on complete images for a mask model)."""

    def forward(self, img: torch.Tensor) -> torch.Tensor:
        return torch.cat([img, torch.ones_like(img[:1])], 0)
