"""Multi-label classification's inference pipeline: a sigmoid per class and the card's
per-class thresholds (0.5 where the card has none)."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cnnkit.core.card import ModelCard
from cnnkit.core.results import MultiLabel
from cnnkit.runtime.pipeline import ImageClassifierPipeline


class MultiLabelPipeline(ImageClassifierPipeline):
    task = "multilabel"

    @property
    def thresholds(self) -> list[float]:
        given = self.card.thresholds.get("per_class") or {}
        return [float(given.get(c, 0.5)) for c in self.classes]

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], **_) -> list[MultiLabel]:
        probs = raw[0].float().sigmoid().cpu().numpy()
        thr = np.asarray(self.thresholds)
        out = []
        for meta, p in zip(metas, probs):
            on = [int(i) for i in np.argsort(-p, kind="stable") if p[i] >= thr[i]]
            out.append(MultiLabel(meta.get("path"), [self.classes[i] for i in on],
                                  {c: float(s) for c, s in zip(self.classes, p)}))
        return out


def pipeline(card: ModelCard) -> MultiLabelPipeline:
    return MultiLabelPipeline(card)
