"""``fastdet``: cnnkit's anchor-free one-stage detector for CPUs and edge devices.

Design (the recipe of the anchor-free YOLO family, written here so that it trains through
cnnkit's Trainer and exports as one plain ``nn.Module``):

- backbone: Conv-BN-SiLU stem and four stride-2 stages of CSP blocks (two 1x1 convs around
  a chain of residual 3x3 bottlenecks whose outputs are all concatenated), SPPF on top;
- neck: a path-aggregation pyramid (top-down then bottom-up) giving strides 8, 16, 32;
- head: decoupled per level, a classification branch (sigmoid per class, no objectness) and
  a box branch predicting the four distances to the box sides as a distribution over
  ``reg_max`` bins (distribution focal loss, Li et al. 2020);
- assignment: task-aligned (TOOD, Feng et al. 2021): for each object the ``topk`` anchor
  points inside it with the highest ``score^0.5 * IoU^6``; classification targets are that
  alignment normalised to the object's best IoU, so scores rank boxes by localisation quality;
- losses (in the task, :mod:`cnnkit.tasks.detect.losses`): BCE for classes, complete-IoU
  (torchvision's ``complete_box_iou_loss``) and DFL for boxes; decoding uses torchvision's
  ``batched_nms`` (or soft-NMS).

Why hand-written: torchvision has no anchor-free detector of this kind (its FCOS uses a
ResNet-FPN and centerness, several times the CPU cost), and the peers that have one
(Ultralytics, PP-YOLOE) are whole frameworks; the model and its loss are ~300 lines here.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.data.illumination import illuminate
from cnnkit.models.blocks import upsample_nearest
from cnnkit.models.detection.nms import suppress

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Conv(nn.Sequential):
    """Conv2d (no bias) + BatchNorm + SiLU."""

    def __init__(self, c1: int, c2: int, k: int = 3, s: int = 1):
        super().__init__(nn.Conv2d(c1, c2, k, s, k // 2, bias=False), nn.BatchNorm2d(c2, eps=1e-3, momentum=0.03),
                         nn.SiLU(inplace=True))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool = True):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c, 3), Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class CSP(nn.Module):
    """Two 1x1 branches, ``n`` bottlenecks on the second, every intermediate concatenated and
    fused (C2f).

    C2f computes both branches as one 1x1 conv whose output is chunked in two; here they are
    two convs (the same arithmetic), so structured pruning (Torch-Pruning's dependency graph,
    which mis-indexes ``chunk``) can narrow each branch on its own. Weights saved with the one
    conv (``cv1`` of twice the width) still load: they are split on the way in.
    """

    def __init__(self, c1: int, c2: int, n: int = 1, shortcut: bool = True):
        super().__init__()
        self.c = c2 // 2
        self.cv0, self.cv1 = Conv(c1, self.c, 1), Conv(c1, self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, c2, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        for m in self.m:
            y.append(m(y[-1]))
        return self.cv2(torch.cat(y, 1))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if prefix + "cv0.0.weight" not in state_dict and prefix + "cv1.0.weight" in state_dict:
            for key in [k for k in state_dict if k.startswith(prefix + "cv1.")]:  # one conv of both branches
                t = state_dict.pop(key)
                first, second = (t, t) if t.dim() == 0 else t.chunk(2, 0)
                state_dict[prefix + "cv0." + key[len(prefix) + 4:]] = first
                state_dict[key] = second
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)


class SPPF(nn.Module):
    """Spatial pyramid pooling (fast): three chained 5x5 max pools, concatenated."""

    def __init__(self, c: int):
        super().__init__()
        self.cv1, self.cv2 = Conv(c, c // 2, 1), Conv(c // 2 * 4, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.cv1(x)
        y1 = F.max_pool2d(x, 5, 1, 2)
        y2 = F.max_pool2d(y1, 5, 1, 2)
        return self.cv2(torch.cat([x, y1, y2, F.max_pool2d(y2, 5, 1, 2)], 1))


class FastDet(nn.Module):
    """Anchor-free detector; see the module docstring.

    Args:
        num_classes: object classes.
        width: channels of the stem; stages use 2x, 4x, 8x, 16x (16 gives 32..256).
        depth: bottlenecks per CSP block multiplier (1: 1, 2, 2, 1 in the four stages).
        reg_max: bins of the box-side distributions (distances up to ``reg_max - 1`` strides).
        topk: anchor points assigned per object.
        illumination: the lighting normalized inside the model before its mean/std
            (:mod:`cnnkit.data.illumination`; ``"none"``: as the pixels come).

    Shape:
        input float ``(B, 3, S, S)`` in [0, 1], S a multiple of 32.
    """

    strides = (8, 16, 32)

    def __init__(self, num_classes: int, width: int = 16, depth: float = 1.0, reg_max: int = 16,
                 topk: int = 10, box_gain: float = 7.5, cls_gain: float = 0.5, dfl_gain: float = 1.5,
                 illumination: str = "none"):
        super().__init__()
        self.illumination = illumination  # lighting normalized before the mean/std (cnnkit.data.illumination)
        self.num_classes, self.reg_max, self.topk = num_classes, reg_max, topk
        self.gains = (box_gain, cls_gain, dfl_gain)
        self.conf, self.iou, self.max_det, self.nms = 0.001, 0.6, 100, "hard"
        w = [width * m for m in (1, 2, 4, 8, 16)]
        n = [max(1, round(k * depth)) for k in (1, 2, 2, 1)]
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.stem = Conv(3, w[0], 3, 2)
        self.stage1 = nn.Sequential(Conv(w[0], w[1], 3, 2), CSP(w[1], w[1], n[0]))
        self.stage2 = nn.Sequential(Conv(w[1], w[2], 3, 2), CSP(w[2], w[2], n[1]))  # P3, stride 8
        self.stage3 = nn.Sequential(Conv(w[2], w[3], 3, 2), CSP(w[3], w[3], n[2]))  # P4, stride 16
        self.stage4 = nn.Sequential(Conv(w[3], w[4], 3, 2), CSP(w[4], w[4], n[3]), SPPF(w[4]))  # P5
        self.td4 = CSP(w[4] + w[3], w[3], n[0], shortcut=False)
        self.td3 = CSP(w[3] + w[2], w[2], n[0], shortcut=False)
        self.down3 = Conv(w[2], w[2], 3, 2)
        self.bu4 = CSP(w[2] + w[3], w[3], n[0], shortcut=False)
        self.down4 = Conv(w[3], w[3], 3, 2)
        self.bu5 = CSP(w[3] + w[4], w[4], n[0], shortcut=False)
        chans = (w[2], w[3], w[4])
        cb = max(16, chans[0] // 4, 4 * reg_max)
        cc = max(chans[0], min(num_classes, 100))
        self.box_head = nn.ModuleList(nn.Sequential(Conv(c, cb), Conv(cb, cb), nn.Conv2d(cb, 4 * reg_max, 1))
                                      for c in chans)
        self.cls_head = nn.ModuleList(nn.Sequential(Conv(c, cc), Conv(cc, cc), nn.Conv2d(cc, num_classes, 1))
                                      for c in chans)
        self.register_buffer("proj", torch.arange(reg_max, dtype=torch.float32), persistent=False)
        self._init_bias(640)

    def _init_bias(self, imgsz: int) -> None:
        """Start with ~5 objects per image spread over the anchor points (prior probability),
        so the first steps are not spent unlearning a 0.5 score everywhere."""
        for box, cls, s in zip(self.box_head, self.cls_head, self.strides):
            nn.init.constant_(box[-1].bias, 1.0)
            nn.init.constant_(cls[-1].bias, math.log(5 / self.num_classes / (imgsz / s) ** 2))

    # ---- network ------------------------------------------------------------------------
    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = (illuminate(x, self.illumination) - self.mean) / self.std
        p3 = self.stage2(self.stage1(self.stem(x)))
        p4 = self.stage3(p3)
        p5 = self.stage4(p4)
        t4 = self.td4(torch.cat([upsample_nearest(p5, p4.shape[-2:]), p4], 1))
        n3 = self.td3(torch.cat([upsample_nearest(t4, p3.shape[-2:]), p3], 1))
        n4 = self.bu4(torch.cat([self.down3(n3), t4], 1))
        n5 = self.bu5(torch.cat([self.down4(n4), p5], 1))
        return [n3, n4, n5]

    def raw(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cls_logits (B, A, C), box_logits (B, A, 4, reg_max), points (A, 2), strides (A,))``
        over all A anchor points of the three levels."""
        cls, box, pts, strides = [], [], [], []
        for f, bh, ch, s in zip(self.features(x), self.box_head, self.cls_head, self.strides):
            b, _, h, w = f.shape
            cls.append(ch(f).flatten(2).transpose(1, 2))
            box.append(bh(f).view(b, 4, self.reg_max, h * w).permute(0, 3, 1, 2))
            ys, xs = torch.meshgrid(torch.arange(h, device=f.device, dtype=torch.float32),
                                    torch.arange(w, device=f.device, dtype=torch.float32), indexing="ij")
            pts.append(torch.stack([xs.flatten(), ys.flatten()], 1).add_(0.5).mul_(s))
            strides.append(torch.full((h * w,), float(s), device=f.device))
        return torch.cat(cls, 1), torch.cat(box, 1), torch.cat(pts), torch.cat(strides)

    def decode(self, box_logits: torch.Tensor, points: torch.Tensor, strides: torch.Tensor) -> torch.Tensor:
        """Box logits -> xyxy pixels (expected distance under each side's distribution)."""
        return decode_boxes(box_logits, points, strides, self.proj)

    def forward(self, images: torch.Tensor):
        """Training: the raw outputs of :meth:`raw` (the task computes the loss,
        :class:`cnnkit.tasks.detect.losses.FastDetLoss`); eval: detections per image after the
        thresholds of :meth:`set_thresholds`."""
        cls, box, pts, strides = self.raw(images)
        if self.training:
            return cls, box, pts, strides
        return self.postprocess(cls, self.decode(box, pts, strides))

    def set_thresholds(self, conf: float, iou: float, max_det: int, nms: str = "hard") -> None:
        """Score threshold, NMS IoU, detections per image and NMS method (``hard`` or ``soft``)."""
        self.conf, self.iou, self.max_det, self.nms = conf, iou, max_det, nms

    @torch.no_grad()
    def fuse(self) -> FastDet:
        """Fold every BatchNorm into the convolution before it (inference only: the result
        computes the same function in eval mode with one layer less per block)."""
        from torch.nn.utils.fusion import fuse_conv_bn_eval

        self.eval()
        for m in self.modules():
            if isinstance(m, Conv) and isinstance(m[1], nn.BatchNorm2d):
                m[0] = fuse_conv_bn_eval(m[0], m[1])
                m[1] = nn.Identity()
        return self

    @torch.no_grad()
    def postprocess(self, cls: torch.Tensor, boxes: torch.Tensor) -> list[dict]:
        """Per image: every (point, class) above ``conf`` (at most 3000), class-wise NMS (hard or
        soft, :mod:`~cnnkit.models.detection.nms`), the best ``max_det``."""
        out = []
        scores_all = cls.float().sigmoid()
        for scores, bx in zip(scores_all, boxes):
            a, c = torch.nonzero(scores > self.conf, as_tuple=True)
            sc = scores[a, c]
            if sc.numel() > 3000:
                sc, keep = sc.topk(3000)
                a, c = a[keep], c[keep]
            b = bx[a]
            keep, kept = suppress(b, sc, c, self.iou, self.max_det, self.nms, self.conf)
            out.append({"boxes": b[keep], "scores": kept, "labels": c[keep]})
        return out


def decode_boxes(box_logits: torch.Tensor, points: torch.Tensor, strides: torch.Tensor,
                 proj: torch.Tensor) -> torch.Tensor:
    """Box-side distributions ``(B, A, 4, R)`` -> xyxy pixels: the expected distance under each
    side's softmax (``proj`` = 0..R-1), in strides, from each anchor point."""
    dist = box_logits.float().softmax(-1) @ proj  # (B, A, 4) in strides
    dist = dist * strides[None, :, None]
    return torch.cat([points - dist[..., :2], points + dist[..., 2:]], -1)
