"""Single-label classification's inference pipeline: softmax and the top-k classes."""

from __future__ import annotations

from typing import Any

import torch

from cnnkit.core.card import ModelCard
from cnnkit.core.results import Classification
from cnnkit.runtime.pipeline import ImageClassifierPipeline


class ClassifyPipeline(ImageClassifierPipeline):
    task = "classify"

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], topk: int = 5,
                    **_) -> list[Classification]:
        return decode_topk(raw[0], self.classes, [m.get("path") for m in metas], topk)


def decode_topk(logits: torch.Tensor, classes: list[str], paths: list[str | None], topk: int = 5) -> list[Classification]:
    """Softmax logits ``(B, K)`` into :class:`~cnnkit.core.results.Classification` results."""
    probs = logits.float().softmax(1).cpu()
    k = min(topk, probs.shape[1])
    scores, idx = probs.topk(k, dim=1)
    return [Classification(p, classes[i[0]], i[0], s[0], [(classes[j], sc) for j, sc in zip(i, s)])
            for p, s, i in zip(paths, scores.tolist(), idx.tolist())]


def pipeline(card: ModelCard) -> ClassifyPipeline:
    return ClassifyPipeline(card)
