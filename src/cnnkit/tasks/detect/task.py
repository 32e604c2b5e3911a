"""Object detection as a task: batches of letterboxed images with box targets, the detector's
own loss dict, COCO metrics in original-image pixels, and drawing.

Every detector (:mod:`cnnkit.models.detection.zoo`) takes float images in [0, 1] and returns
losses in training mode and ``{"boxes", "scores", "labels"}`` per image in eval mode, so this
task is the same for Faster R-CNN, RetinaNet, SSD and fastdet.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from cnnkit.data.detection import collate as _collate
from cnnkit.tasks.base import Task, images_to_device


def to_original(boxes: torch.Tensor, scale: float, height: int, width: int) -> torch.Tensor:
    """Letterboxed pixels -> pixels of the original image (clipped to it)."""
    b = boxes.float() / scale
    b[:, 0::2] = b[:, 0::2].clamp(0, width)
    b[:, 1::2] = b[:, 1::2].clamp(0, height)
    return b


def masks_to_original(masks: torch.Tensor, scale: float, height: int, width: int, threshold: float = 0.5):
    """Letterboxed instance masks (N, S, S) or (N, 1, S, S), probabilities or 0/1, -> bool
    (N, height, width) of the original image: the padding is cut off, the rest resized
    (bilinear, then thresholded at ``threshold``). The work stays on the masks' device and only
    the bool result is copied (100 float masks of a 320 px image are 40 MB)."""
    m = masks.detach()
    if m.ndim == 4:
        m = m[:, 0]
    if not len(m):
        return np.zeros((0, height, width), bool)
    nh, nw = max(1, round(height * scale)), max(1, round(width * scale))
    m = m[:, :nh, :nw]
    if (nh, nw) != (height, width):
        m = torch.nn.functional.interpolate(m[:, None].float(), size=(height, width), mode="bilinear",
                                            align_corners=False)[:, 0]
    return (m >= threshold).cpu().numpy()


class DetectMetrics:
    """Collects predictions and ground truth of a pass and scores them with pycocotools
    (boxes; with ``masks`` also instance masks, pycocotools ``segm``)."""

    def __init__(self, names: list[str], category_ids: list[int] | None = None, keep_predictions: bool = False,
                 masks: bool = False):
        from cnnkit.tasks.detect.metrics import DetectionEvaluator

        self.evaluator = DetectionEvaluator(names, category_ids)
        self.keep_predictions, self.masks = keep_predictions, masks
        self.predictions: list[tuple] = []
        self.loss_sum, self.count = 0.0, 0

    def update(self, output: list[dict], batch: dict) -> None:
        for pred, t in zip(output, batch["targets"]):
            h, w = t["orig_size"]
            pb = to_original(pred["boxes"].detach().cpu(), t["scale"], h, w).numpy()
            gb = to_original(t["boxes"].detach().cpu(), t["scale"], h, w).numpy()
            ps, pl = pred["scores"].detach().float().cpu().numpy(), pred["labels"].detach().cpu().numpy()
            gm = pm = None
            if self.masks:  # ground truth at full resolution when the loader kept it (evaluation)
                gm = t["orig_masks"] if "orig_masks" in t else masks_to_original(t["masks"], t["scale"], h, w)
                pm = masks_to_original(pred["masks"], t["scale"], h, w)
            self.evaluator.add(t["image_id"], w, h, gb, t["labels"].cpu().numpy(), pb, ps, pl,
                               gt_occlusion=t["occlusion"].cpu().numpy(), gt_masks=gm, pred_masks=pm)
            if self.keep_predictions:
                if self.masks:
                    from cnnkit.tasks.detect.metrics import encode_masks

                    self.predictions.append((t["image_id"], pb, ps, pl, encode_masks(pm, len(pl), h, w)))
                else:
                    self.predictions.append((t["image_id"], pb, ps, pl))

    def compute(self) -> dict[str, Any]:
        out = self.evaluator.compute()
        if self.masks:  # instance segmentation names both kinds of AP
            for k in ("map50_95", "map50", "map75"):
                out[f"box_{k}"] = out[k]
        return out


class DetectTask(Task):
    """Detection: ``batch = {"images": uint8 (B, 3, S, S), "targets": [dict]}``."""

    name = "detect"
    monitor = "map50_95"
    monitor_mode = "max"

    def __init__(self, names: list[str], category_ids: list[int] | None = None, masks: bool = False,
                 loss=None):
        self.names = list(names)
        self.loss_fn = loss  # fastdet: a FastDetLoss over the model's raw outputs
        self.category_ids = category_ids
        self.masks = masks  # instance segmentation: targets and outputs carry masks
        if masks:
            self.name, self.monitor = "instance", "mask_map50_95"

    def collate(self, items: list) -> dict:
        return _collate(items)

    def to_device(self, batch: dict, device: torch.device, channels_last: bool = False) -> dict:
        out = dict(batch)
        out["images"] = images_to_device(batch["images"], device, channels_last)
        out["targets"] = [{**t, "boxes": t["boxes"].to(device), "labels": t["labels"].to(device),
                           **({"masks": t["masks"].to(device)} if "masks" in t else {})}
                          for t in batch["targets"]]
        return out

    def forward(self, model: nn.Module, batch: dict) -> Any:
        if model.training and self.loss_fn is None:  # torchvision's detectors compute their losses inside
            return model(batch["images"], batch["targets"])
        return model(batch["images"])

    def loss(self, output, batch: dict) -> dict[str, torch.Tensor]:
        """fastdet: the task's :class:`~cnnkit.tasks.detect.losses.FastDetLoss` on the raw
        outputs; torchvision's detectors (the documented exception): their own loss dict."""
        if self.loss_fn is not None:
            return self.loss_fn(output, batch["targets"])
        if "loss" in output:
            return output
        total = sum(output.values())
        return {"loss": total, **{k: v.detach() for k, v in output.items()}}

    def metrics(self, device: torch.device | None = None) -> DetectMetrics:
        return DetectMetrics(self.names, self.category_ids, masks=self.masks)

    def summary(self, metrics: dict[str, Any]) -> str:
        keys = ("mask_map50_95", "mask_map50", "box_map50_95") if self.masks else ("map50_95", "map50")
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in keys if isinstance(metrics.get(k), float))


_PALETTE = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180),
            (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255))


def class_color(k: int) -> tuple[int, int, int]:
    return _PALETTE[k % len(_PALETTE)]


def draw_detections(image: torch.Tensor, boxes, labels, scores, names: list[str], width: int = 2,
                    masks=None) -> torch.Tensor:
    """uint8 (3, H, W) image with boxes and ``name score`` captions, and instance ``masks``
    (bool (N, H, W)) painted in the class colours (torchvision's drawing)."""
    from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

    boxes = torch.as_tensor(np.asarray(boxes, np.float32)).reshape(-1, 4)
    if len(boxes) == 0:
        return image
    if masks is not None and len(masks):
        m = torch.stack([torch.as_tensor(x, dtype=torch.bool) for x in masks]) if isinstance(masks, list) \
            else torch.as_tensor(masks, dtype=torch.bool)
        image = draw_segmentation_masks(image, m, alpha=0.45, colors=[class_color(int(c)) for c in labels])
    captions = [f"{names[int(c)]} {float(s):.2f}" for c, s in zip(labels, scores)]
    colors = [class_color(int(c)) for c in labels]
    return draw_bounding_boxes(image, boxes, captions, colors=colors, width=width)
