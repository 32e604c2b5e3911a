"""Detectors behind ``cnnkit detect --model``: one interface over torchvision's and ours.

Every detector here is a :class:`Detector`: it takes a float batch in [0, 1] of letterboxed
squares ``(B, 3, S, S)`` (normalization happens inside), and in training mode with targets
returns a dict of losses; in eval mode it returns per image ``{"boxes" (N, 4) xyxy pixels,
"scores" (N,), "labels" (N,) 0-based}``. The two-stage and anchor-based one-stage models are
torchvision's own (FasterRCNN with its RPN, MultiScaleRoIAlign and box head; RetinaNet with
focal loss; SSD and SSDlite heads) on registry backbones with a feature pyramid; ``fastdet``
is cnnkit's anchor-free detector (:mod:`cnnkit.models.detection.fastdet`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.core.choices import DETECTORS, INSTANCE_MODELS
from cnnkit.errors import ModelError

DEFAULT_BACKBONE = {"fasterrcnn": "resnet18", "retinanet": "resnet18", "ssd": "resnet18",
                    "ssdlite": "mobilenet_v3_large", "fastdet": "fastdet", "maskrcnn": "resnet18"}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_anchors(arch: str, imgsz: int) -> tuple[tuple, tuple]:
    """``(sizes per level, aspect ratios per level)`` of the anchor-based models at ``imgsz``:
    three sizes per FPN level spanning 1/20 .. 2/3 of the image, ratios 0.5, 1, 2."""
    base = max(8, imgsz // 20)
    if arch == "retinanet":  # P3-P7: 5 levels, sizes x 2^(0, 1/3, 2/3) as in the paper
        return (tuple(tuple(round(base * 2 ** i * 2 ** (j / 3)) for j in range(3)) for i in range(5)),
                ((0.5, 1.0, 2.0),) * 5)
    if arch in ("fasterrcnn", "maskrcnn"):  # P2-P6 (stride 4 .. 64): one size per level, three ratios
        return tuple((round(base * 0.6 * 2 ** i),) for i in range(5)), ((0.5, 1.0, 2.0),) * 5
    raise ModelError(f"'{arch}' has no anchor sizes")


class Detector(nn.Module):
    """Adapter giving torchvision detectors cnnkit's interface (0-based labels, [0, 1] input).

    ``background`` is True for models whose class 0 is background (Faster R-CNN, SSD): labels
    are shifted by one on the way in and out.
    """

    def __init__(self, net: nn.Module, background: bool):
        super().__init__()
        self.net = net
        self.background = background
        self.nms, self.iou, self.conf, self.max_det = "hard", 0.5, 0.05, 100

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None) -> Any:
        imgs = list(images)
        if self.training:
            if targets is None:
                raise ValueError("training needs targets")
            shift = int(self.background)
            tv_targets = [{"boxes": t["boxes"], "labels": t["labels"] + shift,
                           **({"masks": t["masks"]} if "masks" in t else {})} for t in targets]
            return self.net(imgs, tv_targets)
        # torchvision decodes boxes in the dtype of the head's output: under bf16 autocast that
        # is 8 bits of mantissa, 2-pixel steps at 320 px, which costs mAP75. Inference runs in
        # float32 (training keeps autocast; its losses are on small deltas, where bf16 is fine).
        with torch.autocast(images.device.type, enabled=False):
            out = self.net([i.float() for i in imgs])
        if self.background:
            out = [{**o, "labels": o["labels"] - 1} for o in out]
        if self.nms == "soft":  # torchvision ran no suppression (IoU 1.0): soft-NMS here
            from cnnkit.models.detection.nms import soft_nms

            res = []
            for o in out:
                keep, scores = soft_nms(o["boxes"], o["scores"], o["labels"], self.iou, min_score=self.conf,
                                        max_det=self.max_det)
                res.append({**o, "boxes": o["boxes"][keep], "scores": scores, "labels": o["labels"][keep],
                            **({"masks": o["masks"][keep]} if "masks" in o else {})})
            out = res
        return out

    def set_thresholds(self, conf: float, iou: float, max_det: int, nms: str = "hard") -> None:
        """Score threshold, NMS IoU, detections per image and NMS method (``hard``: torchvision's
        own, inside the model; ``soft``: the model keeps up to 1000 boxes without suppression and
        :func:`~cnnkit.models.detection.nms.soft_nms` decays their scores) used in eval mode."""
        from cnnkit.models.detection.nms import NMS_METHODS

        if nms not in NMS_METHODS:
            raise ModelError(f"NMS method must be one of {', '.join(NMS_METHODS)}, got {nms!r}")
        self.nms, self.iou, self.conf, self.max_det = nms, iou, conf, max_det
        inner_iou, inner_max = (1.0, max(1000, max_det)) if nms == "soft" else (iou, max_det)
        n = self.net
        if hasattr(n, "roi_heads"):
            n.roi_heads.score_thresh, n.roi_heads.nms_thresh, n.roi_heads.detections_per_img = \
                conf, inner_iou, inner_max
        else:
            n.score_thresh, n.nms_thresh, n.detections_per_img = conf, inner_iou, inner_max


def _pair_generator(levels):
    from cnnkit.models.detection.anchors import PairAnchorGenerator

    return PairAnchorGenerator([[tuple(map(float, wh)) for wh in lvl] for lvl in levels])


def build_detector(arch: str, num_classes: int, imgsz: int, backbone: str | None = None,
                   pretrained: bool = False, anchors: list | None = None, fpn_channels: int = 128,
                   **kwargs) -> nn.Module:
    """Build a detector for ``num_classes`` object classes.

    Args:
        arch: one of :data:`DETECTORS`.
        num_classes: object classes (no background).
        imgsz: letterboxed input side; torchvision's internal resize is pinned to it.
        backbone: registry model name (``cnnkit models``); defaults per arch.
        pretrained: ImageNet weights for the backbone through the registry's loader.
        anchors: per-level lists of ``[w, h]`` pixels (``cnnkit detect anchors``) replacing
            the default sizes x ratios; Faster R-CNN and RetinaNet only.
        fpn_channels: channels of the feature pyramid.
        **kwargs: fastdet options (``width``).
    """
    from torchvision.models.detection import FasterRCNN, RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    from cnnkit.models.detection.backbone import BackboneFPN, registry_backbone

    if arch not in DETECTORS + INSTANCE_MODELS:
        import difflib

        close = difflib.get_close_matches(arch, DETECTORS + INSTANCE_MODELS, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ModelError(f"unknown detector '{arch}'{hint}; choose from {', '.join(DETECTORS + INSTANCE_MODELS)}")
    if arch == "fastdet":
        from cnnkit.models.detection.fastdet import FastDet

        if backbone not in (None, "fastdet"):
            raise ModelError("fastdet has its own backbone; --backbone applies to fasterrcnn, retinanet, ssd, ssdlite")
        if anchors is not None:
            raise ModelError("fastdet is anchor-free; --anchors applies to fasterrcnn and retinanet")
        return FastDet(num_classes, **kwargs)
    if kwargs:
        raise ModelError(f"{arch} does not take {', '.join(sorted(kwargs))}")
    body = registry_backbone(backbone or DEFAULT_BACKBONE[arch], pretrained)
    common = dict(min_size=imgsz, max_size=imgsz, image_mean=list(IMAGENET_MEAN), image_std=list(IMAGENET_STD))
    if anchors is not None and arch not in ("fasterrcnn", "retinanet", "maskrcnn"):
        raise ModelError(f"--anchors applies to fasterrcnn, maskrcnn and retinanet, not {arch}")
    if arch in ("fasterrcnn", "maskrcnn"):
        bb = BackboneFPN(body, (4, 8, 16, 32), fpn_channels, extra="pool")
        if anchors is not None:
            if len(anchors) != 5:
                raise ModelError(f"{arch} takes anchors for 5 levels (P2-P6), the file has {len(anchors)}")
            gen = _pair_generator(anchors)
        else:
            sizes, ratios = default_anchors(arch, imgsz)
            gen = AnchorGenerator(sizes, ratios)
        # proposal and RoI sampling sized for small images with tens of objects, not COCO at
        # 800 px (torchvision: 2000 proposals, 512 RoIs per image): 1.8x faster training steps
        # at 320 px (benchmarks/detect_models.py speed: 2.10 vs 1.18 images/s on 2 CPU cores)
        # Mask R-CNN is the same detector plus torchvision's mask branch (RoIAlign 14x14 on the
        # FPN levels, four 3x3 convs, a 2x deconvolution, per-class 28x28 mask logits)
        from torchvision.models.detection import MaskRCNN
        from torchvision.models.detection.rpn import RPNHead

        cls = MaskRCNN if arch == "maskrcnn" else FasterRCNN
        net = cls(bb, num_classes=num_classes + 1, rpn_anchor_generator=gen,
                  rpn_head=RPNHead(fpn_channels, gen.num_anchors_per_location()[0]),
                  rpn_pre_nms_top_n_train=1000, rpn_post_nms_top_n_train=500,
                  rpn_pre_nms_top_n_test=600, rpn_post_nms_top_n_test=300,
                  box_batch_size_per_image=128, box_detections_per_img=100, **common)
        return Detector(net, background=True)
    if arch == "retinanet":
        from torchvision.models.detection.retinanet import RetinaNetHead

        bb = BackboneFPN(body, (8, 16, 32), fpn_channels, extra="p6p7")
        if anchors is not None:
            if len(anchors) != 5:
                raise ModelError(f"retinanet takes anchors for 5 levels (P3-P7), the file has {len(anchors)}")
            gen = _pair_generator(anchors)
        else:
            sizes, ratios = default_anchors(arch, imgsz)
            gen = AnchorGenerator(sizes, ratios)
        # GroupNorm in the head's conv towers, as torchvision's retinanet_resnet50_fpn_v2: trained from
        # scratch, the plain (v1) head stalled (shapes, 5 GPU minutes: mAP50 0.06; with GN 0.58,
        # BENCHMARKS.md)
        from functools import partial

        head = RetinaNetHead(fpn_channels, gen.num_anchors_per_location()[0], num_classes,
                             norm_layer=partial(nn.GroupNorm, 32))
        net = RetinaNet(bb, num_classes, anchor_generator=gen, head=head, detections_per_img=100, **common)
        return Detector(net, background=False)
    # SSD / SSDlite: default boxes on the pyramid levels (stride 8 .. 64)
    from torchvision.models.detection.anchor_utils import DefaultBoxGenerator
    from torchvision.models.detection.ssd import SSD, SSDHead
    from torchvision.models.detection.ssdlite import SSDLiteHead

    bb = BackboneFPN(body, (8, 16, 32), fpn_channels, extra="pool")
    gen = DefaultBoxGenerator([[2], [2, 3], [2, 3], [2]], min_ratio=0.1, max_ratio=0.8)
    chans = [fpn_channels] * 4
    if arch == "ssd":
        head = SSDHead(chans, gen.num_anchors_per_location(), num_classes + 1)
    else:
        from functools import partial

        head = SSDLiteHead(chans, gen.num_anchors_per_location(), num_classes + 1,
                           partial(nn.BatchNorm2d, eps=0.001, momentum=0.03))
    net = SSD(_ListBackbone(bb), gen, (imgsz, imgsz), num_classes + 1, image_mean=list(IMAGENET_MEAN),
              image_std=list(IMAGENET_STD), head=head, detections_per_img=100, topk_candidates=400)
    return Detector(net, background=True)


class _ListBackbone(nn.Module):
    """SSD wants the feature maps in order; the FPN returns them keyed "0".."3","pool"."""

    def __init__(self, fpn: nn.Module):
        super().__init__()
        self.fpn = fpn
        self.out_channels = fpn.out_channels

    def forward(self, x: torch.Tensor):
        from collections import OrderedDict

        return OrderedDict((str(i), v) for i, v in enumerate(self.fpn(x).values()))
