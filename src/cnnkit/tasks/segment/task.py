"""Semantic segmentation as a task: batches of images and class-id masks, pixel losses
(cross-entropy, Dice, focal, CE+Dice; class weights; ignore index), and IoU/Dice/accuracy
from one confusion matrix accumulated by torchmetrics.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.core.choices import SEG_LOSSES
from cnnkit.data.segmentation import IGNORE_INDEX, collate_segmentation
from cnnkit.tasks.base import Task, images_to_device


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = IGNORE_INDEX,
                   weight: torch.Tensor | None = None, eps: float = 1.0) -> torch.Tensor:
    """Multiclass soft Dice loss ``1 - mean_k (2 sum p_k g_k + eps) / (sum p_k + sum g_k + eps)``
    over the batch, with softmax probabilities ``p`` and one-hot targets ``g``; ignored pixels
    count for neither. Classes absent from both target and prediction score about 1 (the
    ``eps`` smoothing), so they neither reward nor punish.

    Hand-written because the library losses lack an ignore index (MONAI's ``DiceLoss`` has
    no mask for it); 15 lines, checked against the formula in the tests.
    """
    k = logits.shape[1]
    valid = (target != ignore_index)
    p = logits.float().softmax(1) * valid[:, None]
    g = F.one_hot(target.clamp(max=k - 1) * valid, k).permute(0, 3, 1, 2).float() * valid[:, None]
    dims = (0, 2, 3)
    inter = (p * g).sum(dims)
    denom = p.sum(dims) + g.sum(dims)
    dice = (2 * inter + eps) / (denom + eps)
    if weight is not None:
        w = weight.to(dice.device)
        return 1 - (dice * w).sum() / w.sum()
    return 1 - dice.mean()


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0, ignore_index: int = IGNORE_INDEX,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax focal loss per pixel ``-w_t (1 - p_t)^gamma log p_t``, mean over the pixels
    that are not ignored (Lin et al., 2017)."""
    logp = F.log_softmax(logits.float(), 1)
    valid = target != ignore_index
    t = target.clamp(max=logits.shape[1] - 1) * valid
    logpt = logp.gather(1, t[:, None])[:, 0]
    loss = -(1 - logpt.exp()).pow(gamma) * logpt
    if weight is not None:
        loss = loss * weight.to(loss.device)[t]
    return (loss * valid).sum() / valid.sum().clamp(min=1)


