"""``cnnkit medical train|val|predict``: argument parsing only."""

from __future__ import annotations

import click

TRAIN_HELP = {
    "data": "phantoms (built-in 3-D MR-like volumes: organ + lesions, noise, bias field) or a YAML naming "
            "NIfTI images/labels folders per split and the class names",
    "model": "unet3d (residual 3-D U-Net) or vnet (V-Net: residual 3-D encoder-decoder with 5x5x5 convolutions, "
             "heavier and slower to start)",
    "loss": "dice, or dice+ce (Dice plus cross-entropy)",
    "patch": "train on random cubes of this side (a multiple of 16); default: whole volumes",
    "lr": "peak learning rate; 1e-3 suits unet3d, vnet needs 1e-2 to leave its first all-one-class state",
}


def register(parent: click.Group) -> click.Group:
    """Add the ``medical`` group to ``parent`` and return it."""
    from cnnkit.api.medical import MedicalConfig
    from cnnkit.cli.main import CONTEXT, SuggestingGroup, add_train_command
    from cnnkit.models.volumetric import VOLUME_MODELS
    from cnnkit.tasks.medical import MEDICAL_LOSSES

    @parent.group("medical", cls=SuggestingGroup, context_settings=CONTEXT)
    def medical() -> None:
        """Volumetric (3-D) medical segmentation with V-Net or a 3-D U-Net: train, val, predict."""

    # the image-classifier options 3-D training does not use are hidden (MedicalConfig refuses them)
    add_train_command(medical, MedicalConfig, "cnnkit.api.medical",
                      help="Train a 3-D segmenter and write a run folder (weights, metrics, plots).",
                      option_help=TRAIN_HELP, choices={"model": VOLUME_MODELS, "loss": MEDICAL_LOSSES},
                      hide=MedicalConfig.UNUSED)

    @medical.command("val", context_settings=CONTEXT)
    @click.option("--weights", required=True, help="best.safetensors or its run folder")
    @click.option("--data", required=True, help="phantoms or a NIfTI YAML")
    @click.option("--split", type=click.Choice(["train", "val", "test"]), default="val", help="which split")
    @click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="also write the metrics to this JSON file")
    def val_cmd(weights, data, split, device, json_path) -> None:
        """Dice and 95th-percentile Hausdorff distance (voxels) per class."""
        from cnnkit.api import medical as api

        api.val(weights, data, split=split, device=device, json_path=json_path)

    @medical.command("predict", context_settings=CONTEXT)
    @click.option("--weights", required=True, help="best.safetensors or its run folder")
    @click.option("--source", required=True, help="a .nii/.nii.gz file or a folder of them")
    @click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    @click.option("--save-dir", type=click.Path(file_okay=False), default=None,
                  help="write each label volume here as NIfTI (same name and affine as the input)")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help='write [{"path", "shape", "voxels": {class: count}, "labels"}]')
    def predict_cmd(weights, source, device, save_dir, json_path) -> None:
        """Segment volumes (sliding window over any size); print one line per volume."""
        from cnnkit.api import medical as api

        api.predict(weights, source, device=device, save_dir=save_dir, json_path=json_path)

    return medical
