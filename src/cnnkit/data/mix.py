"""Mixup and CutMix for whole training batches, on whatever device the batch is on.

A thin wrapper over torchvision's ``v2.MixUp`` / ``v2.CutMix`` (one mixing coefficient per
batch, drawn from torch's global RNG, which the Trainer seeds every epoch) with the batch-dict
interface the Trainer's ``batch_transforms`` use. Targets become ``(B, K)`` distributions;
the classification losses take them as they are.
"""

from __future__ import annotations

from torchvision.transforms import v2


class BatchMix:
    """``--mixup ALPHA`` and/or ``--cutmix ALPHA``; with both, each batch uses one of them at random.

    Args:
        num_classes: K, the width of the soft targets.
        mixup: Beta(alpha, alpha) parameter of mixup; 0 turns it off.
        cutmix: Beta(alpha, alpha) parameter of CutMix; 0 turns it off.
    """

    def __init__(self, num_classes: int, mixup: float = 0.0, cutmix: float = 0.0):
        choices = []
        if mixup > 0:
            choices.append(v2.MixUp(alpha=mixup, num_classes=num_classes))
        if cutmix > 0:
            choices.append(v2.CutMix(alpha=cutmix, num_classes=num_classes))
        if not choices:
            raise ValueError("BatchMix needs mixup > 0 or cutmix > 0")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def __call__(self, batch: dict) -> dict:
        images, targets = batch["images"], batch["targets"]
        if images.shape[0] < 2 or targets.ndim != 1:
            return batch
        images, targets = self.transform(images, targets)
        return {**batch, "images": images, "targets": targets}


def make_batch_mix(num_classes: int, mixup: float, cutmix: float) -> BatchMix | None:
    return BatchMix(num_classes, mixup, cutmix) if (mixup > 0 or cutmix > 0) else None

