"""``cnnkit classify features`` and ``cnnkit classify visualize``: argument parsing only."""

from __future__ import annotations

import click

from cnnkit.cli.options import option
from cnnkit.errors import CnnkitError


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(str(s) for s in shape)


def register(group: click.Group) -> None:
    """Add the ``features`` and ``visualize`` commands to a task group (``classify``)."""
    context = dict(group.context_settings)  # the group's help and default-display settings

    @group.command("features", context_settings=context)
    @option("weights")
    @option("source", required=False, default=None)
    @click.option("--layer", required=True,
                  help="stage to read (e.g. stages.3, layer4, pre_logits, logits, or any module name); "
                       "`--layer list` prints the stages with their output shapes")
    @click.option("--maps", is_flag=True, default=False,
                  help="keep the (C, H, W) feature maps instead of global-average-pooled (C,) vectors")
    @click.option("--batch", type=int, default=64, help="batch size")
    @option("device")
    @click.option("--out", type=click.Path(dir_okay=False), default=None,
                  help="write the array to this .npy file (+ a .json beside it: the image path of "
                       "each row)")
    def features_cmd(weights, source, layer, maps, batch, device, out) -> None:
        """Feature maps or pooled vectors of any named stage, for a file or folder of images."""
        from cnnkit.engine.progress import console
        from cnnkit.methods import inspect as api

        if layer == "list":
            info = api.layers(weights, device)
            con = console()
            con.print(f"layers of {info['arch']} for a {_shape(info['input_shape'])} input "
                      "(name, output shape):", highlight=False)
            width = max(len(n) for n in info["layers"])
            for name, shape in info["layers"].items():
                con.print(f"  {name:<{width}}  {_shape(shape)}", highlight=False)
            con.print("any module name from the model's named_modules() also works", highlight=False)
            return
        if source is None:
            raise CnnkitError("features needs --source (an image file or a folder), or --layer list")
        api.features(weights, source, layer, out=out, pooled=not maps, batch=batch, device=device)

    @group.command("visualize", context_settings=context)
    @option("weights")
    @click.option("--what", type=click.Choice(["filters", "featuremaps"]), required=True,
                  help="filters: first-layer filters as a grid; featuremaps: the most active channels "
                       "of every stage for each image of --source")
    @click.option("--source", default=None, help="an image file or a folder (for featuremaps)")
    @click.option("--layer", "layers", multiple=True,
                  help="stage to draw (repeat for several); default: every stage")
    @click.option("--topk", type=int, default=8, help="channels to show per stage")
    @option("device")
    @click.option("--out", default="runs/classify/visualize", help="folder for the PNG files")
    def visualize_cmd(weights, what, source, layers, topk, device, out) -> None:
        """PNGs of first-layer filters or per-stage feature maps."""
        from cnnkit.methods import inspect as api

        api.visualize(weights, what, source=source, out_dir=out, layers=list(layers) or None,
                      topk=topk, device=device)
