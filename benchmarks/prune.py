"""Structured pruning: half the channels removed, fine-tuned, against the full model.

    python benchmarks/prune.py [--tasks classify,detect,segment] [--ratio 0.5]
    python benchmarks/prune.py --tasks detect,segment --det-epochs 60 --seg-epochs 60 --ft-epochs 15 \
        --det-imgsz 160 --seg-imgsz 64 --tag _converged      # trained to the plateau, then pruned

For each task a model is trained at cnnkit's defaults (digits: the default smallcnn; shapes
detection: fastdet for ``--det-minutes``; shapes segmentation: the U-Net for
``--seg-minutes``), pruned by ``cnnkit prune`` with the L1 and the Taylor criteria, and each
pruned model is fine-tuned by ``train --init`` (digits: the default epochs again; the others:
``--ft-minutes``); so is the full model (the control: a pruned model trained longer than the
original would otherwise look better for the extra training alone). Then ``cnnkit benchmark --variants`` times the full model and the fine-tuned
variants, eager and on ONNX Runtime, in interleaved rounds, and measures their metric on the
test (digits) or val split. Latency figures need the machine to themselves: run it alone.

With ``--det-epochs``/``--seg-epochs`` (and ``--ft-epochs``) the budgets are epochs instead of
minutes, so a model can be trained to its plateau before it is pruned: the printed and saved
validation curve of the full model's last epochs shows whether it got there. The metrics then
do not depend on the machine's speed or load; the latencies still do.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import save

TASKS = {
    "classify": {"data": "digits", "split": "test", "train": {}, "ft": {}},
    "detect": {"data": "shapes", "split": "val", "train": {"classes": 3, "max_objects": 4}, "minutes": "det"},
    "segment": {"data": "shapes", "split": "val", "train": {}, "minutes": "seg"},
}


def val_curve(run: Path, metric: str) -> list[float]:
    """The validation ``metric`` of every epoch of a run, from its ``metrics.csv``."""
    import csv

    with open(Path(run) / "metrics.csv", newline="") as f:
        return [round(float(row[metric]), 4) for row in csv.DictReader(f) if row.get(metric)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="classify,detect,segment")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--det-minutes", type=float, default=5.0)
    ap.add_argument("--seg-minutes", type=float, default=4.0)
    ap.add_argument("--ft-minutes", type=float, default=2.5, help="fine-tuning budget (detect, segment)")
    ap.add_argument("--det-epochs", type=int, default=0, help="train fastdet this many epochs instead of minutes")
    ap.add_argument("--seg-epochs", type=int, default=0, help="train the U-Net this many epochs instead of minutes")
    ap.add_argument("--ft-epochs", type=int, default=0, help="with --*-epochs: fine-tuning epochs (detect, segment)")
    ap.add_argument("--det-imgsz", type=int, default=0, help="detect input size (0: the default)")
    ap.add_argument("--seg-imgsz", type=int, default=0, help="segment input size (0: the default)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per model, format and batch size")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    import cnnkit
    from cnnkit.methods.benchmark import METRIC, benchmark

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            spec = TASKS[task]
            budget, ft_budget, train_opts = {}, {}, dict(spec["train"])
            if "minutes" in spec:
                epochs = getattr(args, f"{spec['minutes']}_epochs")
                budget = {"epochs": epochs} if epochs else {"time": getattr(args, f"{spec['minutes']}_minutes")}
                ft_budget = {"epochs": args.ft_epochs} if epochs and args.ft_epochs else {"time": args.ft_minutes}
                if getattr(args, f"{spec['minutes']}_imgsz"):
                    train_opts["imgsz"] = getattr(args, f"{spec['minutes']}_imgsz")
            full = Path(tmp) / task / "full"
            t0 = time.perf_counter()
            res = cnnkit.train(task, data=spec["data"], out=str(full), verbose=False, **train_opts, **budget)
            train_s = time.perf_counter() - t0
            curve = val_curve(res.run_dir, METRIC[task])
            print(f"{task} full: {len(curve)} epochs in {train_s:.0f} s; val {METRIC[task]} of the last ten: "
                  + " ".join(f"{v:.4f}" for v in curve[-10:]), flush=True)
            # the control: the full model given the same fine-tuning (more training alone may help)
            control = Path(tmp) / task / "full-ft"
            cnnkit.train(task, data=spec["data"], init=str(full), out=str(control), verbose=False, **train_opts,
                         **ft_budget)
            variants, notes = {"fp32 fine-tuned": str(control)}, {}
            for method in ("l1", "taylor"):
                report = cnnkit.prune(full, args.ratio, method=method, data=spec["data"],
                                      out=str(Path(tmp) / task / f"{method}.safetensors"), verbose=False)
                before_ft = cnnkit.val(task, report["file"], spec["data"], split=spec["split"], verbose=False)
                ft = Path(tmp) / task / f"{method}-ft"
                t0 = time.perf_counter()
                cnnkit.train(task, data=spec["data"], init=report["file"], out=str(ft), verbose=False,
                             **train_opts, **ft_budget)
                variants[f"{method} {args.ratio:g}"] = str(ft)
                notes[method] = {"prune_report": report, "before_fine_tune": before_ft,
                                 "fine_tune_s": round(time.perf_counter() - t0, 1)}
            table = benchmark(full, spec["data"], batch=16, formats=("torch", "onnx"), runs=args.runs, warmup=3,
                              split=spec["split"], verbose=True, variants=variants)
            for method, note in notes.items():
                key = METRIC[task]
                print(f"{task} {method}: before fine-tuning {key} {note['before_fine_tune'].get(key):.4f}")
            results[task] = {"data": spec["data"], "split": spec["split"], "train_s": round(train_s, 1),
                             "budget": budget, "fine_tune_budget": ft_budget, "options": train_opts,
                             "val_curve": curve, "table": table, "notes": notes}
            save("prune" + args.tag, {"ratio": args.ratio, "results": results})


if __name__ == "__main__":
    main()
