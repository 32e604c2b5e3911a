"""``cnnkit detect train`` and ``cnnkit instance train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.core.choices import NMS_METHODS
from cnnkit.core.options import Opt, attack_options, explain_options, robustness_options, shared
from cnnkit.engine.config import TrainConfig, check_illumination
from cnnkit.errors import CnnkitError


@dataclass
class DetectConfig(TrainConfig):
    """``cnnkit detect train`` options (the shared ones plus detection's own)."""

    TASK = "detect"  # class attributes, not options: the task name, its models, its val/predict options
    MODELS = ("fastdet", "fasterrcnn", "retinanet", "ssd", "ssdlite")
    DEFAULT_BATCH, DEFAULT_LR = 16, 2e-3

    data: str = "shapes"
    model: str = "fastdet"  # fastdet, fasterrcnn, retinanet, ssd or ssdlite
    backbone: str | None = None  # registry model for fasterrcnn/retinanet/ssd/ssdlite (default per model)
    width: int = 16  # fastdet: stem channels (stages use 2x .. 16x)
    anchors: str | None = None  # anchors file from `cnnkit detect anchors` (fasterrcnn, retinanet)
    aug: str | None = None  # box-aware augmentation; None: flip,scale=0.7:1.3,translate=0.1,color=0.3
    mosaic: float = 0.5  # share of training images that are 2x2 mosaics of four
    epochs: int = 30
    weight_decay: float = 0.01
    warmup_epochs: float = 2.0
    grad_clip: float = 10.0
    ema: float = 0.99
    channels_last: bool = True  # measured faster for these convolutions on CPU too (oneDNN)
    illumination: str = "none"  # fastdet: standardize, grayworld or equalize inside the model, recorded in the card
    iou: float = 0.6  # NMS IoU during validation
    nms: str = "hard"  # hard (torchvision batched_nms) or soft (Gaussian soft-NMS) during validation
    max_det: int = 100
    # built-in shapes data
    classes: int = 8  # shapes: how many of the 8 shape classes
    max_objects: int = 6  # shapes: at most this many objects per image
    scenes: int | None = None  # shapes: training scenes to generate (default 400; val and test keep 100 each)

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
        if self.scenes is not None and self.scenes < 1:
            raise CnnkitError(f"--scenes must be at least 1, got {self.scenes}")
        if self.width < 4:
            raise CnnkitError(f"--width must be at least 4, got {self.width}")
        check_illumination(self.illumination)
        if self.illumination != "none" and self.model != "fastdet":
            raise CnnkitError(f"--illumination applies to fastdet; {self.model} normalizes its images inside "
                              "torchvision's own transform")


@dataclass
class InstanceConfig(DetectConfig):
    """``cnnkit instance train`` options: detection's, with a mask per object."""

    TASK = "instance"
    MODELS = ("maskrcnn",)
    DEFAULT_LR = 1e-3

    model: str = "maskrcnn"
    mosaic: float = 0.0  # a mosaic would cut masks; instance training does not use it
    ema: float = 0.0


_NMS_HELP = "hard NMS, or soft (Gaussian soft-NMS: overlapping boxes keep a lowered score)"


def _val(masks: bool) -> tuple[Opt, ...]:
    return (
        shared("weights"), shared("data", help="shapes, a YOLO data.yaml, a COCO YAML/JSON or a VOC folder"),
        shared("split"), shared("batch", default=32),
        Opt("conf", float, 0.001, "score threshold (low, so AP sees the whole curve)", lo=0, hi=1),
        Opt("iou", float, 0.6, "NMS IoU threshold", lo=0, hi=1, lo_open=True),
        Opt("nms", default=None, choices=NMS_METHODS, help=_NMS_HELP + "; default: as in training"),
        shared("device"), shared("workers"), shared("json_path"),
        Opt("save_json", "file", None, 'write the detections in COCO results format ([{"image_id", "category_id", '
            '"bbox": [x, y, w, h], "score"' + (', "segmentation": RLE' if masks else "") + "}])"))


def _predict(masks: bool) -> tuple[Opt, ...]:
    return (
        shared("weights"), shared("source"),
        Opt("conf", float, 0.25, "score threshold", lo=0, hi=1),
        Opt("iou", float, 0.5, "NMS IoU threshold", lo=0, hi=1, lo_open=True),
        Opt("max_det", int, 100, "detections kept per image", lo=1),
        Opt("nms", default="hard", choices=NMS_METHODS, help=_NMS_HELP),
        shared("device"),
        shared("json_path", help='write [{"path", "width", "height", "detections": [{"box": [x1, y1, x2, y2], '
                                 '"score", "class_id", "class_name"' + (', "mask": COCO RLE' if masks else "") +
                                 "}]}] (original-image pixels)"),
        shared("save_dir", help="write each image with its boxes" + (" and masks" if masks else "") +
                                " drawn as PNG here"))


DetectConfig.VAL, DetectConfig.PREDICT = _val(False), _predict(False)
InstanceConfig.VAL, InstanceConfig.PREDICT = _val(True), _predict(True)
_EXPLAIN_TARGET = "the detection to explain, by its index in predict's order (default 0: the top one)"
_EXPLAIN_DATA = "shapes or a detection dataset (YAML, COCO, VOC); each ground-truth object's matching detection"
DetectConfig.EXPLAIN = explain_options(_EXPLAIN_TARGET, _EXPLAIN_DATA)
InstanceConfig.EXPLAIN = explain_options(_EXPLAIN_TARGET, _EXPLAIN_DATA)
DetectConfig.ATTACK, InstanceConfig.ATTACK = attack_options(DetectConfig.VAL), attack_options(InstanceConfig.VAL)
DetectConfig.ROBUSTNESS = robustness_options(DetectConfig.VAL)
InstanceConfig.ROBUSTNESS = robustness_options(InstanceConfig.VAL)
