"""Multi-label classification: independent sigmoid outputs, BCE or asymmetric loss,
torchmetrics metrics (mAP, micro/macro F1), per-class thresholds tuned on validation data."""

from __future__ import annotations

import functools
import inspect
import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.choices import MULTILABEL_LOSSES as LOSSES
from cnnkit.data.multilabel import collate_multilabel
from cnnkit.tasks.base import Task

THRESHOLD_GRID = tuple(round(0.01 * i, 2) for i in range(1, 100))  # 0.01 .. 0.99


def asymmetric_loss(logits: torch.Tensor, targets: torch.Tensor, gamma_neg: float = 4.0,
                    gamma_pos: float = 0.0, clip: float = 0.05) -> torch.Tensor:
    """Asymmetric loss (ASL; Ridnik et al., ICCV 2021), averaged over images and classes.

    ``-[y (1-p)^g+ log p + (1-y) p_m^g- log(1-p_m)]`` with ``p_m = max(p - clip, 0)``: easy
    negatives (small ``p``) are down-weighted by the focusing power ``gamma_neg`` and those
    below ``clip`` are discarded, which suits multi-label data where most labels of an image
    are negative. With ``gamma_neg = gamma_pos = clip = 0`` it is binary cross-entropy.

    The loss is timm's ``AsymmetricLossMultiLabel`` (the reference code of the paper's
    authors, kept in timm), not a copy; only the reduction is fixed here to a mean so that
    learning rates carry over from BCE.

    Args:
        logits: raw outputs, float ``(B, K)``.
        targets: multi-hot (or soft) targets, float ``(B, K)``.
        gamma_neg: focusing power on negatives.
        gamma_pos: focusing power on positives.
        clip: probability margin shifted onto negatives (0 turns clipping off).

    Examples:
        >>> x, y = torch.randn(4, 3), torch.randint(0, 2, (4, 3)).float()
        >>> torch.allclose(asymmetric_loss(x, y, 0, 0, 0),
        ...                F.binary_cross_entropy_with_logits(x, y), atol=1e-6)
        True
    """
    total = _timm_asl(float(gamma_neg), float(gamma_pos), float(clip))(logits, targets)
    return total / max(1, targets.numel())


@functools.lru_cache(maxsize=8)
def _timm_asl(gamma_neg: float, gamma_pos: float, clip: float) -> nn.Module:
    from timm.loss import AsymmetricLossMultiLabel

    kwargs: dict[str, Any] = {"gamma_neg": gamma_neg, "gamma_pos": gamma_pos, "clip": clip}
    if "reduction" in inspect.signature(AsymmetricLossMultiLabel).parameters:
        kwargs["reduction"] = "sum"  # recent timm; older versions always sum
    return AsymmetricLossMultiLabel(**kwargs)


