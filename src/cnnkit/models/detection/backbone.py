"""Multi-scale features from any registry backbone, with torchvision's feature pyramid on top.

Every registry model publishes ``feature_info`` (timm's convention: per stage the module
name, channels and stride), so one hook-based extractor serves resnets, MobileNetV3,
EfficientNet, ConvNeXt and cnnkit's own ``smallcnn``. Forward hooks instead of torchvision's
FX ``create_feature_extractor`` because some backbones branch on tensor shapes (smallcnn
skips pooling on tiny maps), which FX cannot trace; and instead of timm's
``features_only=True`` so that ``--init`` classifier checkpoints and the registry's own
entries (smallcnn, pretrained-weight loading, offline messages) work unchanged.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn as nn
from torchvision.ops import FeaturePyramidNetwork
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

from cnnkit.errors import ModelError


def stage_info(model: nn.Module) -> list[dict]:
    """``[{module, num_chs, reduction}]`` of a registry model, deepest last."""
    info = getattr(model, "feature_info", None)
    if info is None:
        raise ModelError(f"'{getattr(model, 'cnnkit_arch', type(model).__name__)}' does not list its "
                         "stages (feature_info), so it cannot serve as a detection backbone")
    if hasattr(info, "get_dicts"):  # timm FeatureInfo
        info = info.get_dicts()
    return [dict(module=d["module"], num_chs=int(d["num_chs"]), reduction=int(d["reduction"])) for d in info]


class MultiScaleBackbone(nn.Module):
    """``x -> OrderedDict{"0": C_a, "1": C_b, ...}`` of the stages at strides ``strides``.

    Args:
        body: a registry classifier (its head is kept but never run).
        strides: which stage outputs to return, e.g. (8, 16, 32); the deepest stage of each
            stride is taken. Strides the backbone lacks raise a ModelError.
    """

    def __init__(self, body: nn.Module, strides: tuple[int, ...]):
        super().__init__()
        self.body = body
        by_stride: dict[int, dict] = {}
        for d in stage_info(body):
            by_stride[d["reduction"]] = d  # later (deeper) entries win
        missing = [s for s in strides if s not in by_stride]
        if missing:
            raise ModelError(f"backbone '{getattr(body, 'cnnkit_arch', '?')}' has no stage at stride "
                             f"{missing} (it has {sorted(by_stride)})")
        self.strides = tuple(strides)
        self.modules_ = [by_stride[s]["module"] for s in strides]
        self.channels = [by_stride[s]["num_chs"] for s in strides]
        named = dict(body.named_modules())
        # a plain list, not a ModuleList: the modules stay registered once, under body; deepcopy
        # (EMA, ensembles) maps them to the copy's own modules through its memo
        self._targets = [named[name] for name in self.modules_]
        for m in self._targets:
            m.register_forward_hook(_keep_output)

    def forward(self, x: torch.Tensor) -> OrderedDict:
        self.body.forward_features(x)
        out = OrderedDict()
        for i, m in enumerate(self._targets):
            out[str(i)] = m._cnnkit_output
            m._cnnkit_output = None  # do not keep the maps alive between calls
        return out


def _keep_output(module: nn.Module, inputs, output) -> None:
    """Forward hook: the stage's output, kept on the stage itself. A module-level function
    rather than a closure over the extractor, so a deep copy of the model (EMA weights) fills
    its own stages instead of the original's."""
    module._cnnkit_output = output


class BackboneFPN(nn.Module):
    """A registry backbone plus a feature pyramid, in the form torchvision's detectors take
    (``out_channels`` and an OrderedDict of maps)."""

    def __init__(self, body: nn.Module, strides: tuple[int, ...], out_channels: int = 128, extra: str = "pool"):
        super().__init__()
        self.features = MultiScaleBackbone(body, strides)
        if extra == "pool":
            extra_block = LastLevelMaxPool()
        elif extra == "p6p7":
            extra_block = LastLevelP6P7(out_channels, out_channels)
        else:
            extra_block = None
        self.fpn = FeaturePyramidNetwork(self.features.channels, out_channels, extra_blocks=extra_block)
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> OrderedDict:
        return self.fpn(self.features(x))


def registry_backbone(name: str, pretrained: bool = False) -> nn.Module:
    """A registry classifier used as a backbone (3-channel input; its head is not used)."""
    from cnnkit.models.registry import create_model

    return create_model(name, num_classes=1, in_chans=3, pretrained=pretrained, task="classify")
