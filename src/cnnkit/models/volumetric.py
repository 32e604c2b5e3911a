"""Networks for volumes, from MONAI (the field's reference implementations).

Segmenters map ``(B, C, D, H, W)`` to ``(B, K, D, H, W)`` logits:

- ``unet3d``: a residual 3-D U-Net (MONAI's ``UNet``, channels 16-32-64-128, two residual
  units per level), lighter than V-Net on a CPU.
- ``vnet``: V-Net (Milletari et al., 2016): a residual 3-D encoder-decoder with strided
  convolutions for downsampling and PReLU/ELU; MONAI's ``VNet``. Inputs must be multiples of
  16 voxels per side (sliding-window inference takes care of that for any volume).
- ``unet2d``: the same U-Net in 2-D, applied to every axial slice (:class:`SliceWise`): the
  usual choice when slices are thick or volumes few.

Classifiers map ``(B, C, D, H, W)`` to ``(B, K)`` logits:

- ``densenet3d``: MONAI's ``DenseNet121`` with 3-D convolutions over the whole volume.
- ``densenet2d``: ``DenseNet121`` in 2-D on every axial slice, the slices' log-probabilities
  averaged into the volume's (:class:`SliceWise` with ``reduce``), trained end to end on
  volume labels (no slice labels needed).
"""

from __future__ import annotations

import torch
from torch import nn

from cnnkit.core.choices import CLASSIFIERS_3D, SEGMENTERS_3D, VOLUME_MODELS  # noqa: F401
from cnnkit.errors import ModelError


class SliceWise(nn.Module):
    """A 2-D network applied to every axial slice of a ``(B, C, D, H, W)`` volume (slices are
    stacked into the batch). Segmenters give ``(B, K, D, H, W)``; with ``reduce`` (a
    classifier) the slice log-probabilities are averaged into ``(B, K)`` volume logits.
    ``(B, C, H, W)`` slices pass straight through (training on slices)."""

    def __init__(self, net: nn.Module, reduce: bool = False):
        super().__init__()
        self.net, self.reduce = net, reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == 4:
            return self.net(x)
        b, c, d, h, w = x.shape
        y = self.net(x.transpose(1, 2).reshape(b * d, c, h, w))
        if self.reduce:
            return y.float().log_softmax(1).view(b, d, -1).mean(1)
        return y.view(b, d, *y.shape[1:]).transpose(1, 2)


def _unet(dims: int, in_chans: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import UNet

    return UNet(spatial_dims=dims, in_channels=in_chans, out_channels=num_classes, channels=(16, 32, 64, 128),
                strides=(2, 2, 2), num_res_units=2)


def _densenet(dims: int, in_chans: int, num_classes: int) -> nn.Module:
    from monai.networks.nets import DenseNet121

    return DenseNet121(spatial_dims=dims, in_channels=in_chans, out_channels=num_classes)


def build_volume_model(arch: str, num_classes: int, in_chans: int = 1) -> nn.Module:
    """One of :data:`VOLUME_MODELS` for ``num_classes`` outputs."""
    if arch == "vnet":
        from monai.networks.nets import VNet

        # dropout off: MONAI's default 0.5 on every level is for large 3-D datasets
        model = VNet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, dropout_prob_down=0.0,
                     dropout_prob_up=(0.0, 0.0))
    elif arch == "unet3d":
        model = _unet(3, in_chans, num_classes)
    elif arch == "unet2d":
        model = SliceWise(_unet(2, in_chans, num_classes))
    elif arch == "densenet3d":
        model = _densenet(3, in_chans, num_classes)
    elif arch == "densenet2d":
        model = SliceWise(_densenet(2, in_chans, num_classes), reduce=True)
    else:
        import difflib

        close = difflib.get_close_matches(arch, VOLUME_MODELS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelError(f"unknown volume model '{arch}'{hint}; choose from {', '.join(VOLUME_MODELS)}")
    model.cnnkit_arch = arch
    return model
