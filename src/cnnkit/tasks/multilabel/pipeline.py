"""Multi-label classification's inference pipeline: a sigmoid per class and the card's
per-class thresholds (0.5 where the card has none)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cnnkit.core.card import ModelCard
from cnnkit.core.results import MultiLabel
from cnnkit.runtime.classifier import ImageClassifierPipeline


class MultiLabelPipeline(ImageClassifierPipeline):
    task = "multilabel"

    @property
    def thresholds(self) -> list[float]:
        given = self.card.thresholds.get("per_class") or {}
        return [float(given.get(c, 0.5)) for c in self.classes]

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], **_) -> list[MultiLabel]:
        return decode_multilabel(raw[0], self.classes, self.thresholds, [m.get("path") for m in metas])


def decode_multilabel(logits: torch.Tensor, classes: list[str], thresholds: list[float],
                      paths: list[str | None]) -> list[MultiLabel]:
    """Logits ``(B, K)`` -> :class:`~cnnkit.core.results.MultiLabel`: the classes at or above
    their threshold, highest score first, and every class's probability."""
    probs = logits.float().sigmoid().cpu().numpy()
    thr = np.asarray(thresholds)
    out = []
    for path, p in zip(paths, probs):
        on = [int(i) for i in np.argsort(-p, kind="stable") if p[i] >= thr[i]]
        out.append(MultiLabel(path, [classes[i] for i in on], {c: float(s) for c, s in zip(classes, p)}))
    return out


def pipeline(card: ModelCard) -> MultiLabelPipeline:
    return MultiLabelPipeline(card)
