"""``cnnkit medical train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.core.options import explain_options, shared
from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError


@dataclass
class MedicalConfig(TrainConfig):
    """``cnnkit medical train`` options."""

    TASK = "medical"  # class attributes, not options: the task name, its val/predict options, unused options
    VAL = (shared("weights"), shared("data", help="phantoms or a NIfTI YAML"), shared("split"),
                            shared("device"), shared("json_path"))
    PREDICT = (
        shared("weights"), shared("source", help="a .nii/.nii.gz file or a folder of them"), shared("device"),
        shared("save_dir", help="write each label volume here as NIfTI (the input's name, subfolder and affine)"),
        shared("json_path", help='write [{"path", "shape", "voxels": {class: count}, "labels"}] (classifiers: '
                                 '[{"path", "shape", "label", "score", "probs"}])'))

    UNUSED = ("imgsz", "pretrained", "init", "freeze", "unfreeze_at", "layer_decay", "linear_probe", "channels_last",
              "qat", "qat_weights")

    DEFAULT_BATCH, DEFAULT_LR = 4, 1e-3

    data: str = "phantoms"
    model: str = "unet3d"  # segmenters unet3d (default), vnet, unet2d; classifiers densenet3d, densenet2d
    loss: str = "dice+ce"  # dice or dice+ce
    patch: int | None = None  # train on random cubes of this side (a multiple of 16); None: whole volumes
    epochs: int = 30
    weight_decay: float = 1e-4
    warmup_epochs: float = 1.0

    def validate(self) -> None:
        super().validate()
        from cnnkit.models.volumetric import VOLUME_MODELS
        from cnnkit.tasks.medical.task import MEDICAL_LOSSES

        if self.model not in VOLUME_MODELS:
            raise CnnkitError(f"--model must be one of {', '.join(VOLUME_MODELS)}, got '{self.model}'")
        if self.loss not in MEDICAL_LOSSES:
            raise CnnkitError(f"--loss must be one of {', '.join(MEDICAL_LOSSES)}, got '{self.loss}'")
        defaults = type(self)()
        for name in self.UNUSED:
            if getattr(self, name) != getattr(defaults, name):
                hint = " (see --patch)" if name == "imgsz" else ""
                raise CnnkitError(f"--{name.replace('_', '-')} does not apply to 3-D volumes{hint}")
        if self.patch is not None and (self.patch < 16 or self.patch % 16):
            raise CnnkitError(f"--patch must be a multiple of 16, got {self.patch}")
        if self.classify and self.patch is not None and self.patch < 32:
            raise CnnkitError(f"--patch must be at least 32 for {self.model} (DenseNet-121 halves the size 5 "
                              f"times), got {self.patch}")
        if self.classify and self.loss != defaults.loss:
            raise CnnkitError(f"--loss applies to segmenters; {self.model} is a classifier (cross-entropy)")

    @property
    def classify(self) -> bool:
        from cnnkit.models.volumetric import CLASSIFIERS_3D

        return self.model in CLASSIFIERS_3D


MedicalConfig.EXPLAIN = explain_options(
    "the class to explain (a name or an index); classifiers: default the top class; segmenters: default the "
    "foreground class with the most predicted voxels, explained over those voxels",
    "phantoms or a NIfTI YAML")
