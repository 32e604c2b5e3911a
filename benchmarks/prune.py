"""Structured pruning: half the channels removed, fine-tuned, against the full model.

    python benchmarks/prune.py [--tasks classify,detect,segment] [--ratio 0.5]

For each task a model is trained at cnnkit's defaults (digits: the default smallcnn; shapes
detection: fastdet for ``--det-minutes``; shapes segmentation: the U-Net for
``--seg-minutes``), pruned by ``cnnkit prune`` with the L1 and the Taylor criteria, and each
pruned model is fine-tuned by ``train --init`` (digits: the default epochs again; the others:
``--ft-minutes``); so is the full model (the control: a pruned model trained longer than the
original would otherwise look better for the extra training alone). Then ``cnnkit benchmark --variants`` times the full model and the fine-tuned
variants, eager and on ONNX Runtime, in interleaved rounds, and measures their metric on the
test (digits) or val split. Latency figures need the machine to themselves: run it alone.
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", default="classify,detect,segment")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--det-minutes", type=float, default=5.0)
    ap.add_argument("--seg-minutes", type=float, default=4.0)
    ap.add_argument("--ft-minutes", type=float, default=2.5, help="fine-tuning budget (detect, segment)")
    ap.add_argument("--runs", type=int, default=30, help="timed calls per model, format and batch size")
    args = ap.parse_args()
    import cnnkit
    from cnnkit.methods.benchmark import benchmark

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            spec = TASKS[task]
            budget = {"time": getattr(args, f"{spec['minutes']}_minutes")} if "minutes" in spec else {}
            ft_budget = {"time": args.ft_minutes} if "minutes" in spec else {}
            full = Path(tmp) / task / "full"
            t0 = time.perf_counter()
            cnnkit.train(task, data=spec["data"], out=str(full), verbose=False, **spec["train"], **budget)
            train_s = time.perf_counter() - t0
            # the control: the full model given the same fine-tuning (more training alone may help)
            control = Path(tmp) / task / "full-ft"
            cnnkit.train(task, data=spec["data"], init=str(full), out=str(control), verbose=False, **spec["train"],
                         **ft_budget)
            variants, notes = {"fp32 fine-tuned": str(control)}, {}
            for method in ("l1", "taylor"):
                report = cnnkit.prune(full, args.ratio, method=method, data=spec["data"],
                                      out=str(Path(tmp) / task / f"{method}.safetensors"), verbose=False)
                before_ft = cnnkit.val(task, report["file"], spec["data"], split=spec["split"], verbose=False)
                ft = Path(tmp) / task / f"{method}-ft"
                t0 = time.perf_counter()
                cnnkit.train(task, data=spec["data"], init=report["file"], out=str(ft), verbose=False,
                             **spec["train"], **ft_budget)
                variants[f"{method} {args.ratio:g}"] = str(ft)
                notes[method] = {"prune_report": report, "before_fine_tune": before_ft,
                                 "fine_tune_s": round(time.perf_counter() - t0, 1)}
            table = benchmark(full, spec["data"], batch=16, formats=("torch", "onnx"), runs=args.runs, warmup=3,
                              split=spec["split"], verbose=True, variants=variants)
            for method, note in notes.items():
                from cnnkit.methods.benchmark import METRIC

                key = METRIC[task]
                print(f"{task} {method}: before fine-tuning {key} {note['before_fine_tune'].get(key):.4f}")
            results[task] = {"data": spec["data"], "split": spec["split"], "train_s": round(train_s, 1),
                             "budget": budget, "fine_tune_budget": ft_budget, "table": table, "notes": notes}
    save("prune", {"ratio": args.ratio, "results": results})


if __name__ == "__main__":
    main()