class SegMetrics:
    """Confusion matrix over a pass (torchmetrics ``MulticlassConfusionMatrix``, ignored pixels
    left out) and the metrics derived from it:

    - ``per_class_iou``: ``TP / (TP + FP + FN)`` per class name (None for a class absent from
      both the ground truth and the predictions); ``miou`` their mean.
    - ``per_class_dice`` / ``dice``: ``2 TP / (2 TP + FP + FN)``, likewise.
    - ``pixel_acc``: correct pixels / labelled pixels.

    These equal torchmetrics' ``MulticlassJaccardIndex`` and ``DiceScore`` macro averages
    where every class occurs (tests/test_segment.py checks the parity). Given ``loss_fn`` (the
    task's training loss) it also reports ``loss``, the image-weighted mean over the pass.
    """

    def __init__(self, names: list[str], ignore_index: int = IGNORE_INDEX, device: torch.device | None = None,
                 loss_fn=None):
        from torchmetrics.classification import MulticlassConfusionMatrix

        self.names = list(names)
        self.cm = MulticlassConfusionMatrix(len(names), ignore_index=ignore_index, validate_args=False)
        if device is not None:
            self.cm = self.cm.to(device)
        self.loss_fn, self.loss_sum, self.count = loss_fn, 0.0, 0

    def update(self, output: torch.Tensor, batch: dict) -> None:
        if self.loss_fn is not None and output.ndim == 4:
            self.loss_sum += float(self.loss_fn(output, batch)["loss"]) * len(output)
            self.count += len(output)
        pred = output.argmax(1) if output.ndim == 4 else output
        self.cm.update(pred.flatten(), batch["masks"].to(pred.device).flatten())

    def add_predictions(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Class-id maps of any shape (e.g. original-size masks)."""
        self.cm.update(pred.flatten().to(self.cm.device), target.flatten().to(self.cm.device))

    def compute(self) -> dict[str, Any]:
        out = metrics_from_confusion(self.cm.compute().double().cpu(), self.names)
        if self.count:
            out["loss"] = self.loss_sum / self.count
        return out


def metrics_from_confusion(cm: torch.Tensor, names: list[str]) -> dict[str, Any]:
    """IoU, Dice and pixel accuracy from a ``(K, K)`` confusion matrix (rows: truth)."""
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    union = tp + fp + fn
    present = union > 0
    iou = torch.where(present, tp / union.clamp(min=1), torch.full_like(tp, float("nan")))
    dice = torch.where(present, 2 * tp / (2 * tp + fp + fn).clamp(min=1), torch.full_like(tp, float("nan")))
    total = cm.sum()

    def per(v):
        return {n: (None if torch.isnan(x) else round(float(x), 6)) for n, x in zip(names, v)}

    return {
        "miou": float(iou[present].mean()) if present.any() else 0.0,
        "dice": float(dice[present].mean()) if present.any() else 0.0,
        "pixel_acc": float(tp.sum() / total) if total > 0 else 0.0,
        "per_class_iou": per(iou),
        "per_class_dice": per(dice),
        "num_pixels": int(total),
    }


class SegmentTask(Task):
    """Segmentation: ``batch = {"images": uint8 (B, 3, S, S), "masks": int64 (B, S, S)}``."""

    name = "segment"
    monitor = "miou"
    monitor_mode = "max"

    def __init__(self, names: list[str], loss: str = "ce+dice", class_weights: torch.Tensor | None = None,
                 ignore_index: int = IGNORE_INDEX, gamma: float = 2.0):
        if loss not in SEG_LOSSES:
            raise ValueError(f"unknown segmentation loss '{loss}'; choose from {', '.join(SEG_LOSSES)}")
        self.names = list(names)
        self.loss_kind = loss
        self.class_weights = class_weights
        self.ignore_index = ignore_index
        self.gamma = gamma

    def collate(self, items: list) -> dict:
        return collate_segmentation(items)

    def to_device(self, batch: dict, device: torch.device, channels_last: bool = False) -> dict:
        out = dict(batch)
        out["images"] = images_to_device(batch["images"], device, channels_last)
        out["masks"] = batch["masks"].to(device, non_blocking=True)
        return out

    def loss(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        target = batch["masks"]
        w = self.class_weights.to(output.device) if self.class_weights is not None else None
        parts: dict[str, torch.Tensor] = {}
        if self.loss_kind in ("ce", "ce+dice"):
            parts["ce"] = F.cross_entropy(output.float(), target, weight=w, ignore_index=self.ignore_index)
        if self.loss_kind in ("dice", "ce+dice"):
            parts["dice"] = soft_dice_loss(output, target, self.ignore_index, w)
        if self.loss_kind == "focal":
            parts["focal"] = focal_loss(output, target, self.gamma, self.ignore_index, w)
        total = sum(parts.values())
        return {"loss": total, **{k: v.detach() for k, v in parts.items()}} if len(parts) > 1 else {"loss": total}

    def metrics(self, device: torch.device | None = None) -> SegMetrics:
        return SegMetrics(self.names, self.ignore_index, device, loss_fn=self.loss)

    def step_metric(self, output: torch.Tensor, batch: dict) -> tuple[str, float, int] | None:
        valid = batch["masks"] != self.ignore_index
        n = int(valid.sum())
        if n == 0:
            return None
        acc = float(((output.argmax(1) == batch["masks"]) & valid).sum()) / n
        return "pix_acc", acc, n

    def summary(self, metrics: dict[str, Any]) -> str:
        return ", ".join(f"{k} {metrics[k]:.4f}" for k in ("miou", "dice", "pixel_acc") if isinstance(metrics.get(k), float))
