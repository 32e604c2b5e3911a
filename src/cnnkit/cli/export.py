"""``cnnkit export``, ``cnnkit quantize``, ``cnnkit prune`` and ``cnnkit benchmark``: any task's
weights to ONNX / TorchScript / int8 ONNX or to a narrower network, and one table over them."""

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


@click.command("quantize", context_settings=CONTEXT)
@option("weights", help="best.safetensors or its run folder (any task)")
@click.option("--data", required=True, help="the task's data (as for val); its images calibrate the int8 ranges")
@click.option("--split", default="train", help="split whose images calibrate (a few others check the result)")
@click.option("--calib", type=click.IntRange(1), default=256, help="images used for calibration")
@click.option("--method", type=click.Choice(["minmax", "entropy", "percentile"]), default="minmax",
              help="how activation ranges are set from the calibration images")
@click.option("--per-channel", is_flag=True, help="one weight scale per output channel (often more accurate)")
@click.option("--weight-bits", type=click.Choice(["7", "8"]), default="7",
              help="7 keeps ONNX Runtime's int8 kernels from saturating on x86 CPUs without VNNI (AVX2 only); "
                   "8 is finer on CPUs with VNNI and on ARM")
@click.option("--exclude", default="", show_default=False,
              help="comma-separated ONNX node names left in float (see the report)")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="file to write (default: beside the weights, best.int8.onnx)")
@click.option("--no-sensitivity", is_flag=True, help="skip the per-layer error report")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the report as JSON")
def quantize_cmd(weights, data, split, calib, method, per_channel, weight_bits, exclude, out, no_sensitivity,
                 json_path) -> None:
    """Post-training int8: an ONNX Runtime QDQ model calibrated on the task's own images.

    \b
    The file is a cnnkit .onnx like any other: val, predict, benchmark and serve take it.
      cnnkit quantize --weights runs/classify/train --data digits
      cnnkit classify val --weights runs/classify/train/weights/best.int8.onnx --data digits
    """
    from cnnkit.methods.quantize import quantize
    from cnnkit.utils.io import write_json

    report = quantize(weights, data, out, calib, method, per_channel,
                      tuple(n.strip() for n in exclude.split(",") if n.strip()), split, not no_sensitivity,
                      weight_bits=int(weight_bits))
    if json_path:
        write_json(json_path, report)


@click.command("prune", context_settings=CONTEXT)
@option("weights", help="best.safetensors or its run folder (classify, multilabel, fastdet, segment, medical)")
@click.option("--ratio", type=float, default=0.5, help="share of the channels removed from every prunable layer, "
              "in (0, 1)")
@click.option("--method", type=click.Choice(["l1", "taylor"]), default="l1",
              help="how channels are ranked: l1 (weight magnitude) or taylor (|w * grad| on --data images)")
@click.option("--data", default=None, help="taylor: the task's data (as for val); its images give the gradients")
@click.option("--split", default="train", help="taylor: the split whose images give the gradients")
@click.option("--images", type=click.IntRange(1), default=64, help="taylor: how many images")
@click.option("--out", type=click.Path(dir_okay=False), default=None,
              help="file to write (default: beside the weights, pruned.safetensors)")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the report as JSON")
def prune_cmd(weights, ratio, method, data, split, images, out, json_path) -> None:
    """Structured pruning: remove whole channels (Torch-Pruning's dependency graph keeps
    residual adds and concatenations consistent); the card records the new widths.

    \b
    The pruned model needs fine-tuning; --init trains the narrower network:
      cnnkit prune --weights runs/classify/train --ratio 0.5
      cnnkit classify train --data digits --init runs/classify/train/weights/pruned.safetensors --epochs 5
    """
    from cnnkit.methods.prune import prune
    from cnnkit.utils.io import write_json

    report = prune(weights, ratio, method, data, split, images, out, json_path=json_path)
    if json_path:
        write_json(json_path, report)


@click.command("benchmark", context_settings=CONTEXT)
@option("weights", help="best.safetensors or its run folder (any task)")
@click.option("--data", default=None, help="also measure the task's metric on this data (as for val)")
@option("split", help="split for the metric")
@click.option("--batch", type=int, default=16, help="the larger batch size timed (batch 1 is always timed)")
@click.option("--formats", default="torch,torchscript,onnx",
              help="comma-separated: torch, torchscript, onnx, int8 (ONNX Runtime int8, calibrated on --data)")
@click.option("--runs", type=int, default=20, help="timed calls per batch size (after --warmup)")
@click.option("--warmup", type=int, default=3, help="untimed calls first")
@option("device", default="cpu")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="keep the exported files in this folder (default: a temporary one)")
@click.option("--variants", default="", show_default=False, metavar="NAME=W,...",
              help="other weights of the same task measured beside --weights in every format (a pruned or "
                   "distilled model): pruned=runs/classify/ft,student=runs/classify/kd")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None, help="write the table as JSON")
def benchmark_cmd(weights, data, split, batch, formats, runs, warmup, device, out, variants, json_path) -> None:
    """Size, parameters, latency (batch 1 and N), images/s and the task's metric per format
    and variant, side by side; the change is against --weights in the first format.

    \b
    One table for a model and its compressed variants:
      cnnkit benchmark --weights runs/classify/train --data digits --formats torch,onnx,int8 \\
          --variants pruned=runs/classify/pruned-ft
    """
    from cnnkit.methods.benchmark import benchmark, parse_variants

    benchmark(weights, data, batch, tuple(f.strip() for f in formats.split(",") if f.strip()), runs, warmup,
              device, split, out, json_path, variants=parse_variants(variants))
