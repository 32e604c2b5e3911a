"""Volumetric (3-D) segmentation as a task: batches of volumes and label volumes, Dice(+CE)
loss and Dice / 95th-percentile Hausdorff distance per class, all from MONAI (the field's
standard implementations)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from cnnkit.core.choices import MEDICAL_LOSSES
from cnnkit.data.volumes import collate_volumes
from cnnkit.tasks.base import Task


class VolumeMetrics:
    """Per volume and class: Dice (MONAI ``DiceMetric``) and the 95th-percentile symmetric
    Hausdorff distance in voxels (MONAI ``HausdorffDistanceMetric(percentile=95)``); then
    means over volumes. Background is left out of both (it would flatter Dice).

    ``compute`` gives ``dice`` (mean over foreground classes), ``per_class_dice``, ``hd95``
    and ``per_class_hd95`` (a class's mean over the volumes where it is scored; None if none).
    A class absent from a volume's truth scores Dice 1 when the prediction has none of it too
    and 0 for any false positive (MONAI's ``ignore_empty=False``: false positives on empty
    volumes count). HD95 is undefined when exactly one of truth and prediction is empty (a
    missed object or a false positive); those cases are left out of the HD95 means and
    counted in ``hd95_undefined`` (per class), so a missed object cannot vanish silently.
    """

    def __init__(self, names: list[str]):
        from monai.metrics import DiceMetric, HausdorffDistanceMetric

        self.names = list(names)
        self.dice = DiceMetric(include_background=False, reduction="none", ignore_empty=False)
        self.undefined = torch.zeros(max(len(self.names) - 1, 0), dtype=torch.long)
        self.hd = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")

    def update(self, output: torch.Tensor, batch: dict) -> None:
        self.add_predictions(output.argmax(1), batch["masks"])

    def add_predictions(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Class-id volumes (B, D, H, W)."""
        k = len(self.names)
        p = F.one_hot(pred.long().cpu(), k).permute(0, 4, 1, 2, 3).float()
        t = F.one_hot(target.long().cpu(), k).permute(0, 4, 1, 2, 3).float()
        self.dice(p, t)
        has_p, has_t = p[:, 1:].flatten(2).any(2), t[:, 1:].flatten(2).any(2)  # (B, K-1)
        self.undefined += (has_p != has_t).sum(0)
        import warnings

        with warnings.catch_warnings():  # MONAI warns for a class missing in a volume (-> NaN, skipped)
            warnings.simplefilter("ignore")
            self.hd(p, t)

    def compute(self) -> dict[str, Any]:
        d = self.dice.aggregate()  # (N volumes, K-1)
        h = self.hd.aggregate()

        def per(x):
            out = {}
            for j, n in enumerate(self.names[1:]):
                col = x[:, j]
                col = col[torch.isfinite(col)]
                out[n] = round(float(col.mean()), 6) if col.numel() else None
            return out

        pd, ph = per(d), per(h)
        dv = [v for v in pd.values() if v is not None]
        hv = [v for v in ph.values() if v is not None]
        return {"dice": sum(dv) / len(dv) if dv else 0.0, "per_class_dice": pd,
                "hd95": sum(hv) / len(hv) if hv else None, "per_class_hd95": ph,
                "hd95_undefined": {n: int(c) for n, c in zip(self.names[1:], self.undefined)},
                "num_volumes": int(d.shape[0])}


class MedicalTask(Task):
    """Volumes: ``batch = {"images": float (B, 1, D, H, W), "masks": int64 (B, D, H, W)}``."""

    name = "medical"
    monitor = "dice"
    monitor_mode = "max"

    def __init__(self, names: list[str], loss: str = "dice+ce"):
        from monai.losses import DiceCELoss, DiceLoss

        if loss not in MEDICAL_LOSSES:
            raise ValueError(f"unknown loss '{loss}'; choose from {', '.join(MEDICAL_LOSSES)}")
        self.names = list(names)
        self.loss_kind = loss
        self._loss = DiceCELoss(to_onehot_y=True, softmax=True) if loss == "dice+ce" else \
            DiceLoss(to_onehot_y=True, softmax=True)

    def collate(self, items: list) -> dict:
        return collate_volumes(items)

    def loss(self, output: torch.Tensor, batch: dict) -> dict[str, torch.Tensor]:
        return {"loss": self._loss(output.float(), batch["masks"][:, None])}

    def metrics(self, device: torch.device | None = None) -> VolumeMetrics:
        return VolumeMetrics(self.names)

    def step_metric(self, output: torch.Tensor, batch: dict) -> tuple[str, float, int] | None:
        n = batch["masks"].numel()
        return "vox_acc", float((output.argmax(1) == batch["masks"]).sum()) / n, n

    def summary(self, metrics: dict[str, Any]) -> str:
        hd = metrics.get("hd95")
        return f"dice {metrics['dice']:.4f}" + (f", hd95 {hd:.2f}" if isinstance(hd, float) else "")
