"""Is an explanation right? Faithfulness scores of heat maps, for images and volumes alike:
energy-in-mask and the pointing game where the object's pixels are known, deletion and
insertion curves everywhere, and smooth random maps as the baseline (``cnnkit TASK explain
--eval``; :mod:`cnnkit.methods.explain` makes the maps)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

CURVE_STEPS = 16  # deletion / insertion: pixels removed or added in this many equal steps


def _per_sample(t: torch.Tensor) -> tuple[int, ...]:
    """The view that broadcasts one value per sample over ``t``'s other dimensions."""
    return (-1, *[1] * (t.ndim - 1))


def _normalize(cam: torch.Tensor) -> torch.Tensor:
    """Per map ``(B, h, w)`` (or ``(B, d, h, w)`` for volumes): min-max to [0, 1]
    (pytorch-grad-cam's ``scale_cam_image``)."""
    cam = cam - cam.flatten(1).min(1).values.view(_per_sample(cam))
    return cam / (1e-7 + cam.flatten(1).max(1).values.view(_per_sample(cam)))


def _mode(size: Sequence[int]) -> str:
    return "bilinear" if len(size) == 2 else "trilinear"


def energy_in_mask(m: np.ndarray, mask: np.ndarray) -> float:
    """Share of the map's mass on the object's pixels (Wang et al., 2020's energy-based pointing game)."""
    total = float(m.sum())
    return float(m[mask].sum()) / total if total > 0 else 0.0


def pointing_hit(m: np.ndarray, mask: np.ndarray) -> bool:
    """Whether the map's peak lies on the object (Zhang et al., 2018's pointing game)."""
    return bool(mask.flat[int(np.argmax(m))])


@torch.no_grad()
def deletion_insertion(f_prob: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, m: torch.Tensor,
                       steps: int = CURVE_STEPS) -> tuple[float, float]:
    """Areas under the deletion and insertion curves (Petsiuk et al., 2018) of one input
    ``x (C, H, W)`` and its map ``m (H, W)``: the target's probability as the map's most
    important pixels are set to black (deletion; lower is better) or copied onto a blurred
    copy of the image (insertion; higher is better), in ``steps`` equal steps."""
    order = torch.argsort(m.flatten(), descending=True, stable=True)
    n = order.numel()
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(n, device=order.device)
    ranks = ranks.view(m.shape)
    k = torch.linspace(0, n, steps + 1, device=x.device).round().long()
    keep = ranks[None] < k.view(-1, *[1] * m.ndim)  # (steps + 1, H, W): the top-k pixels (or voxels)
    blurred = _blur(x)
    deleted = torch.where(keep[:, None], torch.zeros_like(x)[None], x[None])
    inserted = torch.where(keep[:, None], x[None], blurred[None])
    b = 8 if m.ndim == 2 else 2
    d = torch.cat([f_prob(deleted[i:i + b]) for i in range(0, len(deleted), b)])
    ins = torch.cat([f_prob(inserted[i:i + b]) for i in range(0, len(inserted), b)])
    return float(torch.trapezoid(d, dx=1 / steps)), float(torch.trapezoid(ins, dx=1 / steps))


def _blur(x: torch.Tensor) -> torch.Tensor:
    """A Gaussian blur of an image ``(C, H, W)`` or a volume ``(C, D, H, W)``, its kernel an
    eighth of the smallest side."""
    space = x.shape[1:]
    k = max(3, (min(space) // 8) | 1)
    if len(space) == 2:
        from torchvision.transforms.v2 import functional as TF

        return TF.gaussian_blur(x, [k, k], [k / 3, k / 3])
    g = torch.exp(-0.5 * ((torch.arange(k, device=x.device) - k // 2) / (k / 3)) ** 2)
    g = (g / g.sum()).to(x.dtype)
    out = x[:, None]
    for axis in range(3):  # separable: one 1-D pass per axis, edges replicated
        shape = [1, 1, 1, 1, 1]
        shape[2 + axis] = k
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = k // 2
        out = F.conv3d(F.pad(out, pad, mode="replicate"), g.view(shape))
    return out[:, 0]


def random_map(shape: Sequence[int], seed: int) -> torch.Tensor:
    """A baseline map of smooth random blobs (uniform noise upsampled), in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(1, 1, *[max(2, s // 8) for s in shape], generator=g)
    return _normalize(F.interpolate(low, size=tuple(shape), mode=_mode(shape), align_corners=False)[:, 0])[0]
