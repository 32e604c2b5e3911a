"""``cnnkit segment train|val|predict``: argument parsing only."""

from __future__ import annotations

import click

TRAIN_HELP = {
    "data": "dataset: shapes (generated scenes with per-pixel classes) or a segmentation YAML "
            "(train/val image folders, masks/ beside images/, names with background first)",
    "model": "unet (encoder-decoder with skips), fcn (FCN-8s), deeplabv3 (atrous spatial pyramid pooling)",
    "encoder": "registry model as the encoder (smallcnn, resnet18, mobilenet_v3_large, efficientnet_b0, ...); "
               "default resnet18",
    "imgsz": "training size (a multiple of 32); default: shapes 128; your images: their median side rounded to 32, "
             "at most 256",
    "loss": "ce (cross-entropy), dice (soft Dice), focal, or ce+dice",
    "class_weights": "auto (1/sqrt of each class's pixel share in train) or one weight per class, comma-separated",
    "aug": "augmentation applied to image and mask alike: flip, vflip, rotate=DEG, scale=LO:HI, translate=F, "
           "affine, crop=LO, color=S, jitter=S, blur, noise, gamma, shadow, erase=P, ... or none; "
           "default: flip,vflip (use flip alone for scenes with an up and a down)",
    "crop": "train on random --imgsz crops at full resolution (for large images); val and predict then slide "
            "a window over the whole image",
    "classes": "shapes: how many of the 8 shape classes (background comes on top)",
    "max_objects": "shapes: at most this many objects per image",
    "scenes": "shapes: how many training scenes to generate (val and test keep their 150 each)",
    "init": "start from a segmenter's or a classifier's weights (a classifier fills the encoder)",
}


def register(parent: click.Group) -> click.Group:
    """Add the ``segment`` group to ``parent`` and return it."""
    from cnnkit.cli.main import CONTEXT, SuggestingGroup, add_mode_commands, add_train_command
    from cnnkit.core.choices import SEG_LOSSES, SEGMENTERS
    from cnnkit.tasks.segment.config import SegmentConfig

    @parent.group("segment", cls=SuggestingGroup, context_settings=CONTEXT)
    def segment() -> None:
        """Semantic segmentation (a class per pixel): train, val, predict."""

    add_train_command(segment, SegmentConfig,
                      help="Train a U-Net, FCN or DeepLabV3 and write a run folder (weights, metrics, plots).",
                      option_help=TRAIN_HELP, choices={"model": SEGMENTERS, "loss": SEG_LOSSES})

    add_mode_commands(segment, SegmentConfig,
                      "mIoU, Dice, pixel accuracy and IoU per class, at the images' original size.",
                      "Segment images; print one line per image and the time per stage.")

    return segment
