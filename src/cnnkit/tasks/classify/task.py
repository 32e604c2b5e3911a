"""Image classification (single label): the softmax task shared with medical volume
classifiers (:mod:`cnnkit.tasks.softmax`: cross-entropy and its variants, torchmetrics
metrics, top-k decoding), building its networks from the registry."""

from __future__ import annotations

from cnnkit.tasks.softmax import ClassificationMetrics, SoftmaxTask

__all__ = ["ClassificationMetrics", "ClassifyTask"]


class ClassifyTask(SoftmaxTask):
    """Single-label image classification over ``classes``."""
