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


def add_train_command(group: click.Group, cfg_cls: type, help: str | None = None,
                      option_help: dict[str, str] | None = None, choices: dict[str, tuple] | None = None,
                      hide: tuple[str, ...] = ()) -> click.Command:
    """``cnnkit TASK train``: options generated from ``cfg_cls``, plus ``--config`` and ``--resume``.

    A task's own wording goes in ``help`` (the command's) and ``option_help`` (per option
    name); ``choices`` turns options into fixed choices; ``hide`` drops shared options the
    task does not use. The command runs ``cnnkit.api.train(TASK, ...)`` (imported on use, to
    keep ``--help`` fast).
    """
    from cnnkit.cli.options import config_options, explicit_options

    task = cfg_cls.TASK

    @group.command("train", context_settings=CONTEXT)
    @config_options(cfg_cls)
    @click.option("--config", "config_file", type=click.Path(dir_okay=False), default=None,
                  help="read options from a config.yaml (options given here override it)")
    @click.option("--resume", type=click.Path(), default=None,
                  help="continue a stopped run exactly (its folder or weights/last.ckpt)")
    @click.pass_context
    def train_cmd(ctx: click.Context, config_file: str | None, resume: str | None, **options) -> None:
        from cnnkit import api

        names = [f.name for f in dataclasses.fields(cfg_cls)]
        if resume:
            api.train(task, resume=resume, **explicit_options(ctx, names))
            return
        if config_file:
            cfg = api.config_from_file(task, config_file, explicit_options(ctx, names))
        else:
            cfg = cfg_cls(**options)
        api.train(task, cfg)

    train_cmd.help = help or f"Train a {task} model and write a run folder (weights, metrics, plots)."
    train_cmd.params = [p for p in train_cmd.params if p.name not in hide]
    for param in train_cmd.params:
        if option_help and param.name in option_help:
            param.help = option_help[param.name]
        if choices and param.name in choices:
            param.type = click.Choice(choices[param.name])
    return train_cmd


def add_mode_commands(group: click.Group, cfg_cls: type, val_help: str, predict_help: str) -> None:
    """``cnnkit TASK val`` and ``cnnkit TASK predict`` with the options the task declares in
    ``cfg_cls.VAL`` and ``cfg_cls.PREDICT``; they run ``cnnkit.api.val/predict(TASK, ...)``."""
    from cnnkit.cli.options import mode_options

    task = cfg_cls.TASK

    @group.command("val", context_settings=CONTEXT, help=val_help)
    @mode_options(cfg_cls.VAL)
    def val_cmd(weights, data, **options) -> None:
        from cnnkit import api

        api.val(task, list(weights) if isinstance(weights, tuple) else weights, data, **options)

    @group.command("predict", context_settings=CONTEXT, help=predict_help)
    @mode_options(cfg_cls.PREDICT)
    def predict_cmd(weights, source, **options) -> None:
        from cnnkit import api

        api.predict(task, list(weights) if isinstance(weights, tuple) else weights, source, **options)

    for attr, name, help_text in METHOD_COMMANDS:
        if getattr(cfg_cls, attr, None):
            _add_method_command(group, task, name, help_text, getattr(cfg_cls, attr))


# the methods every task with the options declares gets as `cnnkit TASK NAME` (config attribute, name, help)
METHOD_COMMANDS = (
    ("ATTACK", "attack", (
        "The val metric under an adversarial attack (FGSM and PGD in the L-inf or L2 ball; for classifiers also "
        "Carlini-Wagner L2 and the standard AutoAttack), with the attack's success rate, perturbation size and a "
        "picture.")),
    ("ROBUSTNESS", "robustness", (
        "The val metric under the 15 ImageNet-C corruptions (noise, blur, weather, digital) at five severities, "
        "plus occlusion and illumination (gamma, shadow, colour temperature); with --baseline, the corruption error "
        "(mCE). Prints a table, writes a heat map.")),
    ("EXPLAIN", "explain", (
        "Heat maps of what the model's answers rest on (Grad-CAM and kin, saliency, integrated gradients, "
        "occlusion), as PNG overlays and .npy; with --data and --eval, whether they are right.")),
)


def _add_method_command(group: click.Group, task: str, name: str, help_text: str, opts) -> None:
    """``cnnkit TASK NAME`` with the options ``opts``; it runs ``cnnkit.api.NAME(TASK, weights, ...)``."""
    from cnnkit.cli.options import mode_options

    def command(weights, **options) -> None:
        from cnnkit import api

        getattr(api, name)(task, weights, **options)

    group.command(name, context_settings=CONTEXT, help=help_text)(mode_options(opts)(command))


def _add_classify_commands() -> None:
    from cnnkit.tasks.classify.config import ClassifyConfig

    add_train_command(classify, ClassifyConfig,
                      help="Train a classifier and write a run folder (weights, metrics, plots).")
    add_mode_commands(
        classify, ClassifyConfig,
        "Evaluate weights (or an ensemble of several) on a dataset split (top-1, top-5, per-class, macro-F1, "
        "balanced accuracy; with several weights also each member's top-1).",
        "Classify images with one model or an ensemble; print a table (and optionally write JSON).")


_add_classify_commands()


from cnnkit.cli.features import register as _register_features

_register_features(classify)

# Task groups with their own module: cnnkit.cli.<name>.register(cli) adds ``cnnkit <name> ...``.
for _name in ("multilabel", "detect", "segment", "medical"):
    __import__(f"cnnkit.cli.{_name}", fromlist=["register"]).register(cli)

from cnnkit.cli.augment import augment

cli.add_command(augment)

from cnnkit.cli.convert import convert

cli.add_command(convert)

from cnnkit.cli.export import benchmark_cmd, export_cmd, prune_cmd, quantize_cmd

cli.add_command(export_cmd)
cli.add_command(quantize_cmd)
cli.add_command(prune_cmd)
cli.add_command(benchmark_cmd)

from cnnkit.cli.serve import serve_cmd

cli.add_command(serve_cmd)


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
