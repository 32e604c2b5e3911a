"""Detection's (and instance segmentation's) inference pipeline.

Preprocessing letterboxes every image to the card's square (longer side to the size, padded
right and bottom with grey 114) and scales it to [0, 1]; the detectors normalize inside.

Cores:
- fastdet: ``(scores (B, A, C) logits, boxes (B, A, 4) xyxy letterboxed pixels)`` over all A
  anchor points; no thresholds or NMS, so it exports with a dynamic batch. Post-processing
  applies the sigmoid, the score threshold, class-wise NMS (hard or soft) and ``max_det``.
- torchvision's detectors (Faster R-CNN, RetinaNet, SSD, SSDlite, Mask R-CNN): the one
  documented exception to "no NMS in the core": their proposal and detection NMS live inside
  torchvision's modules, so the core is their eval forward for one image, ``(boxes, scores,
  labels[, masks])``, with the NMS IoU (``iou``, ``nms``) fixed when the model is built and a
  permissive score threshold (0.001); post-processing applies ``conf`` and ``max_det`` (and
  soft-NMS).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from cnnkit.core.card import ModelCard
from cnnkit.core.results import Detections
from cnnkit.errors import CnnkitError, ModelError, TargetError
from cnnkit.runtime.pipeline import Pipeline

BUILD_CONF = 0.001  # the score threshold inside torchvision's detectors (val uses 0.001 too)
ATTACK_CONF = 0.25  # a detection an attack should make vanish: predict's default threshold


class FastDetCore(nn.Module):
    """fastdet's network and box decoding, without thresholds or NMS."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cls, box, pts, strides = self.model.raw(x)
        return cls.float(), self.model.decode(box, pts, strides)


class TorchvisionCore(nn.Module):
    """A torchvision detector's eval forward for one image as a tuple of tensors (0-based
    labels, float32 even under autocast; masks ``(N, 1, S, S)`` probabilities)."""

    def __init__(self, detector: nn.Module):
        super().__init__()
        self.detector = detector

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.autocast(x.device.type, enabled=False):
            o = self.detector.net([x[0].float()])[0]
        labels = o["labels"] - int(self.detector.background)
        out = (o["boxes"], o["scores"], labels)
        return out + (o["masks"],) if "masks" in o else out


