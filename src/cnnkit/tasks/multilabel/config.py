"""``cnnkit multilabel train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.core.options import attack_options, explain_options, robustness_options, shared
from cnnkit.engine.config import ImageClassifierConfig
from cnnkit.errors import CnnkitError


@dataclass
class MultiLabelConfig(ImageClassifierConfig):
    """``cnnkit multilabel train`` options (the shared ones plus multi-label's own)."""

    TASK = "multilabel"  # class attributes, not options: the task name and its val/predict options
    VAL = (
        shared("weights"), shared("data", help="dataset: shapes, a CSV file or a folder with train.csv"),
        shared("split"), shared("batch"), shared("device"), shared("workers"), shared("json_path"))
    PREDICT = (
        shared("weights"), shared("source"), shared("batch"), shared("device"),
        shared("json_path", help='write [{"path", "labels", "scores": {class: probability}}] to this file'))
    ATTACK = attack_options(VAL)
    ROBUSTNESS = robustness_options(VAL)
    EXPLAIN = explain_options("the label to explain (a name or an index; default: the most probable one)",
                              "shapes, a CSV file or a folder with train.csv")

    data: str = "shapes"
    schedule: str = "onecycle"
    loss: str = "bce"  # bce or asl (asymmetric loss)
    asl_gamma_neg: float = 4.0
    asl_gamma_pos: float = 0.0
    asl_clip: float = 0.05
    aug: str | None = None  # None: affine,flip

    def validate(self) -> None:
        super().validate()
        from cnnkit.tasks.multilabel.task import LOSSES

        if self.loss not in LOSSES:
            raise CnnkitError(f"--loss must be one of {', '.join(LOSSES)}, got '{self.loss}'")
        if self.asl_gamma_neg < 0 or self.asl_gamma_pos < 0:
            raise CnnkitError("--asl-gamma-neg and --asl-gamma-pos must be 0 or more")
        if not 0 <= self.asl_clip < 1:
            raise CnnkitError(f"--asl-clip must be in [0, 1), got {self.asl_clip}")
