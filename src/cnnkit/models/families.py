"""Registry entries for every family that is not a classifier: detectors (torchvision's and
fastdet), Mask R-CNN, the segmenters and the 3-D networks, each tagged with its task, so
``cnnkit models`` lists them all and the contract tests reach them all."""

from __future__ import annotations

from torch import nn

from cnnkit.core.choices import DETECTORS, INSTANCE_MODELS, SEGMENTERS, VOLUME_MODELS
from cnnkit.models.registry import register_model

DESCRIPTIONS = {
    "fastdet": ("cnnkit", "anchor-free one-stage detector (CSP backbone, PAN neck, DFL boxes); fast on CPU"),
    "fasterrcnn": ("torchvision", "Faster R-CNN: RPN + RoIAlign box head on a registry backbone with an FPN"),
    "retinanet": ("torchvision", "RetinaNet: anchors, focal loss, GroupNorm head, FPN"),
    "ssd": ("torchvision", "SSD: default boxes on four FPN levels"),
    "ssdlite": ("torchvision", "SSDlite: depthwise SSD head (default backbone mobilenet_v3_large)"),
    "maskrcnn": ("torchvision", "Mask R-CNN: Faster R-CNN plus a 28x28 mask per object"),
    "unet": ("cnnkit", "U-Net decoder on a registry encoder (skips at every stride)"),
    "fcn": ("cnnkit", "FCN-8s on a registry encoder"),
    "deeplabv3": ("cnnkit", "DeepLabV3: atrous spatial pyramid pooling on a registry encoder"),
    "unet3d": ("monai", "residual 3-D U-Net (MONAI)"),
    "vnet": ("monai", "V-Net (MONAI)"),
    "unet2d": ("monai", "2-D U-Net on every axial slice (MONAI)"),
    "densenet3d": ("monai", "DenseNet-121 in 3-D, volume classifier (MONAI)"),
    "densenet2d": ("monai", "DenseNet-121 on every slice, log-probabilities averaged (MONAI)"),
}


def _detector(arch: str):
    def fn(num_classes: int, in_chans: int = 3, pretrained: bool = False, imgsz: int = 320,
           backbone: str | None = None, anchors: list | None = None, **kwargs) -> nn.Module:
        from cnnkit.models.detection.zoo import build_detector

        return build_detector(arch, num_classes, imgsz, backbone, pretrained, anchors, **kwargs)

    return fn


def _segmenter(arch: str):
    def fn(num_classes: int, in_chans: int = 3, pretrained: bool = False, encoder: str | None = None) -> nn.Module:
        from cnnkit.models.segmentation import build_segmenter

        return build_segmenter(arch, num_classes, in_chans, encoder, pretrained)

    return fn


def _volume(arch: str):
    def fn(num_classes: int, in_chans: int = 1, pretrained: bool = False) -> nn.Module:
        from cnnkit.errors import ModelError
        from cnnkit.models.volumetric import build_volume_model

        if pretrained:
            raise ModelError(f"{arch} has no published pretrained weights here; start from --init PATH")
        return build_volume_model(arch, num_classes, in_chans)

    return fn


def _register(arch: str, make, task: str) -> None:
    fn = make(arch)
    fn.__name__ = arch
    fn.__doc__ = DESCRIPTIONS[arch][1]
    register_model(fn, name=arch, family=DESCRIPTIONS[arch][0], task=task)


for _arch in DETECTORS:
    _register(_arch, _detector, "detect")
for _arch in INSTANCE_MODELS:
    _register(_arch, _detector, "instance")
for _arch in SEGMENTERS:
    _register(_arch, _segmenter, "segment")
for _arch in VOLUME_MODELS:
    _register(_arch, _volume, "medical")
