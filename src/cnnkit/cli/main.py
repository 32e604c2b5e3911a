"""``cnnkit`` entry point: groups per task, modes per group, shared option names."""

from __future__ import annotations

import dataclasses
import difflib
import sys

import click

from cnnkit import __version__
from cnnkit.cli.options import option
from cnnkit.errors import CnnkitError

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


class SuggestingGroup(click.Group):
    """A group that answers a mistyped command with the closest names."""

    def resolve_command(self, ctx, args):
        name = args[0] if args else None
        if name and name not in self.commands and not name.startswith("-"):
            close = difflib.get_close_matches(name, list(self.commands), n=2, cutoff=0.5)
            hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
            raise click.UsageError(f"No such command '{name}'.{hint}", ctx)
        return super().resolve_command(ctx, args)


@click.group(cls=SuggestingGroup, context_settings=CONTEXT)
@click.version_option(__version__, "--version", "-V", prog_name="cnnkit", message="%(prog)s %(version)s")
def cli() -> None:
    """cnnkit: convolutional networks for computer vision.

    \b
    Grammar:  cnnkit TASK MODE [--option value ...]
    Example:  cnnkit classify train --data digits --epochs 20
              cnnkit classify val --weights runs/classify/train --data digits --split test
              cnnkit classify predict --weights runs/classify/train --source images/
    """


@cli.command(context_settings=CONTEXT)
def info() -> None:
    """Versions, devices and threads."""
    import platform

    import torch
    import torchvision

    from cnnkit.engine.progress import console

    lines = [
        ("cnnkit", __version__), ("python", platform.python_version()),
        ("platform", platform.platform()), ("torch", torch.__version__),
        ("torchvision", torchvision.__version__),
    ]
    for mod in ("timm", "torchmetrics", "safetensors", "sklearn", "PIL"):
        try:
            m = __import__(mod)
            lines.append((mod, getattr(m, "__version__", "?")))
        except ImportError:
            lines.append((mod, "not installed"))
    lines.append(("cuda", f"{torch.version.cuda} · {torch.cuda.device_count()} device(s)"
                  if torch.cuda.is_available() else "not available"))
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        lines.append((f"cuda:{i}", torch.cuda.get_device_name(i)))
    mps = getattr(torch.backends, "mps", None)
    lines.append(("mps", "available" if mps and mps.is_available() else "not available"))
    from cnnkit.utils.device import select_device

    lines.append(("default device", str(select_device("auto"))))
    lines.append(("torch threads", str(torch.get_num_threads())))
    import os

    lines.append(("cpu cores", str(os.cpu_count())))
    con = console()
    width = max(len(k) for k, _ in lines)
    for k, v in lines:
        con.print(f"{k:<{width}}  {v}")


@cli.command(context_settings=CONTEXT)
@click.argument("pattern", required=False)
@click.option("--task", type=click.Choice(["classify", "detect", "instance", "segment", "medical"]), default=None,
              help="only this task's models (classify also lists the backbones of the others)")
def models(pattern: str | None, task: str | None) -> None:
    """List registered models by task (optionally matching a glob PATTERN)."""
    from cnnkit.engine.progress import console
    from cnnkit.models.registry import list_models, model_entry

    con = console()
    names = list_models(pattern, task)
    order = {"classify": 0, "detect": 1, "instance": 2, "segment": 3, "medical": 4}
    for name in sorted(names, key=lambda n: (order.get(model_entry(n).task, 9), n)):
        e = model_entry(name)
        con.print(f"{name:<22} {e.task:<9} {e.family:<11} {e.description}")


@cli.command(context_settings=CONTEXT)
@click.option("--out", default="runs/demo", help="where the demo run goes")
@click.option("--epochs", type=int, default=20, help="training epochs")
@option("device")
def demo(out: str, epochs: int, device: str) -> None:
    """Train a CNN on the bundled handwritten digits, test it, predict a few images."""
    from cnnkit.cli.demo import run_demo

    run_demo(out, epochs, device)


@cli.group(cls=SuggestingGroup, context_settings=CONTEXT)
def classify() -> None:
    """Image classification (single label): train, val, predict, features, visualize."""


def add_train_command(group: click.Group, cfg_cls: type, api_module: str, help: str | None = None,
                      option_help: dict[str, str] | None = None, choices: dict[str, tuple] | None = None,
                      hide: tuple[str, ...] = ()) -> click.Command:
    """``cnnkit TASK train``: options generated from ``cfg_cls``, plus ``--config`` and ``--resume``.

    ``api_module`` (imported on use, to keep ``--help`` fast) provides ``train(cfg, resume=...)``
    and ``config_from_file(path, overrides)``. A task's own wording goes in ``help`` (the
    command's) and ``option_help`` (per option name); ``choices`` turns options into fixed
    choices; ``hide`` drops shared options the task does not use.
    """
    import importlib

    from cnnkit.cli.options import config_options, explicit_options

    task = group.name

    @group.command("train", context_settings=CONTEXT)
    @config_options(cfg_cls)
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                  help="read options from a config.yaml (options given here override it)")
    @click.option("--resume", type=click.Path(), default=None,
                  help="continue a stopped run exactly (its folder or weights/last.ckpt)")
    @click.pass_context
    def train_cmd(ctx: click.Context, config_file: str | None, resume: str | None, **options) -> None:
        api = importlib.import_module(api_module)
        names = [f.name for f in dataclasses.fields(cfg_cls)]
        if resume:
            api.train(resume=resume, **explicit_options(ctx, names))
            return
        if config_file:
            cfg = api.config_from_file(config_file, explicit_options(ctx, names))
        else:
            cfg = cfg_cls(**options)
        api.train(cfg)

    train_cmd.help = help or f"Train a {task} model and write a run folder (weights, metrics, plots)."
    train_cmd.params = [p for p in train_cmd.params if p.name not in hide]
    for param in train_cmd.params:
        if option_help and param.name in option_help:
            param.help = option_help[param.name]
        if choices and param.name in choices:
            param.type = click.Choice(choices[param.name])
    return train_cmd


