"""Softmax classification shared by the tasks that label a whole input: ``classify`` (images)
and ``medical`` classifiers (volumes): the loss, the torchmetrics metrics and top-k decoding."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.results import Classification
from cnnkit.data.classification import collate_classification
from cnnkit.tasks.base import Task
from cnnkit.tasks.losses import classification_loss


class ClassificationMetrics:
    """top-1/top-5 accuracy, per-class precision/recall/F1, macro-F1, balanced accuracy and the
    confusion matrix, all from torchmetrics; plus the mean loss."""

    def __init__(self, classes: list[str], device: torch.device | str = "cpu"):
        from torchmetrics import MetricCollection
        from torchmetrics.classification import (
            MulticlassAccuracy,
            MulticlassConfusionMatrix,
            MulticlassF1Score,
            MulticlassPrecision,
            MulticlassRecall,
        )

        n = len(classes)
        self.classes = classes
        self.collection = MetricCollection({
            "top1": MulticlassAccuracy(n, top_k=1, average="micro"),
            "top5": MulticlassAccuracy(n, top_k=min(5, n), average="micro"),
            "macro_f1": MulticlassF1Score(n, average="macro"),
            "balanced_accuracy": MulticlassRecall(n, average="macro"),
            "precision": MulticlassPrecision(n, average=None),
            "recall": MulticlassRecall(n, average=None),
            "f1": MulticlassF1Score(n, average=None),
            "confusion": MulticlassConfusionMatrix(n),
        }, compute_groups=False).to(device)
        self.loss_sum = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, batch: dict) -> None:
        logits = output.float()
        targets = batch["targets"]
        self.loss_sum += F.cross_entropy(logits, targets, reduction="sum").item()
        self.count += int(targets.numel())
        self.collection.update(logits, targets)

    def compute(self) -> dict[str, Any]:
        if self.count == 0:
            return {"loss": float("nan")}
        r = {k: v.cpu() for k, v in self.collection.compute().items()}
        conf = r["confusion"].long()
        support = conf.sum(1)
        per_class = {
            name: {"precision": float(r["precision"][i]), "recall": float(r["recall"][i]),
                   "f1": float(r["f1"][i]), "support": int(support[i])}
            for i, name in enumerate(self.classes)
        }
        return {
            "loss": self.loss_sum / self.count,
            "top1": float(r["top1"]), "top5": float(r["top5"]),
            "macro_f1": float(r["macro_f1"]), "balanced_accuracy": float(r["balanced_accuracy"]),
            "per_class": per_class, "confusion_matrix": conf.tolist(), "num_images": self.count,
        }


class SoftmaxTask(Task):
    """Single-label classification over ``classes``: images (``cnnkit classify``) or volumes
    (``cnnkit medical`` classifiers, with their own ``collate``)."""

    name = "classify"
    monitor = "top1"
    monitor_mode = "max"

    def __init__(self, classes: list[str], label_smoothing: float = 0.0, loss: str = "ce",
                 class_weights: torch.Tensor | None = None, ohem: float = 0.0, focal_gamma: float = 2.0,
                 gce_q: float = 0.7, temperature: float = 1.0):
        self.classes = list(classes)
        self.temperature = float(temperature)  # the training loss sees logits / T (defensive distillation)
        self.label_smoothing = label_smoothing
        self.loss_kind, self.ohem, self.focal_gamma, self.gce_q = loss, ohem, focal_gamma, gce_q
        self.class_weights = class_weights

    def collate(self, items: list) -> dict:
        return collate_classification(items)

    def loss(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        """The configured loss (see :mod:`cnnkit.tasks.losses`); targets may be soft (mixup)."""
        if self.temperature != 1.0:
            output = output / self.temperature
        loss = classification_loss(output, batch["targets"], self.loss_kind, self.label_smoothing,
                                   self.class_weights, self.ohem, self.focal_gamma, self.gce_q)
        return {"loss": loss}

    def step_metric(self, output: torch.Tensor, batch: dict) -> tuple[str, float, int]:
        targets = batch["targets"]
        if targets.ndim == 2:  # mixed samples: the dominant label
            targets = targets.argmax(1)
        correct = (output.detach().argmax(1) == targets).sum().item()
        return "acc", correct / max(1, targets.numel()), int(targets.numel())

    def metrics(self, device: torch.device | str = "cpu") -> ClassificationMetrics:
        return ClassificationMetrics(self.classes, device)

    def decode(self, output: torch.Tensor, paths: list[str | None] | None = None, topk: int = 5) -> list:
        """Softmax logits ``(B, K)`` into :class:`~cnnkit.core.results.Classification` results
        (the pipeline's decoding)."""
        return decode_topk(output, self.classes, paths or [None] * len(output), topk)

    def summary(self, metrics: dict[str, Any]) -> str:
        return f"top1 {metrics.get('top1', float('nan')):.4f}"

    @staticmethod
    def build_model(arch: str, num_classes: int, in_chans: int, pretrained: bool = False,
                    **kwargs) -> nn.Module:
        from cnnkit.models import create_model

        return create_model(arch, num_classes=num_classes, in_chans=in_chans, task="classify",
                            pretrained=pretrained, **kwargs)


def decode_topk(logits: torch.Tensor, classes: list[str], paths: list[str | None], topk: int = 5) -> list[Classification]:
    """Softmax logits ``(B, K)`` into :class:`~cnnkit.core.results.Classification` results."""
    probs = logits.float().softmax(1).cpu()
    k = min(topk, probs.shape[1])
    scores, idx = probs.topk(k, dim=1)
    return [Classification(p, classes[i[0]], i[0], s[0], [(classes[j], sc) for j, sc in zip(i, s)])
            for p, s, i in zip(paths, scores.tolist(), idx.tolist())]
