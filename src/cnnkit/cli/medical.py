"""``cnnkit medical train|val|predict``: argument parsing only."""

from __future__ import annotations

import click

TRAIN_HELP = {
    "data": "phantoms (built-in 3-D MR-like volumes: organ + lesions, noise, bias field; for classifiers half "
            "have no lesion) or a YAML naming NIfTI images/labels folders per split and the class names (for "
            "classifiers: one folder per split with a subfolder of volumes per class)",
    "model": "segmenters: unet3d (residual 3-D U-Net), vnet (V-Net: residual 3-D encoder-decoder with 5x5x5 "
             "convolutions, heavier and slower to start), unet2d (2-D U-Net on every axial slice); classifiers: "
             "densenet3d (DenseNet-121, 3-D), densenet2d (DenseNet-121 on every slice, averaged per volume)",
    "loss": "segmenters: dice, or dice+ce (Dice plus cross-entropy); classifiers use cross-entropy",
    "patch": "segmenters: train on random cubes of this side (a multiple of 16); default a cube of the first "
             "training volume's largest side (whole volumes when they are all that size or smaller: others are "
             "cropped; give --patch for large or varied volumes); classifiers: resize every volume to this side, "
             "default the first volume's largest side",
    "lr": "peak learning rate; 1e-3 suits unet3d, vnet needs 1e-2 to leave its first all-one-class state",
}


def register(parent: click.Group) -> click.Group:
    """Add the ``medical`` group to ``parent`` and return it."""
    from cnnkit.cli.main import CONTEXT, SuggestingGroup, add_mode_commands, add_train_command
    from cnnkit.core.choices import MEDICAL_LOSSES, VOLUME_MODELS
    from cnnkit.tasks.medical.config import MedicalConfig

    @parent.group("medical", cls=SuggestingGroup, context_settings=CONTEXT)
    def medical() -> None:
        """Medical volumes: segmentation (3-D U-Net, V-Net, slice-wise 2-D U-Net) and classification
        (DenseNet-121 in 3-D or over slices): train, val, predict, explain."""

    # the image-classifier options 3-D training does not use are hidden (MedicalConfig refuses them)
    add_train_command(medical, MedicalConfig,
                      help="Train a volume segmenter or classifier and write a run folder (weights, metrics, "
                           "plots).",
                      option_help=TRAIN_HELP, choices={"model": VOLUME_MODELS, "loss": MEDICAL_LOSSES},
                      hide=MedicalConfig.UNUSED)

    add_mode_commands(medical, MedicalConfig,
                      "Dice and 95th-percentile Hausdorff distance (voxels) per class; for classifiers accuracy, "
                      "balanced accuracy, macro F1 and AUROC.",
                      "Segment volumes (sliding window over any size) or classify them; print one line per volume.")

    return medical
