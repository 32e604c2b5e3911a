"""``cnnkit segment train`` options: a torch-free dataclass, so ``cnnkit --help`` and
``config.yaml`` handling import no torch (validation imports what it checks against)."""

from __future__ import annotations

from dataclasses import dataclass

from cnnkit.core.options import Opt, attack_options, explain_options, robustness_options, shared
from cnnkit.engine.config import TrainConfig, check_illumination
from cnnkit.errors import CnnkitError


@dataclass
class SegmentConfig(TrainConfig):
    """``cnnkit segment train`` options (the shared ones plus segmentation's own)."""

    TASK = "segment"  # a class attribute, not an option (VAL and PREDICT are set below the class)
    # found by experiment on two datasets (BENCHMARKS.md, "A second dataset: the shapes on
    # photographs, and the recipe it changed"): 3e-3 and
    # flip,affine,color=0.2 held the U-Net at background on photographs; 1e-3 with flips did not
    DEFAULT_BATCH, DEFAULT_LR = 16, 1e-3

    data: str = "shapes"
    model: str = "unet"  # unet, fcn or deeplabv3
    encoder: str | None = None  # registry model (default resnet18; smallcnn is the built-in small one)
    loss: str = "ce+dice"  # ce, dice, focal or ce+dice
    class_weights: str | None = None  # "auto" (inverse square root of pixel frequency) or "w0,w1,..."
    aug: str | None = None  # None: flip,vflip
    crop: bool = False  # train on random imgsz crops at full resolution; val/predict slide a window
    epochs: int = 30
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    ema: float = 0.0
    channels_last: bool = True
    illumination: str = "none"  # standardize, grayworld or equalize: inside the model, recorded in the card
    # built-in shapes data
    classes: int = 4  # shapes: how many of the 8 shape classes (background comes on top)
    max_objects: int = 4  # shapes: at most this many objects per image
    scenes: int = 600  # data.segmentation.SHAPES_SEG_SIZES["train"] (a test keeps them equal); shapes: training scenes (val and test keep theirs)

    def validate(self) -> None:
        super().validate()
        check_illumination(self.illumination)
        from cnnkit.models.segmentation import SEGMENTERS
        from cnnkit.tasks.segment.task import SEG_LOSSES

        if self.model not in SEGMENTERS:
            import difflib

            close = difflib.get_close_matches(self.model, SEGMENTERS, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise CnnkitError(f"unknown segmentation model '{self.model}'{hint}; choose from {', '.join(SEGMENTERS)}")
        if self.loss not in SEG_LOSSES:
            raise CnnkitError(f"--loss must be one of {', '.join(SEG_LOSSES)}, got '{self.loss}'")
        if self.imgsz is not None and self.imgsz % 32:
            raise CnnkitError(f"--imgsz must be a multiple of 32 for segmentation, got {self.imgsz}")
        if self.scenes < 1:
            raise CnnkitError(f"--scenes must be at least 1, got {self.scenes}")


_TILE = Opt("tile", bool, None, "slide a training-size window over the full-resolution image (overlap 25%, Gaussian "
                                "blending) instead of resizing it; default: as trained (--crop models tile)")
SegmentConfig.VAL = (shared("weights"), shared("data", help="shapes or a segmentation YAML"), shared("split"),
                     shared("device"), _TILE, shared("json_path"))
SegmentConfig.PREDICT = (
    shared("weights"), shared("source"), shared("device"), _TILE,
    shared("save_dir", help="write NAME_mask.png (class ids; a palette PNG, so it also shows colours) and "
                            "NAME_overlay.png per image here"),
    shared("json_path", help='write [{"path", "width", "height", "classes": {name: share of pixels}, "mask"}]'))
SegmentConfig.EXPLAIN = explain_options(
    "the class whose predicted pixels to explain (a name or an index; default: the foreground class with the "
    "most predicted pixels)",
    "shapes or a segmentation YAML")
SegmentConfig.ATTACK = attack_options(SegmentConfig.VAL)
SegmentConfig.ROBUSTNESS = robustness_options(SegmentConfig.VAL)
