"""Every detector on ``shapes`` through the CLI, and occlusion augmentation, measured.

    python benchmarks/detect_models.py models [--only fastdet,fasterrcnn,retinanet,ssd] [--time-min M]
    python benchmarks/detect_models.py occlusion [--time-min M]

``models``: each detector is trained by the command a user would type (printed as it runs),
``cnnkit detect train --data shapes --classes 3 --max-objects 4 --model NAME --time M``, on the
built-in scenes (400 train / 100 val at 320 px, overlaps and occluders); the table gives the
best-on-val mAP50 / mAP50-95 (pycocotools), the epochs that fit and the training time.
``--time`` is a wall-clock budget in minutes per model, validation included (default: 8 for
fastdet, 20 for the others).

``occlusion``: fastdet twice with the same budget, default augmentation with and without
``occlude=0.5`` (patches painted over half of the objects), scored per occlusion bucket of the
ground truth (share of each object hidden: 0, <30%, 30-60%, >60%).

Results go to ``benchmarks/results/detect_models.json`` / ``detect_occlusion.json``; run
folders to a temp folder that is removed, unless ``--work DIR``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
CNNKIT = str(Path(sys.executable).with_name("cnnkit")) if Path(sys.executable).with_name("cnnkit").exists() \
    else (shutil.which("cnnkit") or "cnnkit")
DATA = ["--data", "shapes", "--classes", "3", "--max-objects", "4"]
DEFAULT_MINUTES = {"fastdet": 8.0, "fasterrcnn": 20.0, "retinanet": 20.0, "ssd": 20.0, "ssdlite": 20.0}
DEFAULT_AUG = "flip,scale=0.7:1.3,translate=0.1,color=0.3"


def train(out: Path, model: str, minutes: float, threads: int, extra: list[str] = ()) -> dict:
    """One ``cnnkit detect train`` run; its results.json plus the command."""
    cmd = ["detect", "train", *DATA, "--model", model, "--time", f"{minutes:g}", *extra]
    shown = "cnnkit " + " ".join(cmd)
    print("+", shown, flush=True)
    subprocess.run([CNNKIT, *cmd, "--out", str(out)], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    res = json.loads((out / "results.json").read_text())
    return {"model": model, "command": shown, "map50": round(res["map50"], 4), "map50_95": round(res["map50_95"], 4),
            "epochs": res["epochs_run"], "best_epoch": res["best_epoch"], "train_time_s": res["train_time_s"],
            "occlusion_ap": res.get("occlusion_ap"), "size_ap": res.get("size_ap")}


def models(work: Path, names: list[str], minutes: float | None, threads: int) -> list[dict]:
    rows = []
    for name in names:
        rows.append(train(work / name, name, minutes or DEFAULT_MINUTES[name], threads))
        print(json.dumps({k: rows[-1][k] for k in ("model", "map50", "map50_95", "epochs", "train_time_s")}),
              flush=True)
    print(f"\n{'model':<12}{'mAP50':>8}{'mAP50-95':>10}{'epochs':>8}{'train s':>9}")
    for r in rows:
        print(f"{r['model']:<12}{r['map50']:>8.3f}{r['map50_95']:>10.3f}{r['epochs']:>8}{r['train_time_s']:>9.0f}")
    return rows


def occlusion(work: Path, minutes: float | None, threads: int) -> list[dict]:
    rows = []
    for name, aug in (("default", DEFAULT_AUG), ("occlude", DEFAULT_AUG + ",occlude=0.5")):
        r = train(work / name, "fastdet", minutes or DEFAULT_MINUTES["fastdet"], threads, ["--aug", aug])
        rows.append({"aug": name, **r})
    buckets = list(rows[0]["occlusion_ap"])
    print(f"\n{'aug':<10}{'mAP50-95':>10}" + "".join(f"{'AP ' + b:>12}" for b in buckets))
    for r in rows:
        print(f"{r['aug']:<10}{r['map50_95']:>10.3f}"
              + "".join(f"{r['occlusion_ap'][b]['map50_95']:>12.3f}" for b in buckets))
    print(f"{'objects':<20}" + "".join(f"{rows[0]['occlusion_ap'][b]['num_gt']:>12}" for b in buckets))
    return rows


def main() -> None:
    from _common import save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=["models", "occlusion"])
    ap.add_argument("--only", default="fastdet,fasterrcnn,retinanet,ssd", help="comma-separated detectors")
    ap.add_argument("--time-min", type=float, default=None, help="training budget per run, minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="keep the run folders here")
    args = ap.parse_args()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="detect_models-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.study == "models":
            rows = models(work, args.only.split(","), args.time_min, args.threads)
            save("detect_models", {"data": "shapes, 3 classes, 1-4 objects, 320 px, 400 train / 100 val",
                                   "threads": args.threads, "rows": rows})
        else:
            rows = occlusion(work, args.time_min, args.threads)
            save("detect_occlusion", {"data": "shapes, 3 classes, 1-4 objects, 320 px, 400 train / 100 val",
                                      "threads": args.threads, "rows": rows})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
