"""``cnnkit detect train`` and ``cnnkit instance train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.engine.config import TrainConfig
from cnnkit.errors import CnnkitError


@dataclass
class DetectConfig(TrainConfig):
    """``cnnkit detect train`` options (the shared ones plus detection's own)."""

    TASK = "detect"  # class attributes, not options: the task name and its models
    MODELS = ("fastdet", "fasterrcnn", "retinanet", "ssd", "ssdlite")

    data: str = "shapes"
    model: str = "fastdet"  # fastdet, fasterrcnn, retinanet, ssd or ssdlite
    backbone: str | None = None  # registry model for fasterrcnn/retinanet/ssd/ssdlite (default per model)
    width: int = 16  # fastdet: stem channels (stages use 2x .. 16x)
    anchors: str | None = None  # anchors file from `cnnkit detect anchors` (fasterrcnn, retinanet)
    aug: str | None = None  # box-aware augmentation; None: flip,scale=0.7:1.3,translate=0.1,color=0.3
    mosaic: float = 0.5  # share of training images that are 2x2 mosaics of four
    epochs: int = 30
    batch: int = 16
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    grad_clip: float = 10.0
    ema: float = 0.99
    channels_last: bool = True  # measured faster for these convolutions on CPU too (oneDNN)
    iou: float = 0.6  # NMS IoU during validation
    nms: str = "hard"  # hard (torchvision batched_nms) or soft (Gaussian soft-NMS) during validation
    max_det: int = 100
    # built-in shapes data
    classes: int = 8  # shapes: how many of the 8 shape classes
    max_objects: int = 6  # shapes: at most this many objects per image

    def validate(self) -> None:
        super().validate()
        if self.model not in self.MODELS:
            import difflib

            close = difflib.get_close_matches(self.model, self.MODELS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CnnkitError(f"unknown {self.TASK} model '{self.model}'{hint}; choose from {', '.join(self.MODELS)}")
        if not 0 <= self.mosaic <= 1:
            raise CnnkitError(f"--mosaic must be in [0, 1], got {self.mosaic}")
        from cnnkit.models.detection.nms import NMS_METHODS

        if self.nms not in NMS_METHODS:
            raise CnnkitError(f"--nms must be one of {', '.join(NMS_METHODS)}, got '{self.nms}'")
        if not 0 < self.iou <= 1:
            raise CnnkitError(f"--iou must be in (0, 1], got {self.iou}")
        if self.imgsz is not None and self.imgsz % 32:
            raise CnnkitError(f"--imgsz must be a multiple of 32 for detection, got {self.imgsz}")
        if self.width < 4:
            raise CnnkitError(f"--width must be at least 4, got {self.width}")


@dataclass
class InstanceConfig(DetectConfig):
    """``cnnkit instance train`` options: detection's, with a mask per object."""

    TASK = "instance"
    MODELS = ("maskrcnn",)

    model: str = "maskrcnn"
    mosaic: float = 0.0  # a mosaic would cut masks; instance training does not use it
    lr: float = 1e-3
    ema: float = 0.0
