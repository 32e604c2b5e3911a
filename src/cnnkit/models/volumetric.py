"""3-D segmentation networks, from MONAI (the field's reference implementations).

- ``vnet``: V-Net (Milletari et al., 2016): a residual 3-D encoder-decoder with strided
  convolutions for downsampling and PReLU/ELU; MONAI's ``VNet``. Inputs must be multiples of
  16 voxels per side (sliding-window inference takes care of that for any volume).
- ``unet3d``: a residual 3-D U-Net (MONAI's ``UNet``, channels 16-32-64-128, two residual
  units per level), lighter than V-Net on a CPU.
"""

from __future__ import annotations

from torch import nn

from cnnkit.errors import ModelError

VOLUME_MODELS = ("vnet", "unet3d")


def build_volume_model(arch: str, num_classes: int, in_chans: int = 1) -> nn.Module:
    """A 3-D segmenter mapping ``(B, in_chans, D, H, W)`` to ``(B, num_classes, D, H, W)`` logits."""
    if arch == "vnet":
        from monai.networks.nets import VNet

        # dropout off: MONAI's default 0.5 on every level is for large 3-D datasets
        model = VNet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, dropout_prob_down=0.0,
                     dropout_prob_up=(0.0, 0.0))
    elif arch == "unet3d":
        from monai.networks.nets import UNet

        model = UNet(spatial_dims=3, in_channels=in_chans, out_channels=num_classes, channels=(16, 32, 64, 128),
                     strides=(2, 2, 2), num_res_units=2)
    else:
        import difflib

        close = difflib.get_close_matches(arch, VOLUME_MODELS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelError(f"unknown volume model '{arch}'{hint}; choose from {', '.join(VOLUME_MODELS)}")
    model.cnnkit_arch = arch
    return model
