"""Semantic segmentation networks on registry encoders: U-Net, FCN and DeepLabV3.

All three take any registry model as the encoder (``smallcnn``, resnets, MobileNetV3,
EfficientNet, ConvNeXt, ``timm:NAME``) through the same hook-based multi-scale extractor the
detectors use (:class:`~cnnkit.models.detection.backbone.MultiScaleBackbone`), so
``--init`` classifier checkpoints and pretrained registry weights fill the encoder unchanged.
They map ``(B, C, H, W)`` float input (normalized) to ``(B, K, H, W)`` logits at the input
size; ``H`` and ``W`` must be multiples of the encoder's deepest stride.

- :class:`UNet`: encoder-decoder with a skip at every stride (Ronneberger et al., 2015); one
  decoder block per stride (upsample x2, concatenate the skip, two 3x3 conv-BN-ReLU), the
  channel plan of segmentation_models_pytorch (256, 128, 64, 32, 16) so the two compare.
- :class:`FCN`: fully convolutional scoring at strides 32, 16 and 8 summed on the way up
  (FCN-8s, Long et al., 2015), with torchvision's ``FCNHead`` on the deepest map.
- :class:`DeepLabV3`: atrous spatial pyramid pooling (torchvision's ``ASPP``) on the
  stride-16 map (Chen et al., 2017), with atrous rates sized for small images.

Written here rather than taken from torchvision's ``segmentation`` models because those are
tied to torchvision's ResNet/MobileNet and their stride layout; the heads (``FCNHead``,
``ASPP``) are torchvision's own.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.choices import SEGMENTERS
from cnnkit.data.illumination import illuminate
from cnnkit.errors import ModelError
from cnnkit.models.blocks import upsample_nearest

DEFAULT_ENCODER = {"unet": "resnet18", "fcn": "resnet18", "deeplabv3": "resnet18"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_bn_relu(cin: int, cout: int, k: int = 3, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (k // 2)
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=pad, dilation=dilation, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


def unzero_residual_norms(model: nn.Module) -> int:
    """Set normalization scales that start at zero back to one; returns how many.

    timm builds its ResNets with ``zero_init_last=True`` (each residual branch's last
    BatchNorm starts at 0, so every block starts as the identity; Goyal et al., 2017), a
    classification habit that hurts an encoder trained from scratch under a U-Net decoder:
    on the built-in shapes (60 epochs, GPU) the U-Net reached val mIoU 0.569 with it and
    0.823 without, and segmentation_models_pytorch's U-Net, whose torchvision ResNet has no
    zero init, 0.738. Pretrained weights are not touched.
    """
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.weight is not None and not m.weight.detach().any():
            nn.init.ones_(m.weight)
            n += 1
    return n


def init_decoder(decoder: nn.Module, head: nn.Conv2d) -> None:
    """Initialize a decoder built here as segmentation_models_pytorch does: convolutions
    Kaiming-uniform for ReLU (``fan_in``), normalizations at one and zero, the score head
    Xavier-uniform, biases at zero.

    PyTorch's default for ``nn.Conv2d`` (Kaiming-uniform with ``a = sqrt(5)``) draws weights
    ``sqrt(6)`` times smaller. Behind BatchNorm the forward pass does not see the scale, but
    AdamW's steps have a fixed size, so smaller weights turn by a larger angle per step: the
    decoder trained as if at a higher learning rate than the encoder.
    """
    for m in decoder.modules():  # normalizations start at one and zero in PyTorch already
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_uniform_(m.weight, mode="fan_in", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
    nn.init.xavier_uniform_(head.weight)
    if head.bias is not None:
        nn.init.zeros_(head.bias)


class Encoder(nn.Module):
    """Registry model -> list of maps, one per distinct stride (shallow first), and the
    strides and channels of each."""

    def __init__(self, name: str, in_chans: int = 3, pretrained: bool = False, max_stride: int = 32):
        super().__init__()
        from cnnkit.models.detection.backbone import MultiScaleBackbone, stage_info
        from cnnkit.models.registry import create_model

        body = create_model(name, num_classes=1, in_chans=in_chans, pretrained=pretrained, task="classify")
        if not pretrained:
            unzero_residual_norms(body)
        strides = sorted({d["reduction"] for d in stage_info(body) if d["reduction"] <= max_stride})
        self.features = MultiScaleBackbone(body, tuple(strides))
        self.strides = list(strides)
        self.channels = list(self.features.channels)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.features(x).values())


class _Normalize(nn.Module):
    """Input in [0, 1] -> normalized with the encoder's mean and std (kept in the model, so
    a model card needs no preprocessing code); with ``illumination`` the lighting is normalized
    first (:mod:`cnnkit.data.illumination`; no parameters, so the weights do not change)."""

    def __init__(self, in_chans: int):
        super().__init__()
        self.illumination = "none"  # set by build_segmenter
        mean = torch.tensor(IMAGENET_MEAN if in_chans == 3 else (0.5,) * in_chans).view(1, -1, 1, 1)
        std = torch.tensor(IMAGENET_STD if in_chans == 3 else (0.25,) * in_chans).view(1, -1, 1, 1)
        self.register_buffer("mean", mean, persistent=False)
        self.register_buffer("std", std, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (illuminate(x, self.illumination) - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"illumination={self.illumination}" if self.illumination != "none" else ""


class _DecoderBlock(nn.Module):
    def __init__(self, cin: int, skip: int, cout: int):
        super().__init__()
        self.conv = nn.Sequential(conv_bn_relu(cin + skip, cout), conv_bn_relu(cout, cout))

    def forward(self, x: torch.Tensor, skip: torch.Tensor | None, size) -> torch.Tensor:
        x = upsample_nearest(x, size)
        if skip is not None:
            x = torch.cat([x, skip], 1)
        return self.conv(x)


class UNet(nn.Module):
    """U-Net on a registry encoder.

    Args:
        num_classes: output channels (background included).
        encoder: registry model name.
        decoder_channels: channels of the decoder blocks at strides 16, 8, 4, 2 and 1; there is
            one block per encoder stride below the deepest, plus blocks without skips down to
            stride 1, each with the channels of its stride (so full-resolution blocks stay thin).
    """

    def __init__(self, num_classes: int, encoder: str = "resnet18", in_chans: int = 3, pretrained: bool = False,
                 decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)):
        super().__init__()
        self.norm = _Normalize(in_chans)
        self.encoder = Encoder(encoder, in_chans, pretrained)
        strides, chans = self.encoder.strides, self.encoder.channels
        # decoder targets: every shallower stride, then halve down to 1
        targets = list(reversed(strides[:-1]))
        s = targets[-1] if targets else strides[-1]
        while s > 1:
            s //= 2
            targets.append(s)
        if len(decoder_channels) != 5:
            raise ModelError("decoder_channels takes 5 values: the channels at strides 16, 8, 4, 2 and 1")
        self.targets = targets
        blocks, cin = [], chans[-1]
        for t in targets:
            skip = chans[strides.index(t)] if t in strides else 0
            cout = decoder_channels[min(4, max(0, 4 - int(math.log2(t))))]
            blocks.append(_DecoderBlock(cin, skip, cout))
            cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.head = nn.Conv2d(cin, num_classes, 3, padding=1)
        init_decoder(self.blocks, self.head)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats = self.encoder(self.norm(x))
        by_stride = dict(zip(self.encoder.strides, feats))
        y = feats[-1]
        for t, block in zip(self.targets, self.blocks):
            skip = by_stride.get(t)
            size = skip.shape[-2:] if skip is not None else (h // t, w // t)
            y = block(y, skip, size)
        y = self.head(y)
        if y.shape[-2:] != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return y


class FCN(nn.Module):
    """FCN-8s on a registry encoder: class scores at strides 32, 16 and 8 (those the encoder
    has), each upsampled and added to the next shallower one, then upsampled to the input."""

    def __init__(self, num_classes: int, encoder: str = "resnet18", in_chans: int = 3, pretrained: bool = False):
        super().__init__()
        from torchvision.models.segmentation.fcn import FCNHead

        self.norm = _Normalize(in_chans)
        self.encoder = Encoder(encoder, in_chans, pretrained)
        strides, chans = self.encoder.strides, self.encoder.channels
        picks = [i for i, s in enumerate(strides) if s >= 8][-3:] or [len(strides) - 1]
        self.picks = picks
        self.head = FCNHead(chans[picks[-1]], num_classes)  # 3x3 conv-BN-ReLU, dropout, 1x1 scores
        self.skips = nn.ModuleList(nn.Conv2d(chans[i], num_classes, 1) for i in picks[:-1])
        for m in self.skips:  # skips start at zero: training begins as the plain deepest-map FCN
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats = self.encoder(self.norm(x))
        y = self.head(feats[self.picks[-1]])
        for i, conv in zip(reversed(self.picks[:-1]), reversed(self.skips)):
            f = feats[i]
            y = F.interpolate(y, size=f.shape[-2:], mode="bilinear", align_corners=False) + conv(f)
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


class DeepLabV3(nn.Module):
    """DeepLabV3 on a registry encoder: ASPP (parallel atrous 3x3 convolutions at ``rates``
    plus image pooling) on the deepest map of stride 16 or less, then 3x3 conv and scores.

    ``rates`` default to (2, 4, 6): the paper's (6, 12, 18) are for 513 px crops (a 33 px map
    at stride 16); at 128-320 px the map is 8-20 px and larger rates would sample padding.
    """

    def __init__(self, num_classes: int, encoder: str = "resnet18", in_chans: int = 3, pretrained: bool = False,
                 rates: tuple[int, ...] = (2, 4, 6), channels: int = 128):
        super().__init__()
        from torchvision.models.segmentation.deeplabv3 import ASPP

        self.norm = _Normalize(in_chans)
        self.encoder = Encoder(encoder, in_chans, pretrained, max_stride=16)
        cin = self.encoder.channels[-1]
        self.aspp = ASPP(cin, list(rates), channels)
        self.head = nn.Sequential(conv_bn_relu(channels, channels), nn.Conv2d(channels, num_classes, 1))
        self.num_classes = num_classes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        f = self.encoder(self.norm(x))[-1]
        y = self.head(self.aspp(f))
        return F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)


def build_segmenter(arch: str, num_classes: int, in_chans: int = 3, encoder: str | None = None,
                    pretrained: bool = False, illumination: str = "none") -> nn.Module:
    """One of :data:`SEGMENTERS` on a registry encoder (default per arch); ``illumination``
    normalizes the lighting inside the model, before the encoder's normalization."""
    if arch not in SEGMENTERS:
        import difflib

        close = difflib.get_close_matches(arch, SEGMENTERS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelError(f"unknown segmentation model '{arch}'{hint}; choose from {', '.join(SEGMENTERS)}")
    cls = {"unet": UNet, "fcn": FCN, "deeplabv3": DeepLabV3}[arch]
    model = cls(num_classes, encoder or DEFAULT_ENCODER[arch], in_chans, pretrained)
    model.norm.illumination = illumination
    model.cnnkit_arch = arch
    model.encoder_name = encoder or DEFAULT_ENCODER[arch]
    return model
