"""``cnnkit multilabel train|val|predict|samples``: argument parsing only.

:func:`register` is called at the end of ``cnnkit.cli.main`` (it needs that module's group
class and train-command builder, and importing them here at the top would be circular).
"""

from __future__ import annotations

import click

from cnnkit.cli.options import option

# help for the options that only multi-label training has, or that mean more here
TRAIN_HELP = {
    "data": "dataset: shapes, a path,labels CSV (labels separated by ';'), or a folder with "
            "train.csv (optional val.csv, test.csv)",
    "loss": "bce (binary cross-entropy) or asl (asymmetric loss: down-weights easy negatives)",
    "asl_gamma_neg": "asymmetric loss: focusing power on negative labels",
    "asl_gamma_pos": "asymmetric loss: focusing power on positive labels",
    "asl_clip": "asymmetric loss: probability margin below which negatives are ignored",
    "aug": "training augmentations, e.g. flip,rotate=15,scale=0.8:1.2,translate=0.1,jitter=0.4,"
           "erase=0.25,blur=1.5 or none; default: affine,flip",
    "val_fraction": "fraction of the CSV held out for validation when there is no val.csv",
}


def register(parent: click.Group) -> click.Group:
    """Add the ``multilabel`` group (train, val, predict, samples) to ``parent`` and return it."""
    from cnnkit.cli.main import CONTEXT, SuggestingGroup, add_train_command
    from cnnkit.core.choices import MULTILABEL_LOSSES as LOSSES
    from cnnkit.errors import CnnkitError
    from cnnkit.tasks.multilabel.config import MultiLabelConfig

    @parent.group("multilabel", cls=SuggestingGroup, context_settings=CONTEXT)
    def multilabel() -> None:
        """Multi-label classification (any number of labels per image): train, val, predict, samples."""

    add_train_command(multilabel, MultiLabelConfig, "cnnkit.api.multilabel",
                      help="Train a multi-label classifier, tune one threshold per class on val, and "
                           "write a run folder (weights, metrics, plots).",
                      option_help=TRAIN_HELP, choices={"loss": LOSSES})

    @multilabel.command("val", context_settings=CONTEXT)
    @option("weights")
    @click.option("--data", required=True, help="dataset: shapes, a CSV file or a folder with train.csv")
    @option("split")
    @click.option("--batch", type=int, default=64, help="batch size")
    @option("device")
    @option("workers")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help="also write the metrics to this JSON file")
    def val_cmd(weights, data, split, batch, device, workers, json_path) -> None:
        """Evaluate weights on a dataset split (mAP, micro/macro F1, per-class AP/precision/recall/F1)
        at the thresholds in the model card."""
        from cnnkit.api import multilabel as api

        api.val(weights, data, split=split, batch=batch, device=device, workers=workers,
                json_path=json_path)

    @multilabel.command("predict", context_settings=CONTEXT)
    @option("weights")
    @option("source")
    @click.option("--batch", type=int, default=64, help="batch size")
    @option("device")
    @click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
                  help='write [{"path", "labels": [...], "scores": {class: probability}}] to this file')
    def predict_cmd(weights, source, batch, device, json_path) -> None:
        """Tag images with every label whose probability reaches its threshold."""
        from cnnkit.api import multilabel as api

        if batch < 1:
            raise CnnkitError(f"--batch must be at least 1, got {batch}")
        api.predict(weights, source, batch=batch, device=device, json_path=json_path)

    @multilabel.command("samples", context_settings=CONTEXT)
    @click.option("--data", default="shapes", help="dataset: shapes, a CSV file or a folder with train.csv")
    @option("split", default="test")
    @click.option("--count", type=int, default=16, help="how many images (the first of the split)")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write to")
    def samples_cmd(data, split, count, out) -> None:
        """Write images of a dataset split as PNG files with their labels.csv (path,labels)."""
        from cnnkit.api import multilabel as api
        from cnnkit.engine.progress import console

        path = api.write_samples(data, out, split=split, count=count)
        console().print(f"wrote {path} and its images")

    return multilabel
