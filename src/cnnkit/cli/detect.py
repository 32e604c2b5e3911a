"""``cnnkit detect train|val|predict|anchors`` and ``cnnkit instance train|val|predict``
(detection with a mask per object: the same commands on Mask R-CNN): argument parsing only."""

from __future__ import annotations

import click

TRAIN_HELP = {
    "data": "dataset: shapes (generated scenes), an Ultralytics data.yaml, a COCO YAML "
            "({train: {images, annotations}, val: ...}) or a Pascal VOC folder",
    "model": "detector: fastdet (anchor-free, fast on CPU), fasterrcnn (two-stage, RPN + RoIAlign), "
             "retinanet (anchors, focal loss), ssd, ssdlite",
    "backbone": "registry model under fasterrcnn/retinanet/ssd/ssdlite (resnet18, mobilenet_v3_large, ...); "
                "default resnet18 (ssdlite: mobilenet_v3_large)",
    "imgsz": "images are letterboxed to this square size (a multiple of 32); default 320 (your images: their median "
             "longer side, rounded to 32, at most 320)",
    "width": "fastdet: channels of the stem (stages use 2x to 16x); 16 is about 3 M parameters",
    "anchors": "anchors file written by `cnnkit detect anchors` (fasterrcnn, retinanet)",
    "aug": "box-aware augmentation: flip, vflip, rotate=DEG, scale=LO:HI, translate=F, crop=LO, jitter=S, "
           "color=S (no hue, 3x cheaper than jitter), blur, noise, gamma, shadow, cutout=P, occlude=P (patches "
           "over objects), ... or none; default: flip,scale=0.7:1.3,translate=0.1,color=0.3",
    "mosaic": "share of training images made of four images in a 2x2 mosaic, cropped around a random centre",
    "time": "training time budget in minutes (validation included); sets the number of epochs after each "
            "epoch and stretches the LR schedule to it, the last epoch shorter where a whole one would overrun; "
            "0 is off",
    "iou": "NMS IoU threshold during validation",
    "nms": "NMS during validation: hard, or soft (Gaussian soft-NMS: overlapping boxes keep a lowered score)",
    "max_det": "detections kept per image",
    "classes": "shapes: how many of the 8 shape classes to use",
    "max_objects": "shapes: at most this many objects per image",
    "scenes": "shapes: how many training scenes to generate (default 400; val and test keep 100 each)",
    "pretrained": "ImageNet weights for the backbone (registry loader; needs network once)",
    "init": "start from a detector's or a classifier's weights (matching layers are copied; a classifier "
            "fills the backbone)",
}


INSTANCE_HELP = {
    "model": "maskrcnn: Faster R-CNN plus a mask branch (RoIAlign, 4 convs, deconvolution, 28x28 masks per class)",
    "backbone": "registry model under the FPN (resnet18, resnet50, mobilenet_v3_large, ...); default resnet18",
    "mosaic": "share of mosaic images; must stay 0 with masks",
    "aug": "augmentation; masks move with the geometric transforms (occlude is not available); "
           "default: flip,scale=0.7:1.3,translate=0.1,color=0.3",
    "data": "dataset: shapes (scenes with a mask per object), an Ultralytics segment data.yaml (polygon "
            "labels) or a COCO YAML/JSON with polygon segmentations",
}


def register(parent: click.Group) -> click.Group:
    """Add the ``detect`` and ``instance`` groups to ``parent``; return ``detect``."""
    from cnnkit.cli.main import CONTEXT, SuggestingGroup
    from cnnkit.tasks.detect.config import DetectConfig, InstanceConfig

    @parent.group("detect", cls=SuggestingGroup, context_settings=CONTEXT)
    def detect() -> None:
        """Object detection (boxes): train, val, predict, anchors."""

    @parent.group("instance", cls=SuggestingGroup, context_settings=CONTEXT)
    def instance() -> None:
        """Instance segmentation (a box and a mask per object, Mask R-CNN): train, val, predict."""

    _commands(detect, DetectConfig, "Train a detector (fastdet, Faster R-CNN, RetinaNet, SSD) and write a run "
              "folder (weights, metrics, plots).", TRAIN_HELP)
    _commands(instance, InstanceConfig, "Train Mask R-CNN and write a run folder (weights, metrics, plots).",
              {**TRAIN_HELP, **INSTANCE_HELP})
    return detect


def _commands(group: click.Group, cfg_cls: type, train_help: str, helps: dict[str, str]) -> None:
    """train, val and predict (and for detect, anchors) under ``group``."""
    from cnnkit.cli.main import CONTEXT, add_mode_commands, add_train_command
    from cnnkit.core.choices import NMS_METHODS

    task = cfg_cls.TASK
    masks = task == "instance"
    add_train_command(group, cfg_cls, help=train_help, option_help=helps,
                      choices={"model": cfg_cls.MODELS, "nms": NMS_METHODS})

    add_mode_commands(group, cfg_cls,
                      "COCO mAP@[.5:.95], mAP50, mAP75, per-class AP, AR, and AP by object size and by occlusion"
                      + (" (for boxes and masks)." if masks else "."),
                      "Detect objects in images; print one line per image and the time per stage.")

    if masks:
        return

    @group.command("anchors", context_settings=CONTEXT)
    @click.option("--data", required=True, help="shapes, a YOLO data.yaml, a COCO YAML/JSON or a VOC folder")
    @click.option("--model", type=click.Choice(["fasterrcnn", "retinanet"]), default="fasterrcnn",
                  help="whose default anchors to compare with (and how many levels to fill)")
    @click.option("--k", type=int, default=None, help="number of anchors to fit (default 15: 3 per level)")
    @click.option("--imgsz", type=int, default=None, help="letterbox size the anchors are for (default 320)")
    @click.option("--thr", type=float, default=0.5, help="shape-IoU a box needs with an anchor to count as recalled")
    @click.option("--out", type=click.Path(dir_okay=False), default="anchors.yaml", help="where to write them")
    @click.option("--seed", type=int, default=0, help="k-means seed")
    def anchors_cmd(data, model, k, imgsz, thr, out, seed) -> None:
        """Fit anchors to a dataset's boxes (k-means, 1 - IoU distance); print best-possible recall of
        the current and the fitted anchors; write them for `detect train --anchors FILE`."""
        from cnnkit.tasks.detect.anchors import anchors

        anchors(data, k=k, model=model, imgsz=imgsz, out=out, thr=thr, seed=seed)
