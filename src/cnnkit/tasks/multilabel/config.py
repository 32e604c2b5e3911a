"""``cnnkit multilabel train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError


@dataclass
class MultiLabelConfig(TrainConfig):
    """``cnnkit multilabel train`` options (the shared ones plus multi-label's own)."""

    data: str = "shapes"
    schedule: str = "onecycle"
    loss: str = "bce"  # bce or asl (asymmetric loss)
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    aug: str | None = None  # None: affine,flip
    drop_rate: float = 0.2
    val_fraction: float = 0.2  # held out from the CSV when there is no val.csv
    channels: int | None = None  # None: detect (1 for all-grayscale images, else 3)
    attention: str | None = None  # se, cbam or eca blocks in the backbone (smallcnn, resnets)
    pool: str = "avg"  # global pooling: avg, max, avgmax, lp, gem, spp

    def validate(self) -> None:
        super().validate()
        from cnnkit.tasks.multilabel.task import LOSSES

        if self.loss not in LOSSES:
            raise CnnkitError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.asl_gamma_neg < 0 or self.asl_gamma_pos < 0:
            raise CnnkitError("--asl-gamma-neg and --asl-gamma-pos must be 0 or more")
        if not 0 <= self.asl_clip < 1:
            raise CnnkitError(f"--asl-clip must be in [0, 1), got {self.asl_clip}")
        if not 0 < self.val_fraction < 1:
            raise CnnkitError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.channels not in (None, 1, 3):
            raise CnnkitError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.drop_rate < 1:
            raise CnnkitError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")
