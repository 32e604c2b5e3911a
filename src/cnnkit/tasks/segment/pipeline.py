"""Semantic segmentation's inference pipeline.

Models trained on whole images (``resize``) see the image resized (bilinear, antialiased) to
the card's size, and their class scores are resized back to the image's size. Models trained
on crops (``tile``) slide a window of the card's size over the full-resolution image with a
quarter overlap and Gaussian blending (MONAI's ``sliding_window_inference``), on either
backend. The core is the segmenter itself: [0, 1] images in (it normalizes inside), class
logits ``(B, K, H, W)`` out. Post-processing takes the arg-max at the original size.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.core.card import ModelCard
from cnnkit.core.results import SegMask
from cnnkit.runtime.pipeline import Pipeline, interpolate_scores

TILE_BATCH = 4  # windows per core call when tiling


class SegmentPipeline(Pipeline):
    task = "segment"
    channels_last = True

    def __init__(self, card: ModelCard):
        super().__init__(card)
        self.tile = card.input.resize == "tile"
        self.batchable = not self.tile
        self.size = (int(card.input.height), int(card.input.width))

    def configure(self, tile: bool | None = None) -> None:
        """``tile``: slide a window over full-resolution images (default: as trained)."""
        if tile is not None:
            self.tile, self.batchable = bool(tile), not tile

    def build(self) -> nn.Module:
        from cnnkit.models.segmentation import build_segmenter

        kw = self.card.model_kwargs
        return build_segmenter(self.card.arch, self.card.num_classes, self.card.input.channels, kw.get("encoder"),
                               illumination=self.card.input.illumination)

    def feature_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        from cnnkit.models.finetune import feature_stages

        return feature_stages(model)

    def prepare(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        h, w = image.shape[-2:]
        x = image.float().div_(255)
        if not self.tile and (h, w) != self.size:
            x = F.interpolate(x[None], size=self.size, mode="bilinear", antialias=True, align_corners=False)[0]
        return x, {"height": int(h), "width": int(w)}

    def run(self, backend, x: torch.Tensor, metas: list[dict[str, Any]]) -> tuple[torch.Tensor, ...]:
        if not self.tile:
            return backend(x)
        from monai.inferers import sliding_window_inference

        return (sliding_window_inference(x, self.size, TILE_BATCH, lambda t: backend(t)[0], overlap=0.25,
                                         mode="gaussian"),)

    def scores(self, raw: tuple[torch.Tensor, ...], meta: dict[str, Any], i: int = 0) -> torch.Tensor:
        """Class scores ``(K, H, W)`` (float32) of sample ``i`` at its original size."""
        return interpolate_scores(raw[0][i:i + 1].float(), (meta["height"], meta["width"]))[0]

    def postprocess(self, raw: tuple[torch.Tensor, ...], metas: list[dict[str, Any]], **_) -> list[SegMask]:
        return [SegMask(m.get("path"), m["width"], m["height"], self.scores(raw, m, i).argmax(0).to(torch.uint8).cpu(),
                        self.classes) for i, m in enumerate(metas)]

    def target(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """The mean logit of class ``selector`` (an index, or ``(index, region)`` with a bool
        ``(H, W)`` region) over its region (default: the whole image)."""
        cls, region = selector if isinstance(selector, tuple) else (selector, None)
        logits = raw[0][:, int(cls)]
        if region is None:
            return logits.flatten(1).mean(1)
        r = torch.as_tensor(region, device=logits.device, dtype=logits.dtype)
        return (logits * r).flatten(1).sum(1) / r.sum().clamp(min=1)

    def target_prob(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """The class's mean softmax probability over the region."""
        cls, region = selector if isinstance(selector, tuple) else (selector, None)
        prob = raw[0].float().softmax(1)[:, int(cls)]
        if region is None:
            return prob.flatten(1).mean(1)
        r = torch.as_tensor(region, device=prob.device, dtype=prob.dtype)
        return (prob * r).flatten(1).sum(1) / r.sum().clamp(min=1)

    def attack_loss(self, raw, ref, targeted: int | None = None, labels=None) -> torch.Tensor:
        """Mean per-pixel cross-entropy against the clean prediction (minus the cross-entropy
        toward ``targeted`` at every pixel)."""
        logits = raw[0].float()
        want = ref[0].argmax(1) if targeted is None else torch.full_like(ref[0][:, 0], int(targeted), dtype=torch.long)
        ce = F.cross_entropy(logits, want, reduction="none").flatten(1).mean(1)
        return ce if targeted is None else -ce

    def attack_success(self, raw, ref, targeted: int | None = None) -> torch.Tensor:
        """Share of pixels whose class changed (or became ``targeted``)."""
        pred = raw[0].argmax(1)
        hit = pred == int(targeted) if targeted is not None else pred != ref[0].argmax(1)
        return hit.flatten(1).float().mean(1)

    def select(self, raw: tuple[torch.Tensor, ...], target: Any, meta: dict[str, Any] | None = None) -> tuple[Any, str]:
        """``target``: a class name or index (None: the foreground class with the most
        predicted pixels); the region is that class's predicted pixels (the whole image when
        the model predicts none)."""
        from cnnkit.runtime.pipeline import predicted_region

        return predicted_region(raw[0][0].argmax(0), self.classes, target)


def pipeline(card: ModelCard) -> SegmentPipeline:
    return SegmentPipeline(card)
