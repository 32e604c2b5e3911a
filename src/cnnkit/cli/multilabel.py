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
    from cnnkit.cli.main import CONTEXT, SuggestingGroup, add_mode_commands, add_train_command
    from cnnkit.core.choices import MULTILABEL_LOSSES as LOSSES
    from cnnkit.tasks.multilabel.config import MultiLabelConfig

    @parent.group("multilabel", cls=SuggestingGroup, context_settings=CONTEXT)
    def multilabel() -> None:
        """Multi-label classification (any number of labels per image): train, val, predict, samples."""

    add_train_command(multilabel, MultiLabelConfig,
                      help="Train a multi-label classifier, tune one threshold per class on val, and "
                           "write a run folder (weights, metrics, plots).",
                      option_help=TRAIN_HELP, choices={"loss": LOSSES})
    add_mode_commands(multilabel, MultiLabelConfig,
                      "Evaluate weights on a dataset split at the thresholds in the model card: mAP, micro and "
                      "macro F1, per-class AP, precision, recall and F1.",
                      "Tag images: the labels at or above their threshold and every class's probability.")

    @multilabel.command("samples", context_settings=CONTEXT)
    @click.option("--data", default="shapes", help="dataset: shapes, a CSV file or a folder with train.csv")
    @option("split", default="test")
    @click.option("--count", type=int, default=16, help="how many images (the first of the split)")
    @click.option("--out", required=True, type=click.Path(file_okay=False), help="folder to write to")
    def samples_cmd(data, split, count, out) -> None:
        """Write images of a dataset split as PNG files with their labels.csv (path,labels)."""
        from cnnkit.data.multilabel import write_samples
        from cnnkit.engine.progress import console

        path = write_samples(data, out, split=split, count=count)
        console().print(f"wrote {path} and its images")

    return multilabel
