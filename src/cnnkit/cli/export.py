"""``cnnkit export`` and ``cnnkit benchmark``: any task's weights to ONNX / TorchScript, and
one table over formats."""

from __future__ import annotations

import click

from cnnkit.cli.options import option

CONTEXT = {"help_option_names": ["-h", "--help"], "show_default": True, "max_content_width": 110}


@click.command("export", context_settings=CONTEXT)
@option("weights", help="best.safetensors or its run folder (any task)")
@click.option("--format", "fmt", type=click.Choice(["onnx", "torchscript"]), default="onnx", help="what to write")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="file to write (default: beside the weights, best.onnx or best.torchscript)")
@click.option("--dynamic", is_flag=True, help="let height and width vary too (the batch always varies, "
              "except for torchvision's detectors, which take one image per call)")
@click.option("--opset", type=int, default=None, help="ONNX opset (default 17)")
@click.option("--imgsz", type=int, nargs=2, default=None, metavar="H W",
              help="input height and width of the exported model (default: the card's)")
@click.option("--no-check", is_flag=True, help="skip running eager and exported side by side")
def export_cmd(weights, fmt, out, dynamic, opset, imgsz, no_check) -> None:
    """Export a trained model with its model card inside; checks itself against eager PyTorch.

    \b
    The file runs anywhere ONNX Runtime runs, and cnnkit reads it back:
      cnnkit export --weights runs/detect/train
      cnnkit detect predict --weights runs/detect/train/weights/best.onnx --source images/
    """
    from cnnkit.methods.export import export

    export(weights, fmt, out, dynamic, opset, tuple(imgsz) if imgsz else None, check=not no_check)


@click.command("benchmark", context_settings=CONTEXT)
@option("weights", help="best.safetensors or its run folder (any task)")
@click.option("--data", default=None, help="also measure the task's metric on this data (as for val)")
@option("split", help="split for the metric")
@click.option("--batch", type=int, default=16, help="the larger batch size timed (batch 1 is always timed)")
@click.option("--formats", default="torch,torchscript,onnx", help="comma-separated: torch, torchscript, onnx")
@click.option("--runs", type=int, default=20, help="timed calls per batch size (after --warmup)")
@click.option("--warmup", type=int, default=3, help="untimed calls first")
@option("device", default="cpu")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="keep the exported files in this folder (default: a temporary one)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the table as JSON")
def benchmark_cmd(weights, data, split, batch, formats, runs, warmup, device, out, json_path) -> None:
    """Size, latency (batch 1 and N), images/s and the task's metric per format, side by side."""
    from cnnkit.methods.benchmark import benchmark

    benchmark(weights, data, batch, tuple(f.strip() for f in formats.split(",") if f.strip()), runs, warmup,
              device, split, out, json_path)