class DetectPipeline(Pipeline):
    task = "detect"
    channels_last = True

    def __init__(self, card: ModelCard):
        super().__init__(card)
        self.masks = card.task == "instance"
        self.fastdet = card.arch == "fastdet"
        self.batchable = self.fastdet
        self.fixed_batch = not self.fastdet  # torchvision's detectors: one image, a list of outputs
        t = card.thresholds
        self.iou, self.nms = float(t.get("iou", 0.6)), t.get("nms", "hard")
        self.max_det = int(t.get("max_det", 100))
        self.size = int(card.input.height)

    def configure(self, iou: float | None = None, nms: str | None = None) -> None:
        """NMS IoU and method: fastdet applies them per call; torchvision's detectors fix them
        in the model (and so in an exported file, whose card records them)."""
        from cnnkit.models.detection.nms import NMS_METHODS

        if nms is not None and nms not in NMS_METHODS:
            raise ModelError(f"--nms must be one of {', '.join(NMS_METHODS)}, got '{nms}'")
        self.iou = float(iou) if iou is not None else self.iou
        self.nms = nms or self.nms

    # ---- the model ----------------------------------------------------------------------
    def build(self) -> nn.Module:
        from cnnkit.models.detection.zoo import build_detector

        kw = dict(self.card.model_kwargs)
        imgsz = int(kw.pop("imgsz", self.size))
        extra = {"width": kw.pop("width")} if "width" in kw else {}
        if self.card.input.illumination != "none":  # fastdet only (the config refuses the others)
            extra["illumination"] = self.card.input.illumination
        model = build_detector(self.card.arch, self.card.num_classes, imgsz, kw.pop("backbone", None), False,
                               kw.pop("anchors", None), **extra)
        if not self.fastdet:  # thresholds inside torchvision's modules (soft: no suppression there)
            model.set_thresholds(BUILD_CONF, self.iou, self.max_det, self.nms)
        return model

    def core(self, model: nn.Module) -> nn.Module:
        if self.fastdet:
            if not model.training:
                model.fuse()  # BatchNorm folded into the convolutions: same function, faster
            return FastDetCore(model)
        return TorchvisionCore(model)

    def feature_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        from cnnkit.models.finetune import feature_stages

        if self.fastdet:
            return {n: getattr(model, n) for n in ("stage1", "stage2", "stage3", "stage4")}
        return feature_stages(model)

    # ---- data ---------------------------------------------------------------------------
    def prepare(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        from cnnkit.data.detection import letterbox

        h, w = image.shape[-2:]
        x, _, scale = letterbox(image, self.size)
        return x.float().div_(255), {"height": int(h), "width": int(w), "scale": scale}

    def run(self, backend, x: torch.Tensor, metas: list[dict[str, Any]]):
        if self.fastdet:
            return backend(x)
        return [backend(x[i:i + 1]) for i in range(len(x))]  # per image: (boxes, scores, labels[, masks])

    def detections(self, raw, conf: float = 0.25, max_det: int | None = None,
                   anchors: bool = False) -> list[dict[str, torch.Tensor]]:
        """Raw outputs -> per image ``{"boxes", "scores", "labels"[, "masks"]}`` in letterboxed
        pixels, after the score threshold, NMS and ``max_det`` (fastdet with ``anchors``: also
        ``"anchors"``, each detection's anchor point)."""
        from cnnkit.models.detection.nms import soft_nms, suppress

        max_det = int(max_det or self.max_det)
        out = []
        if self.fastdet:
            scores_all = raw[0].float().sigmoid()
            for scores, bx in zip(scores_all, raw[1]):
                a, c = torch.nonzero(scores > conf, as_tuple=True)
                sc = scores[a, c]
                if sc.numel() > 3000:
                    sc, keep = sc.topk(3000)
                    a, c = a[keep], c[keep]
                b = bx[a]
                keep, kept = suppress(b, sc, c, self.iou, max_det, self.nms, conf)
                d = {"boxes": b[keep], "scores": kept, "labels": c[keep]}
                if anchors:
                    d["anchors"] = a[keep]
                out.append(d)
            return out
        for r in raw:
            boxes, scores, labels = r[0], r[1], r[2].long()
            masks = r[3] if len(r) > 3 else None
            if self.nms == "soft":
                keep, scores = soft_nms(boxes, scores, labels, self.iou, min_score=conf, max_det=max_det)
            else:
                keep = torch.nonzero(scores >= conf)[:, 0][:max_det]  # already sorted by score
                scores = scores[keep]
            d = {"boxes": boxes[keep], "scores": scores, "labels": labels[keep]}
            if masks is not None:
                d["masks"] = masks[keep]
            out.append(d)
        return out

    def postprocess(self, raw, metas: list[dict[str, Any]], conf: float = 0.25, max_det: int | None = None,
                    **_) -> list[Detections]:
        from cnnkit.tasks.detect.task import masks_to_original, to_original

        results = []
        for d, m in zip(self.detections(raw, conf, max_det), metas):
            h, w, s = m["height"], m["width"], m["scale"]
            masks = torch.from_numpy(masks_to_original(d["masks"], s, h, w)) if "masks" in d else None
            results.append(Detections(m.get("path"), w, h, to_original(d["boxes"].float().cpu(), s, h, w),
                                      d["scores"].float().cpu(), d["labels"].cpu(), self.classes, masks))
        return results

    def target(self, raw, selector: Any) -> torch.Tensor:
        """One detection's score per sample.

        fastdet: the class logit at anchor point ``selector`` (an index per sample, its best
        class; or ``(anchor, class)``; None: each image's highest-scoring point and class).
        torchvision's detectors (their NMS runs inside): ``selector`` is ``(box, label)`` and the
        score is that of the output detection of that label overlapping the box most (IoU at
        least 0.5; 0 when there is none), the matching of pytorch-grad-cam's
        ``FasterRCNNBoxScoreTarget``.
        """
        if not self.fastdet:
            return torch.stack([self._matched_score(r, selector) for r in raw])
        cls = raw[0]
        flat = cls.flatten(1)
        if selector is None:
            return flat.max(1).values
        rows = torch.arange(len(cls), device=cls.device)
        if isinstance(selector, tuple):
            return cls[rows, int(selector[0]), int(selector[1])]
        idx = torch.as_tensor(selector, device=cls.device).expand(len(cls))
        return cls[rows, idx.long()].max(1).values

    def target_prob(self, raw, selector: Any) -> torch.Tensor:
        t = self.target(raw, selector)
        return torch.sigmoid(t) if self.fastdet else t  # torchvision's scores are probabilities

    def attack_loss(self, raw, ref, targeted: int | None = None, labels=None) -> torch.Tensor:
        """Objects vanish: minus the summed scores of every class at every place the clean
        image has a detection (score above 0.25). ``targeted`` (fastdet): those places'
        score for class ``targeted`` is added, so the objects change class."""
        if not self.fastdet:  # one image: (boxes, scores, labels[, masks]), NMS inside the model
            if targeted is not None:
                raise CnnkitError("--targeted needs fastdet: torchvision's detectors choose their boxes inside "
                                  "the model")
            scores = raw[1]
            return -(scores * (scores > ATTACK_CONF)).sum().view(1)
        p = raw[0].float().sigmoid()
        live = ref[0].float().sigmoid() > ATTACK_CONF
        loss = -(p * live).flatten(1).sum(1)
        if targeted is not None:
            loss = loss + (p[..., int(targeted)] * live.any(2)).sum(1)
        return loss

    def attack_success(self, raw, ref, targeted: int | None = None) -> torch.Tensor:
        """Share of the clean detections gone (fastdet: scores at their places below 0.25; or
        now of class ``targeted``); NaN for an image without detections."""
        if not self.fastdet:
            before = float((ref[1] > ATTACK_CONF).sum())
            after = float((raw[1] > ATTACK_CONF).sum())
            return torch.tensor([max(0.0, 1 - after / before) if before else float("nan")])
        p, live = raw[0].float().sigmoid(), ref[0].float().sigmoid() > ATTACK_CONF
        n = live.flatten(1).sum(1).float()
        if targeted is not None:
            hit = ((p.argmax(2) == int(targeted)) & live.any(2)).sum(1).float()
            return torch.where(n > 0, hit / live.any(2).sum(1).clamp(min=1), torch.full_like(n, float("nan")))
        kept = ((p > ATTACK_CONF) & live).flatten(1).sum(1).float()
        return torch.where(n > 0, 1 - kept / n.clamp(min=1), torch.full_like(n, float("nan")))

    @staticmethod
    def _matched_score(r, selector) -> torch.Tensor:
        boxes, scores, labels = r[0], r[1], r[2]
        j = _best_match(selector[0], selector[1], boxes, labels)
        return scores.sum() * 0 if j is None else scores[j]  # * 0 keeps the graph: a zero gradient

    def select(self, raw, target: Any, meta: dict[str, Any] | None = None) -> tuple[Any, str] | None:
        """``target``: a detection's index in the predict order (None: 0, the top one); with
        the ``predict`` defaults (``conf`` 0.25). A ground-truth object ``{"box": xyxy in the
        original image's pixels, "label"}`` picks the detection of its label overlapping it
        most (IoU at least 0.5, any score), or None when the model missed it."""
        if isinstance(target, dict):
            return self._select_object(raw, target, meta)
        dets = self.detections(raw, anchors=self.fastdet)[0]
        k = 0 if target is None else int(target) if str(target).lstrip("-").isdigit() else -1
        if not 0 <= k < len(dets["scores"]):
            n = len(dets["scores"])
            have = f"its {n} detections (indices 0-{n - 1})" if n else "no detections at conf 0.25"
            raise TargetError(f"--target takes a detection index and this image has {have}, not '{target}'")
        label = int(dets["labels"][k])
        return self._selector(dets, k), f"detection {k}: {self.classes[label]} {float(dets['scores'][k]):.2f}"

    def _select_object(self, raw, obj: dict[str, Any], meta: dict[str, Any]) -> tuple[Any, str] | None:
        dets = self.detections(raw, conf=BUILD_CONF, anchors=self.fastdet)[0]
        box = torch.as_tensor(obj["box"], dtype=torch.float32) * meta["scale"]
        k = _best_match(box, obj["label"], dets["boxes"].float().cpu(), dets["labels"].cpu())
        if k is None:
            return None
        return self._selector(dets, k), (f"{self.classes[int(obj['label'])]} object (detected at "
                                         f"{float(dets['scores'][k]):.2f})")

    def _selector(self, dets: dict[str, torch.Tensor], k: int) -> tuple:
        """:meth:`target`'s selector of detection ``k``: fastdet ``(anchor, class)``, else ``(box, label)``."""
        first = int(dets["anchors"][k]) if self.fastdet else dets["boxes"][k].detach()
        return first, int(dets["labels"][k])

    def explain_layer(self, model: nn.Module, selector: Any) -> tuple[str, nn.Module] | None:
        """fastdet: the neck output at the selected detection's stride, the map its score is
        computed from (the deepest backbone stage is 4 x 4 at 128 px and misses small objects)."""
        if not self.fastdet or not isinstance(selector, tuple):
            return None
        a = int(selector[0])
        for name, s in zip(("td3", "bu4", "bu5"), model.strides):
            n = (self.size // s) ** 2
            if a < n:
                return name, getattr(model, name)
            a -= n
        return None

    def map_to_image(self, m: torch.Tensor, meta: dict[str, Any]) -> torch.Tensor:
        """Undo the letterbox: the image's part of the square, resized to the image."""
        s = meta["scale"]
        h, w = int(meta["height"]), int(meta["width"])
        part = m[:max(1, round(h * s)), :max(1, round(w * s))]
        return torch.nn.functional.interpolate(part[None, None].float(), size=(h, w), mode="bilinear",
                                               align_corners=False)[0, 0]

    def box_on_image(self, selector, raw, meta: dict[str, Any]) -> list[float] | None:
        """The selected detection's box in the original image's pixels (for drawing)."""
        from cnnkit.tasks.detect.task import to_original

        box = raw[1][0, int(selector[0])] if self.fastdet else torch.as_tensor(selector[0])
        return to_original(box.detach().float().cpu().view(1, 4), meta["scale"], meta["height"],
                           meta["width"])[0].tolist()


def _best_match(box, label: int, boxes: torch.Tensor, labels: torch.Tensor) -> int | None:
    """Index of the box of ``label`` overlapping ``box`` most, if that IoU is at least 0.5."""
    from torchvision.ops import box_iou

    ok = labels.long() == int(label)
    if len(boxes) == 0 or not ok.any():
        return None
    iou = box_iou(torch.as_tensor(box, device=boxes.device, dtype=boxes.dtype).view(1, 4), boxes)[0]
    iou = torch.where(ok, iou, torch.zeros_like(iou))
    j = int(iou.argmax())
    return j if iou[j] >= 0.5 else None


def pipeline(card: ModelCard) -> DetectPipeline:
    return DetectPipeline(card)
