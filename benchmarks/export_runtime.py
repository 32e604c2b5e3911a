"""Eager PyTorch vs TorchScript vs ONNX Runtime (fp32), in one run, through `cnnkit benchmark`.

    python benchmarks/export_runtime.py [--runs 30] [--threads N] [--device cpu]

Rows: resnet18 classifier at 224 px (batch 1 and 32), fastdet at 320 px (batch 1 and 8) and
the smallcnn U-Net at 128 px (batch 1 and 8). The models are freshly initialized (latency does
not depend on the weights); each is saved as cnnkit weights with a model card, then exported and
timed by `cnnkit.methods.benchmark` (the core only: the network as exported, no decoding).
Goal (issue 15): ONNX Runtime at least 1.5x eager at batch 1 for every row. Run it alone: two
processes on 2 cores mislead.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from _common import save
from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.engine.checkpoint import save_weights
from cnnkit.methods.benchmark import benchmark

CASES = [  # name, card, batch
    ("resnet18 224", ModelCard("classify", "resnet18", [str(i) for i in range(10)],
                               InputSpec(224, 224, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                               model_kwargs={"drop_rate": 0.0}), 32),
    ("fastdet 320", ModelCard("detect", "fastdet", [str(i) for i in range(8)], InputSpec(320, 320, 3, "letterbox"),
                              OutputSpec(("scores", "boxes"), "fastdet"), model_kwargs={"imgsz": 320, "width": 16},
                              thresholds={"iou": 0.6, "nms": "hard", "max_det": 100}), 8),
    ("unet 128", ModelCard("segment", "unet", ["background", "a", "b", "c", "d"], InputSpec(128, 128, 3),
                           OutputSpec(("logits",), "seg-logits"), model_kwargs={"encoder": "smallcnn"}), 8),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from cnnkit.runtime.pipeline import pipeline_for

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, card, batch in CASES:
            torch.manual_seed(0)
            model = pipeline_for(card).build()
            w = Path(tmp) / name.replace(" ", "_") / "best.safetensors"
            w.parent.mkdir()
            save_weights(w, model.state_dict(), card.to_dict())
            r = benchmark(w, None, batch, runs=args.runs, warmup=args.warmup, device=args.device, verbose=False)
            by = {row["format"]: row for row in r["rows"]}
            eager = by["torch"]
            row = {"model": name, "batch": batch}
            for fmt in ("torch", "torchscript", "onnx"):
                row[f"{fmt}_b1_ms"] = by[fmt]["b1_median_ms"]
                row[f"{fmt}_bN_ms"] = by[fmt]["bN_median_ms"]
            for fmt in ("torchscript", "onnx"):
                row[f"{fmt}_speedup_b1"] = round(eager["b1_median_ms"] / by[fmt]["b1_median_ms"], 3)
                row[f"{fmt}_speedup_bN"] = round(eager["bN_median_ms"] / by[fmt]["bN_median_ms"], 3)
            rows.append(row)
            print(f"{name:<14} b1: eager {eager['b1_median_ms']:7.2f} ms  torchscript {by['torchscript']['b1_median_ms']:7.2f}"
                  f"  onnx {by['onnx']['b1_median_ms']:7.2f}  (ORT {row['onnx_speedup_b1']:.2f}x eager)  |  b{batch}: eager "
                  f"{eager['bN_median_ms']:7.2f}  torchscript {by['torchscript']['bN_median_ms']:7.2f}  onnx "
                  f"{by['onnx']['bN_median_ms']:7.2f} (ORT {row['onnx_speedup_bN']:.2f}x)")
    save("export_runtime", {"runs": args.runs, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
