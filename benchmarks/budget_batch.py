"""Which batch a time budget wants (issue 19, part 1): ``--time M`` with each batch size.

    python benchmarks/budget_batch.py [--data opencv shapes] [--minutes 0.5 2] [--batches 8 16 32 64 auto] [--seed 0]

Each (data, budget, batch) trains ``cnnkit classify train --data D --time M --batch B`` with
every other option at its default (the learning rate too) and reports the test top-1 of the
best-on-val weights and the epochs the budget allowed. Data:
``opencv`` is OpenCV's 5,000 handwritten digits as a class folder (3,000 / 1,000 / 1,000,
``techniques.opencv_folder``; Debian opencv-doc via ``make bench-data``), ``shapes`` the
built-in shapes classification set (64 px). The question is whether a short budget is better
spent on more, smaller steps than the default batch takes, and from which budget on the default
wins: the answer decided that ``--time`` fits the batch. ``auto`` leaves ``--batch`` out, so the
rule in ``cnnkit/engine/budget.py`` picks it (the row names the batch it chose).

``--task detect --data shapes``: the built-in detection scenes as the README trains them
(``--classes 3 --max-objects 4``, fastdet, 400 train / 100 val / 100 test at 320 px); mAP50-95.

``--time`` counts wall-clock time, so run this alone on the machine: anything running beside it
cuts the epochs each budget allows and changes the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml
from _common import save

TASKS = {"classify": ({}, "top1"),  # task -> (options beside --data/--time/--batch, the metric reported)
         "detect": ({"classes": 3, "max_objects": 4, "model": "fastdet"}, "map50_95")}


def main() -> None:
    import cnnkit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", nargs="+", default=["opencv", "shapes"])
    ap.add_argument("--minutes", type=float, nargs="+", default=[0.5, 2.0])
    ap.add_argument("--batches", nargs="+", default=["8", "16", "32", "64", "auto"],
                    help="batch sizes; auto: --batch left out, the budget rule picks it")
    ap.add_argument("--task", choices=sorted(TASKS), default="classify",
                    help="detect: the built-in scenes as the README trains them (3 classes, 1-4 objects, fastdet)")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default); two runs "
                    "side by side with 1 thread each share a 2-core machine evenly")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    options, metric = TASKS[args.task]
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for data in args.data:
            source = data
            if data == "opencv":
                from techniques import opencv_folder

                source = opencv_folder(Path(d) / "opencv-digits")
            for minutes in args.minutes:
                for batch in args.batches:
                    out = Path(d) / f"{data}-{minutes}-{batch}"
                    t0 = time.perf_counter()
                    r = cnnkit.train(args.task, data=source, time=minutes, seed=args.seed, out=str(out),
                                     verbose=False, **options, **({} if batch == "auto" else {"batch": int(batch)}))
                    seconds = time.perf_counter() - t0
                    if batch == "auto":
                        chose = yaml.safe_load((out / "config.yaml").read_text())["batch"]
                        batch = f"auto ({chose})"
                    else:
                        batch = int(batch)
                    epochs = len((out / "metrics.csv").read_text().strip().splitlines()) - 1
                    test = r.test_metrics or r.metrics
                    row = {"task": args.task, "data": data, "minutes": minutes, "batch": batch,
                           f"test_{metric}": round(test[metric], 4), f"val_{metric}": round(r.metrics[metric], 4),
                           "epochs": epochs, "best_epoch": r.best_epoch, "seconds": round(seconds, 1)}
                    rows.append(row)
                    print(row, flush=True)
                    save("budget_batch" + args.tag, {"seed": args.seed, "rows": rows})


if __name__ == "__main__":
    main()