def tune_thresholds(probs: torch.Tensor, targets: torch.Tensor,
                    grid: tuple[float, ...] = THRESHOLD_GRID) -> list[float]:
    """Per-class thresholds that maximize each class's F1 on ``(probs, targets)``.

    Every threshold of ``grid`` is tried; among equally good ones the median is kept, so
    a perfectly separated class gets a threshold in the middle of the gap. A class without
    positives keeps 0.5.

    Shape:
        ``probs`` and ``targets`` ``(N, K)``; returns ``K`` floats.

    Examples:
        >>> p = torch.tensor([[0.3], [0.25], [0.1], [0.05]])
        >>> y = torch.tensor([[1.0], [1.0], [0.0], [0.0]])
        >>> 0.1 <= tune_thresholds(p, y)[0] < 0.25
        True
    """
    pos = targets > 0.5
    f1 = torch.zeros(len(grid), probs.shape[1])
    for g, t in enumerate(grid):  # a loop keeps memory at (N, K) for large sets
        pred = probs >= t
        tp = (pred & pos).sum(0).float()
        f1[g] = 2 * tp / (pred.sum(0) + pos.sum(0)).clamp(min=1)
    out = []
    for k in range(probs.shape[1]):
        if not pos[:, k].any():
            out.append(0.5)
            continue
        best = torch.nonzero(f1[:, k] >= f1[:, k].max() - 1e-9).flatten().tolist()
        out.append(float(grid[best[len(best) // 2]]))
    return out


class MultiLabelMetrics:
    """mAP, micro/macro F1 and per-class AP/precision/recall/F1/support (torchmetrics), plus
    the mean loss; F1, precision and recall use the per-class ``thresholds``.

    mAP is the mean average precision over the classes that have at least one positive in the
    evaluated split (a class without positives has no defined AP and is reported as None).
    With ``tune=True`` the thresholds are first tuned on the data itself (:func:`tune_thresholds`),
    as is done once on the validation split after training.
    """

    def __init__(self, classes: list[str], thresholds: list[float] | None = None,
                 loss_fn=None, tune: bool = False):
        self.classes = list(classes)
        self.thresholds = list(thresholds) if thresholds is not None else [0.5] * len(classes)
        self.loss_fn = loss_fn or F.binary_cross_entropy_with_logits
        self.tune = tune
        self.probs: list[torch.Tensor] = []
        self.targets: list[torch.Tensor] = []
        self.loss_sum = 0.0
        self.count = 0

    def update(self, output: torch.Tensor, batch: dict) -> None:
        logits, targets = output.float(), batch["targets"].float()
        self.loss_sum += float(self.loss_fn(logits, targets)) * len(targets)
        self.count += len(targets)
        self.probs.append(logits.sigmoid().cpu())
        self.targets.append(targets.cpu())

    def compute(self) -> dict[str, Any]:
        from torchmetrics.functional.classification import (
            multilabel_average_precision,
            multilabel_f1_score,
            multilabel_precision,
            multilabel_recall,
        )

        if self.count == 0:
            return {"loss": float("nan")}
        probs, targets = torch.cat(self.probs), torch.cat(self.targets)
        k = len(self.classes)
        if self.tune:
            self.thresholds = tune_thresholds(probs, targets)
        pred = (probs >= torch.tensor(self.thresholds)).float()  # 0/1: torchmetrics keeps them
        y = (targets > 0.5).long()
        with warnings.catch_warnings():  # classes without positives: reported as None below
            warnings.filterwarnings("ignore", message=".*[Nn]o positive samples.*")
            ap = multilabel_average_precision(probs, y, k, average=None)
        support = y.sum(0)
        has_pos = support > 0
        prec = multilabel_precision(pred, y, k, average=None, zero_division=0)
        rec = multilabel_recall(pred, y, k, average=None, zero_division=0)
        f1 = multilabel_f1_score(pred, y, k, average=None, zero_division=0)
        per_class = {
            name: {"ap": float(ap[i]) if has_pos[i] else None, "precision": float(prec[i]),
                   "recall": float(rec[i]), "f1": float(f1[i]), "support": int(support[i]),
                   "threshold": float(self.thresholds[i])}
            for i, name in enumerate(self.classes)
        }
        return {
            "loss": self.loss_sum / self.count,
            "map": float(ap[has_pos].mean()) if has_pos.any() else float("nan"),
            "micro_f1": float(multilabel_f1_score(pred, y, k, average="micro", zero_division=0)),
            "macro_f1": float(f1.mean()),
            "per_class": per_class, "thresholds": [float(t) for t in self.thresholds],
            "num_images": self.count,
        }


class MultiLabelTask(Task):
    """Multi-label classification over ``classes``: one independent sigmoid per class.

    Args:
        classes: the label vocabulary, in output order.
        loss: ``"bce"`` (binary cross-entropy) or ``"asl"`` (:func:`asymmetric_loss`).
        thresholds: per-class decision thresholds (default 0.5 each).
        gamma_neg: ASL focusing power on negatives.
        gamma_pos: ASL focusing power on positives.
        clip: ASL probability margin on negatives.
        tune: when True, :meth:`metrics` tunes the thresholds on the data it sees.
    """

    name = "multilabel"
    monitor = "map"
    monitor_mode = "max"

    def __init__(self, classes: list[str], loss: str = "bce", thresholds: list[float] | None = None,
                 gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05,
                 tune: bool = False):
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.classes = list(classes)
        self.loss_name = loss
        self.thresholds = list(thresholds) if thresholds is not None else [0.5] * len(self.classes)
        if len(self.thresholds) != len(self.classes):
            raise ValueError(f"{len(self.thresholds)} thresholds for {len(self.classes)} classes")
        self.gamma_neg, self.gamma_pos, self.clip = gamma_neg, gamma_pos, clip
        self.tune = tune

    def collate(self, items: list) -> dict:
        return collate_multilabel(items)

    def loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The training loss of ``(B, K)`` logits against multi-hot targets (a scalar)."""
        if self.loss_name == "asl":
            return asymmetric_loss(logits, targets, self.gamma_neg, self.gamma_pos, self.clip)
        return F.binary_cross_entropy_with_logits(logits.float(), targets.float())

    def loss(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self.loss_fn(output.float(), batch["targets"])}

    def step_metric(self, output: torch.Tensor, batch: dict) -> tuple[str, float, int]:
        """Share of (image, class) decisions that are right at the current thresholds."""
        targets = batch["targets"] > 0.5
        pred = output.detach().float().sigmoid() >= torch.tensor(self.thresholds, device=output.device)
        return "label_acc", float((pred == targets).float().mean()), int(targets.shape[0])

    def metrics(self, device: torch.device | str = "cpu") -> MultiLabelMetrics:
        return MultiLabelMetrics(self.classes, self.thresholds, self.loss_fn, self.tune)

    def decode(self, output: torch.Tensor, paths: list[str | None] | None = None) -> list:
        """Logits ``(B, K)`` into :class:`~cnnkit.core.results.MultiLabel` results at this
        task's thresholds (the pipeline's decoding)."""
        from cnnkit.tasks.multilabel.pipeline import decode_multilabel

        return decode_multilabel(output, self.classes, self.thresholds, paths or [None] * len(output))

    def summary(self, metrics: dict[str, Any]) -> str:
        return (f"map {metrics.get('map', float('nan')):.4f}  "
                f"micro_f1 {metrics.get('micro_f1', float('nan')):.4f}")

    @staticmethod
    def build_model(arch: str, num_classes: int, in_chans: int, pretrained: bool = False,
                    **kwargs) -> nn.Module:
        """The same backbones and heads as single-label classification: K logits."""
        from cnnkit.models import create_model

        return create_model(arch, num_classes=num_classes, in_chans=in_chans, task="classify",
                            pretrained=pretrained, **kwargs)
