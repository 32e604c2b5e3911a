"""The single- and multi-label classifiers' pipeline (shared by ``classify`` and
``multilabel``): resize, the card's normalization and illumination inside the core, logits out,
and the class lookup their targets use."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cnnkit.errors import ModelError
from cnnkit.runtime.pipeline import Pipeline, resize_image


class Normalized(nn.Module):
    """``model`` behind a fixed ``(x - mean) / std`` of the first ``len(mean)`` channels (an
    observation-mask channel after them passes unchanged), so the core takes values in [0, 1]
    and the normalization travels inside exported files; with ``illumination`` the lighting is
    normalized first (:mod:`cnnkit.data.illumination`), as in training."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float], illumination: str = "none"):
        super().__init__()
        from cnnkit.data.illumination import Illumination

        self.model = model
        self.light = Illumination(illumination) if illumination != "none" else None
        self.register_buffer("mean", torch.tensor(list(mean), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(list(std), dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.mean.shape[1]
        image = x[:, :c] if self.light is None else self.light(x[:, :c])
        if x.shape[1] == c:
            return self.model((image - self.mean) / self.std)
        return self.model(torch.cat([(image - self.mean) / self.std, x[:, c:]], 1))


class ImageClassifierPipeline(Pipeline):
    """Shared by single- and multi-label classification: squash-resize to the card's size,
    scale to [0, 1] (plus an all-ones observation-mask channel for mask models), normalize
    inside the core, ``(B, K)`` logits out."""

    def build(self) -> nn.Module:
        from cnnkit.models import create_model

        return create_model(self.card.arch, num_classes=self.card.num_classes, task="classify",
                            in_chans=self.card.input.model_channels, **self.card.model_kwargs)

    def core(self, model: nn.Module) -> nn.Module:
        i = self.card.input
        return Normalized(model, i.mean, i.std, i.illumination)

    def feature_layers(self, model: nn.Module) -> dict[str, nn.Module]:
        from cnnkit.models.finetune import feature_stages

        return feature_stages(model.model if isinstance(model, Normalized) else model)

    def prepare(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        i = self.card.input
        h, w = image.shape[-2:]
        x = resize_image(image, (i.height, i.width)).float().div_(255)
        if i.mask_channel:
            x = torch.cat([x, torch.ones_like(x[:1])], 0)
        return x, {"height": int(h), "width": int(w)}

    def target(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """The logit of class ``selector`` (an index, a name, or a tensor of indices per
        sample; None: each sample's top class)."""
        logits = raw[0]
        if selector is None:
            idx = logits.argmax(1)
        elif isinstance(selector, str):
            idx = torch.full((len(logits),), self.classes.index(selector), device=logits.device)
        else:
            idx = torch.as_tensor(selector, device=logits.device).expand(len(logits))
        return logits.gather(1, idx.view(-1, 1).long())[:, 0]

    def target_prob(self, raw: tuple[torch.Tensor, ...], selector: Any) -> torch.Tensor:
        """Softmax probability of the class (sigmoid for multi-label models)."""
        if self.card.task == "multilabel":
            return torch.sigmoid(self.target(raw, selector))
        idx = torch.as_tensor(selector, device=raw[0].device).expand(len(raw[0]))
        return raw[0].float().softmax(1).gather(1, idx.view(-1, 1).long())[:, 0]

    def attack_loss(self, raw, ref, targeted: int | None = None, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Cross-entropy against the true labels, else the clean top class (minus the
        cross-entropy toward ``targeted``); multi-label: binary cross-entropy against the label
        set (or the log-probability of label ``targeted``)."""
        logits = raw[0].float()
        if self.card.task == "multilabel":
            if targeted is not None:
                return F.logsigmoid(logits[:, int(targeted)])
            want = labels.float() if labels is not None else (ref[0] > 0).float()
            return F.binary_cross_entropy_with_logits(logits, want.to(logits.device), reduction="none").mean(1)
        if targeted is None:
            want = labels.long().to(logits.device) if labels is not None else ref[0].argmax(1)
            return F.cross_entropy(logits, want, reduction="none")
        want = torch.full((len(logits),), int(targeted), device=logits.device, dtype=torch.long)
        return -F.cross_entropy(logits, want, reduction="none")

    def attack_margin(self, raw, ref, targeted: int | None = None, labels: torch.Tensor | None = None
                      ) -> torch.Tensor:
        """The true (else the clean top) class's logit minus the best other's; toward
        ``targeted``: the best other's minus the target's. Multi-label models have none."""
        if self.card.task == "multilabel":
            return super().attack_margin(raw, ref, targeted, labels)
        logits = raw[0].float()
        if targeted is None:
            cls = labels.long().to(logits.device) if labels is not None else ref[0].argmax(1)
        else:
            cls = torch.full((len(logits),), int(targeted), device=logits.device, dtype=torch.long)
        own = logits.gather(1, cls.view(-1, 1))[:, 0]
        other = logits.scatter(1, cls.view(-1, 1), float("-inf")).amax(1)
        return own - other if targeted is None else other - own

    def attack_logits(self, raw) -> torch.Tensor:
        """The logits (single-label models; multi-label ones have no single answer to overturn)."""
        if self.card.task == "multilabel":
            return super().attack_logits(raw)
        return raw[0].float()

    def attack_success(self, raw, ref, targeted: int | None = None) -> torch.Tensor:
        """Top class changed (or is ``targeted``); multi-label: any label flipped (or ``targeted`` on)."""
        if self.card.task == "multilabel":
            if targeted is not None:
                return (raw[0][:, int(targeted)] > 0).float()
            return ((raw[0] > 0) != (ref[0] > 0)).any(1).float()
        pred = raw[0].argmax(1)
        return (pred == int(targeted)).float() if targeted is not None else (pred != ref[0].argmax(1)).float()

    def select(self, raw: tuple[torch.Tensor, ...], target: Any, meta: dict[str, Any] | None = None) -> tuple[Any, str]:
        """``target``: a class name or index (None: the top class)."""
        idx = int(raw[0][0].argmax()) if target is None else class_index(self.classes, target)
        return idx, f"class {self.classes[idx]}"


def class_index(classes: Sequence[str], target: Any) -> int:
    """The index of ``target`` (a class name, or an index given as a number or a digit
    string) in ``classes``; a one-sentence error when it is neither."""
    if isinstance(target, str) and target in classes:
        return list(classes).index(target)
    try:
        idx = int(target)
    except (TypeError, ValueError):
        idx = -1
    if not 0 <= idx < len(classes):
        shown = ", ".join(classes[:20]) + (", ..." if len(classes) > 20 else "")
        raise ModelError(f"--target '{target}' is not a class of this model; classes: {shown}")
    return idx
