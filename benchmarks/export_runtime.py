"""Eager PyTorch vs TorchScript vs ONNX Runtime (fp32), in one run, through `cnnkit benchmark`.

    python benchmarks/export_runtime.py [--repeats 5] [--runs 30] [--threads N] [--device cpu]

Rows: resnet18 classifier at 224 px (batch 1 and 32), fastdet at 320 px (batch 1 and 8) and
the smallcnn U-Net at 128 px (batch 1 and 8). The models are freshly initialized (latency does
not depend on the weights); each is saved as cnnkit weights with a model card, then exported and
timed by `cnnkit.methods.benchmark` (the core only: the network as exported, no decoding).
Each model is measured ``--repeats`` times, each time in a fresh process (on a shared 2-core
machine the same process-level setup moves all formats by up to 2x and the ratio by 1.3-1.9x
from one process to the next, so one process proves little); the table gives the median of the
repeats and the ratio's range. Goal (issue 15): ONNX Runtime at least 1.5x eager at batch 1 for
every row. Run it alone: two processes on 2 cores mislead.

Each row also gives the roofline: the core's floating-point work per image (PyTorch's
``FlopCounterMode``, convolutions and matrix products) and the machine's fp32 peak measured in
the same process (a 2048 x 2048 matrix product, median of 10), so "ONNX Runtime at 1.5x eager"
can be read as the share of the peak it would take. Where that share is near or above 100%,
the goal is out of reach for any fp32 runtime on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
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


def gflop(model: torch.nn.Module, card: ModelCard) -> float:
    """Floating-point operations (multiply and add counted apart) of one image through the core."""
    from torch.utils.flop_counter import FlopCounterMode

    from cnnkit.runtime.pipeline import pipeline_for

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(pipeline_for(card).example_input(1))
    return round(counter.get_total_flops() / 1e9, 4)


def peak_gflops(device: str, n: int = 2048, calls: int = 10) -> float:
    """fp32 GFLOP/s of an n x n matrix product on ``device`` (median of ``calls``): the peak a
    runtime can hope for on convolutions."""
    import time

    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    times = []
    for i in range(calls + 3):
        t0 = time.perf_counter()
        a @ b
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return round(2 * n**3 / statistics.median(times) / 1e9, 1)


def measure(name: str, runs: int, warmup: int, device: str) -> dict:
    """One case in this process: median ms per format at batch 1 and N."""
    from cnnkit.runtime.pipeline import pipeline_for

    card, batch = next((c, b) for n, c, b in CASES if n == name)
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        model = pipeline_for(card).build()
        w = Path(tmp) / "best.safetensors"
        save_weights(w, model.state_dict(), card.to_dict())
        r = benchmark(w, None, batch, runs=runs, warmup=warmup, device=device, verbose=False)
    row = {"model": name, "batch": batch, "gflop_b1": gflop(model, card), "peak_gflops": peak_gflops(device)}
    for by in r["rows"]:
        row[f"{by['format']}_b1_ms"] = by["b1_median_ms"]
        row[f"{by['format']}_bN_ms"] = by["bN_median_ms"]
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="fresh processes per model")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: measure one case, print its row
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.case:
        print(json.dumps(measure(args.case, args.runs, args.warmup, args.device)))
        return

    rows = []
    for name, _, batch in CASES:
        reps = []
        for _ in range(args.repeats):
            cmd = [sys.executable, __file__, "--case", name, "--runs", str(args.runs), "--warmup", str(args.warmup),
                   "--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            reps.append(json.loads(out.strip().splitlines()[-1]))
        row = {"model": name, "batch": batch, "repeats": reps}
        for fmt in ("torch", "torchscript", "onnx"):
            for b in ("b1", "bN"):
                row[f"{fmt}_{b}_ms"] = round(statistics.median(r[f"{fmt}_{b}_ms"] for r in reps), 3)
        row["gflop_b1"] = reps[0]["gflop_b1"]
        row["peak_gflops"] = round(statistics.median(r["peak_gflops"] for r in reps), 1)
        # share of the same process's matmul peak: ORT's, and what 1.5x eager would take
        row["onnx_peak_share_b1"] = round(statistics.median(
            r["gflop_b1"] / (r["onnx_b1_ms"] / 1e3) / r["peak_gflops"] for r in reps), 3)
        row["goal_peak_share_b1"] = round(statistics.median(
            1.5 * r["gflop_b1"] / (r["torch_b1_ms"] / 1e3) / r["peak_gflops"] for r in reps), 3)
        for fmt in ("torchscript", "onnx"):
            for b in ("b1", "bN"):
                ratios = [r[f"torch_{b}_ms"] / r[f"{fmt}_{b}_ms"] for r in reps]
                row[f"{fmt}_speedup_{b}"] = round(statistics.median(ratios), 3)
                row[f"{fmt}_speedup_{b}_range"] = [round(min(ratios), 3), round(max(ratios), 3)]
        rows.append(row)
        lo, hi = row["onnx_speedup_b1_range"]
        print(f"{name:<14} b1: eager {row['torch_b1_ms']:7.2f} ms  torchscript {row['torchscript_b1_ms']:7.2f}  onnx "
              f"{row['onnx_b1_ms']:7.2f}  (ORT {row['onnx_speedup_b1']:.2f}x eager, {lo:.2f}-{hi:.2f})  |  "
              f"b{batch}: eager {row['torch_bN_ms']:7.2f}  torchscript {row['torchscript_bN_ms']:7.2f}  onnx "
              f"{row['onnx_bN_ms']:7.2f} (ORT {row['onnx_speedup_bN']:.2f}x)  |  {row['gflop_b1']:.2f} GFLOP/image, "
              f"peak {row['peak_gflops']:.0f} GFLOP/s: ORT b1 at {row['onnx_peak_share_b1']:.0%} of it, "
              f"1.5x eager would take {row['goal_peak_share_b1']:.0%}", flush=True)
    save("export_runtime", {"runs": args.runs, "repeats": args.repeats, "device": args.device, "rows": rows})


if __name__ == "__main__":
    main()
