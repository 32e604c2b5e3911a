"""Quantization-aware training against post-training int8, where post-training int8 loses.

    python benchmarks/qat.py [--model mobilenet_v3_small] [--epochs 30] [--qat-epochs 5]

A classifier is trained on digits (fp32), then made int8 three ways, each an ONNX Runtime QDQ
file measured by ``cnnkit classify val`` on the test split:

- ``cnnkit quantize`` with one scale per weight tensor (the default, min/max calibration);
- ``cnnkit quantize --per-channel``, and the same with ``--weight-bits 8`` (full-range weights,
  which ONNX Runtime's kernels saturate on x86 CPUs without VNNI);
- ``cnnkit classify train --init FP32 --qat --epochs N`` (fine-tuned with the rounding
  simulated, then quantized per channel as above), and the same with ``--qat-weights
  per-tensor`` (one weight scale per tensor, trained for and written so);
- the same fine-tuning without the rounding, then quantized both ways (is it the rounding or
  the extra epochs?).

Depthwise convolutions (MobileNet) have channels of very different ranges, which one scale
per tensor rounds badly: the case post-training int8 is known to lose on. Accuracy only: the
script may share the machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import save


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mobilenet_v3_small")
    ap.add_argument("--data", default="digits")
    ap.add_argument("--imgsz", type=int, default=32)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--qat-epochs", type=int, default=5)
    ap.add_argument("--qat-lr", type=float, default=1e-3)
    ap.add_argument("--tag", default="", help="suffix of the results file (benchmarks/results/qat{TAG}.json)")
    args = ap.parse_args()
    import cnnkit
    from cnnkit.methods.quantize import quantize

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = Path(tmp) / "fp32"
        common = {"data": args.data, "model": args.model, "imgsz": args.imgsz, "verbose": False}
        cnnkit.train("classify", epochs=args.epochs, out=str(fp32), **common)
        rows["fp32 (PyTorch)"] = cnnkit.val("classify", fp32, args.data, split="test", verbose=False)["top1"]
        for label, per_channel, bits in (("int8, one scale per tensor", False, 7), ("int8, per channel", True, 7),
                                         ("int8, per channel, 8-bit weights", True, 8)):
            out = Path(tmp) / f"ptq{int(per_channel)}{bits}.int8.onnx"
            quantize(fp32, args.data, out, per_channel=per_channel, sensitivity=False, verbose=False,
                     weight_bits=bits)
            rows[label] = cnnkit.val("classify", out, args.data, split="test", verbose=False)["top1"]
        qat = Path(tmp) / "qat"
        cnnkit.train("classify", epochs=args.qat_epochs, init=str(fp32), qat=True, lr=args.qat_lr, out=str(qat),
                     **common)
        rows[f"int8 after QAT ({args.qat_epochs} epochs)"] = cnnkit.val(
            "classify", qat / "weights" / "best.int8.onnx", args.data, split="test", verbose=False)["top1"]
        # one weight scale per tensor, where post-training int8 loses most: trained for it, then written so
        qat = Path(tmp) / "qat-tensor"
        cnnkit.train("classify", epochs=args.qat_epochs, init=str(fp32), qat=True, qat_weights="per-tensor",
                     lr=args.qat_lr, out=str(qat), **common)
        rows[f"int8 per tensor after QAT per tensor ({args.qat_epochs} epochs)"] = cnnkit.val(
            "classify", qat / "weights" / "best.int8.onnx", args.data, split="test", verbose=False)["top1"]
        # the same fine-tuning without the simulated rounding: is it the rounding, or more epochs?
        more = Path(tmp) / "more"
        cnnkit.train("classify", epochs=args.qat_epochs, init=str(fp32), lr=args.qat_lr, out=str(more), **common)
        for per_channel in (True, False):
            out = Path(tmp) / f"more{int(per_channel)}.int8.onnx"
            quantize(more, args.data, out, per_channel=per_channel, sensitivity=False, verbose=False)
            rows[f"int8 per {'channel' if per_channel else 'tensor'} after {args.qat_epochs} plain epochs"] = \
                cnnkit.val("classify", out, args.data, split="test", verbose=False)["top1"]
    for label, top1 in rows.items():
        print(f"{label:<44} test top-1 {top1:.4f}  ({top1 - rows['fp32 (PyTorch)']:+.4f})")
    save(f"qat{args.tag}", {"args": vars(args), "top1": rows})


if __name__ == "__main__":
    main()