def _add_classify_train() -> None:
    from cnnkit.tasks.classify.config import ClassifyConfig

    add_train_command(classify, ClassifyConfig, "cnnkit.api.classify").help = (
        "Train a classifier and write a run folder (weights, metrics, plots).")


_add_classify_train()


from cnnkit.cli.multivalue import MultiValueOption

WEIGHTS_HELP = ("best.safetensors or its run folder; several (--weights A B C, or a shell glob such as "
                "run/weights/snapshot*.safetensors) are combined into an ensemble")
ENSEMBLE_HELP = ("how several --weights combine: mean (average probabilities) or vote (majority of the "
                 "members' top-1, ties broken by mean probability)")
TTA_HELP = ("test-time augmentation, views averaged with the original: flip (horizontal), vflip, "
            "scale[=S] (zoom by 1-S and 1+S, default 0.1), comma-separated (every combination is a view); "
            "use views that keep the label: scale for digits and text (a flipped digit is another "
            "symbol), flip,scale for objects such as shapes")


@classify.command("val", context_settings=CONTEXT)
@click.option("--weights", cls=MultiValueOption, metavar="PATH...", required=True, help=WEIGHTS_HELP)
@click.option("--data", required=True, help="dataset: digits, shapes or an ImageFolder path")
@option("split")
@click.option("--batch", type=int, default=64, help="batch size")
@option("device")
@option("workers")
@click.option("--ensemble", type=click.Choice(["mean", "vote"]), default="mean", help=ENSEMBLE_HELP)
@click.option("--tta", default=None, help=TTA_HELP)
@click.option("--missing", default=None,
              help="missing-data curve: comma-separated shares of each image to drop (e.g. 0,0.1,0.3,0.5); "
                   "several --weights are then compared, not ensembled")
@click.option("--missing-mode", type=click.Choice(["pixel", "patch"]), default="patch",
              help="with --missing: drop single pixels or square patches")
@click.option("--plot", type=click.Path(dir_okay=False), default="missing_curve.png",
              help="with --missing: where the accuracy-vs-missing PNG goes")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="also write the metrics to this JSON file")
def val_cmd(weights, data, split, batch, device, workers, ensemble, tta, missing, missing_mode, plot,
            json_path) -> None:
    """Evaluate weights (or an ensemble of several) on a dataset split (top-1, top-5, per-class,
    macro-F1, balanced accuracy; with several weights also each member's top-1)."""
    from cnnkit.api import classify as api

    if missing is not None:
        try:
            ratios = [float(r) for r in missing.split(",") if r.strip()]
        except ValueError:
            raise CnnkitError(f"--missing takes comma-separated numbers, e.g. 0,0.1,0.3,0.5; got '{missing}'") from None
        api.missing_curve(list(weights), data, ratios, split=split, mode=missing_mode, batch=batch,
                          device=device, plot=plot, json_path=json_path)
        return
    api.val(list(weights), data, split=split, batch=batch, device=device, workers=workers,
            ensemble=ensemble, tta=tta, json_path=json_path)


@classify.command("predict", context_settings=CONTEXT)
@click.option("--weights", cls=MultiValueOption, metavar="PATH...", required=True, help=WEIGHTS_HELP)
@option("source")
@click.option("--topk", type=int, default=5, help="how many classes to list per image")
@click.option("--batch", type=int, default=64, help="batch size")
@option("device")
@click.option("--ensemble", type=click.Choice(["mean", "vote"]), default="mean", help=ENSEMBLE_HELP)
@click.option("--tta", default=None, help=TTA_HELP)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help='write [{"path", "label", "score", "topk": [[label, score], ...]}] to this file')
def predict_cmd(weights, source, topk, batch, device, ensemble, tta, json_path) -> None:
    """Classify images with one model or an ensemble; print a table (and optionally write JSON)."""
    from cnnkit.api import classify as api

    if topk < 1:
        raise CnnkitError(f"--topk must be at least 1, got {topk}")
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    api.predict(list(weights), source, topk=topk, batch=batch, device=device, ensemble=ensemble,
                tta=tta, json_path=json_path)


from cnnkit.cli.features import register as _register_features

_register_features(classify)

# Task groups with their own module: cnnkit.cli.<name>.register(cli) adds ``cnnkit <name> ...``.
for _name in ("multilabel", "detect", "segment", "medical"):
    __import__(f"cnnkit.cli.{_name}", fromlist=["register"]).register(cli)

from cnnkit.cli.augment import augment

cli.add_command(augment)

from cnnkit.cli.convert import convert

cli.add_command(convert)

from cnnkit.cli.export import benchmark_cmd, export_cmd

cli.add_command(export_cmd)
cli.add_command(benchmark_cmd)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors print one sentence and exit with code 2."""
    try:
        cli.main(args=argv, prog_name="cnnkit", standalone_mode=False)
    except click.exceptions.Exit as e:
        return e.exit_code
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        return 130
    except CnnkitError as e:
        click.echo(f"Error: {e}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
