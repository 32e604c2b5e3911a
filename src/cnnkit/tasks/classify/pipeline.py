"""Single-label classification's inference pipeline: softmax and the top-k classes."""

from __future__ import annotations

from typing import Any

import torch

from cnnkit.core.card import ModelCard
from cnnkit.core.results import Classification
from cnnkit.runtime.classifier import ImageClassifierPipeline
from cnnkit.tasks.softmax import decode_topk


class ClassifyPipeline(ImageClassifierPipeline):
    task = "classify"

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], topk: int = 5,
                    **_) -> list[Classification]:
        return decode_topk(raw[0], self.classes, [m.get("path") for m in metas], topk)


def legacy_preprocess(card: ModelCard):
    """The normalizing :class:`~cnnkit.data.transforms.Preprocess` a card's model was trained
    with (the raw model, not the core, takes its output)."""
    from cnnkit.data.transforms import Preprocess

    i = card.input
    return Preprocess(i.height, tuple(i.mean), tuple(i.std), i.channels, mask_channel=i.mask_channel,
                      illumination=i.illumination)


def pipeline(card: ModelCard) -> ClassifyPipeline:
    return ClassifyPipeline(card)
