"""Attention and global-pooling blocks that can be inserted into supported backbones.

Attention modules come from timm (``se``: squeeze-and-excitation, ``cbam``: channel + spatial
attention, ``eca``: efficient channel attention). Pooling: ``avg``, ``max``, ``avgmax`` from
timm's ``SelectAdaptivePool2d``; ``lp`` (power mean, p = 3), ``gem`` (generalized mean with a
learnable p) and ``spp`` (spatial pyramid, 1x1 + 2x2 + 4x4 average pools concatenated) are
written here because timm has no global GeM/LP/SPP layer with that interface (about 40 lines).
:func:`upsample_nearest` is the decoders' (U-Net, fastdet's neck) upsampling step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.choices import ATTENTION, POOLS
from cnnkit.errors import ModelError


def upsample_nearest(x: torch.Tensor, size) -> torch.Tensor:
    """Nearest-neighbour upsampling of ``x`` to ``size`` (H, W).

    When ``size`` is a whole multiple of ``x``'s size (always, for inputs that are multiples of
    the network's stride) the step is written with that scale factor: the result is the same,
    but ONNX export then records a constant-scale ``Resize`` instead of one fed by ``Shape``
    ops, which ONNX Runtime runs in its blocked (NCHWc) layout instead of converting the maps
    out of it and back around every upsampling; on the smallcnn U-Net at 128 px that removes
    the reorder nodes, about 15% of its CPU time.
    """
    (ih, iw), (oh, ow) = (int(x.shape[-2]), int(x.shape[-1])), (int(size[0]), int(size[1]))
    if oh % ih == 0 and ow % iw == 0 and (oh, ow) != (ih, iw):
        return F.interpolate(x, scale_factor=(float(oh // ih), float(ow // iw)), mode="nearest")
    return F.interpolate(x, size=(oh, ow), mode="nearest")


def make_attention(name: str | None, channels: int) -> nn.Module:
    """An attention block for ``channels`` feature maps (identity for None/"none")."""
    if name in (None, "", "none"):
        return nn.Identity()
    if name not in ATTENTION:
        raise ModelError(f"unknown attention '{name}'; choose from {', '.join(ATTENTION)}")
    from timm.layers import create_attn

    return create_attn(name, channels)


class PowerMeanPool(nn.Module):
    """Global power mean ``(mean(x^p))^(1/p)``; ``learnable=True`` is GeM (Radenovic et al.).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C)``
    """

    def __init__(self, p: float = 3.0, learnable: bool = False, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.tensor(float(p))) if learnable else p
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.p.clamp(min=1.0) if isinstance(self.p, torch.Tensor) else self.p
        return x.clamp(min=self.eps).pow(p).mean((-2, -1)).pow(1.0 / p)


class SpatialPyramidPool(nn.Module):
    """Average pools over 1x1, 2x2 and 4x4 grids, concatenated (He et al., SPP-net).

    Shape:
        ``(B, C, H, W)`` -> ``(B, C * 21)``
    """

    levels = (1, 2, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([F.adaptive_avg_pool2d(x, n).flatten(1) for n in self.levels], 1)


def make_pool(name: str) -> tuple[nn.Module, int]:
    """A global pooling module that flattens to ``(B, C * mult)`` and its width multiplier."""
    if name not in POOLS:
        raise ModelError(f"unknown pooling '{name}'; choose from {', '.join(POOLS)}")
    if name in ("avg", "max", "avgmax"):
        from timm.layers import SelectAdaptivePool2d

        return SelectAdaptivePool2d(pool_type=name, flatten=True), 1
    if name == "lp":
        return PowerMeanPool(3.0), 1
    if name == "gem":
        return PowerMeanPool(3.0, learnable=True), 1
    return SpatialPyramidPool(), sum(n * n for n in SpatialPyramidPool.levels)
