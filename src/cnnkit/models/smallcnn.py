"""A small, fast CNN for small images (8-96 px): the default for the built-in datasets.

Four stages of 3x3 conv-BN-ReLU layers (widths ``w, 2w, 4w, 4w``) with 2x2 max pooling
before stages 2-4, global average pooling, dropout, linear head. A pooling step is skipped
when the feature map is already 4 px or smaller, so 16 px digits keep a 4x4 map while 64 px
scenes get the receptive field (about 70 px) that whole shapes need. About 0.6 M parameters
at the default width.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from cnnkit.models.registry import register_model


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


class _MaybePool(nn.Module):
    """2x2 max pooling, skipped when the map is already 4 px or smaller."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.max_pool2d(x, 2) if min(x.shape[-2:]) > 4 else x


class SmallCNN(nn.Module):
    """Four-stage VGG-style CNN with the timm classifier interface.

    Args:
        num_classes: classifier outputs.
        in_chans: input channels (1 or 3).
        width: channels of the first stage; later stages use 2x and 4x.
        drop_rate: dropout before the classifier.
        attention: ``se``, ``cbam`` or ``eca`` block after every stage; None for none.
        pool: global pooling, one of ``avg max avgmax lp gem spp``.

    Shape:
        input ``(B, in_chans, H, W)`` with H, W >= 4; output ``(B, num_classes)``.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 3, width: int = 32,
                 drop_rate: float = 0.2, attention: str | None = None, pool: str = "avg"):
        super().__init__()
        from cnnkit.models.blocks import make_attention, make_pool

        w = (width, width * 2, width * 4, width * 4)
        self.num_classes = num_classes
        self.num_features = w[-1]
        self.stem = _conv_bn(in_chans, w[0])
        self.stages = nn.Sequential(
            nn.Sequential(_conv_bn(w[0], w[0])),
            nn.Sequential(_MaybePool(), _conv_bn(w[0], w[1]), _conv_bn(w[1], w[1])),
            nn.Sequential(_MaybePool(), _conv_bn(w[1], w[2]), _conv_bn(w[2], w[2])),
            nn.Sequential(_MaybePool(), _conv_bn(w[2], w[3]), _conv_bn(w[3], w[3])),
        )
        for stage, c in zip(self.stages, w):  # attention after each stage (identity when off)
            stage.append(make_attention(attention, c))
        self.global_pool, mult = make_pool(pool)
        self.num_features = w[-1] * mult
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes)
        self.feature_info = [dict(num_chs=c, reduction=r, module=f"stages.{i}")
                             for i, (c, r) in enumerate(zip(w, (1, 2, 4, 8)))]
        self.pretrained_cfg = {"mean": None, "std": None, "input_size": None}
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x))  # (B, 4*width, H/8, W/8), at least 4x4 unless smaller in

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.global_pool(x).flatten(1)  # (B, num_features)
        return x if pre_logits else self.fc(self.drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def get_classifier(self) -> nn.Module:
        return self.fc

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes)


@register_model(tiny=True)
def smallcnn(num_classes: int = 10, in_chans: int = 3, pretrained: bool = False, **kwargs) -> SmallCNN:
    """Small 4-stage CNN for small images (cnnkit's own; no published weights)."""
    if pretrained:
        from cnnkit.errors import ModelError

        raise ModelError("smallcnn has no published pretrained weights; train it, then pass "
                         "the result with --init PATH")
    return SmallCNN(num_classes=num_classes, in_chans=in_chans, **kwargs)
