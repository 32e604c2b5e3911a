"""cnnkit's fast detector versus Ultralytics YOLOv8n from scratch: same data, same CPU time.

    bash benchmarks/yolo_env.sh                 # once: Ultralytics in its own venv, benchmarks/.venv-yolo
    python benchmarks/detect_vs_yolo.py [--budget-min 7.5] [--threads 2] [--only yolo|cnnkit|both]
                                        [--train 200 --val 50] [--work DIR] [--data shapes|photo]

The data is ``shapes`` in YOLO format (``cnnkit convert shapes --to yolo``: 320 px, 1-4 objects of
3 classes), written once and read by both sides. ``--data photo`` (after ``make bench-data``) draws
the same objects on crops of OpenCV's sample photographs instead (``benchmarks/photo_scenes.py
--detection``; no occluders; train and val crops from different photographs); results then go to
``detect_vs_yolo_photo.json``. Each side trains for the same time budget with
its own clock (Ultralytics ``time=``, cnnkit ``--time``: both start after setup and count the
per-epoch validation), picks its best-on-val weights, and is scored on the val split with its
own mAP50 / mAP50-95 (COCO-style 101-point). Predict latency is the median wall-clock per image,
batch 1 at 320 px, one image file at a time (read, preprocess, model, NMS), after one warm-up.

Ultralytics never enters cnnkit's environment: ``_yolo_runner.py`` runs under
``benchmarks/.venv-yolo/bin/python`` (same torch pins), offline, with the same number of torch
threads as cnnkit (Ultralytics would otherwise drop to ``cpu_count - 1`` = 1 thread on 2 cores)
and ``--workers`` dataloader processes (default 0, as cnnkit's: on 2 cores and 2 threads, 0 and 2
workers tied within noise, 9.9 and 9.7 versus 8.4 and 9.8 images/s over one epoch, and 2 workers
oversubscribe the cores). The runner's docstring says how ``time=`` works. Without ``--work`` everything is written to a temp
folder under ``benchmarks/results/`` that is removed at the end; results go to
``benchmarks/results/detect_vs_yolo.json``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save

HERE = Path(__file__).resolve().parent
YOLO_PYTHON = HERE / ".venv-yolo" / "bin" / "python"
CNNKIT = [str(Path(sys.executable).with_name("cnnkit")) if Path(sys.executable).with_name("cnnkit").exists()
          else shutil.which("cnnkit") or "cnnkit"]
IMGSZ, BATCH, CLASSES, MAX_OBJECTS = 320, 16, 3, 4
COLUMNS = ("train_wall_s", "train_loop_s", "epochs", "images_per_s", "map50", "map50_95", "predict_ms")


def _run(cmd: list[str], threads: int) -> None:
    """Run a command with the thread count in its environment; its output goes to ours."""
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})


def make_data(root: Path, train: int, val: int, threads: int, kind: str = "shapes") -> Path:
    """The detection data (``shapes`` or ``photo``) in YOLO format under ``root`` (reused when
    already there)."""
    yaml_path = root / "data.yaml"
    if kind == "photo":
        from photo_scenes import write_photo_detection

        return write_photo_detection(root, IMGSZ, {"train": train, "val": val})
    if not yaml_path.exists():
        _run(CNNKIT + ["convert", "shapes", "--to", "yolo", "--out", str(root), "--imgsz", str(IMGSZ),
                       "--sizes", f"train={train},val={val}", "--max-objects", str(MAX_OBJECTS),
                       "--classes", str(CLASSES)], threads)
    return yaml_path


def yolo_side(data: Path, work: Path, budget_min: float, threads: int, workers: int) -> dict:
    """Ultralytics YOLOv8n from scratch in its own venv; the runner's JSON result."""
    if not YOLO_PYTHON.exists():
        raise SystemExit(f"{YOLO_PYTHON} not found: run `bash benchmarks/yolo_env.sh` first")
    out = work / "yolo.json"
    _run([str(YOLO_PYTHON), str(HERE / "_yolo_runner.py"), "--data", str(data), "--budget-min", str(budget_min),
          "--threads", str(threads), "--workers", str(workers), "--imgsz", str(IMGSZ), "--batch", str(BATCH),
          "--work", str(work / "yolo"), "--json", str(out)], threads)
    return json.loads(out.read_text())


def cnnkit_side(data: Path, work: Path, budget_min: float, threads: int) -> dict:
    """cnnkit's fast detector: train for the budget, val, then time predict through the Python API."""
    run, val_json = work / "cnnkit-run", work / "cnnkit-val.json"
    t0 = time.perf_counter()
    _run(CNNKIT + ["detect", "train", "--data", str(data), "--model", "fastdet", "--imgsz", str(IMGSZ),
                   "--batch", str(BATCH), "--time", str(budget_min), "--out", str(run)], threads)
    train_wall = time.perf_counter() - t0
    _run(CNNKIT + ["detect", "val", "--weights", str(run), "--data", str(data), "--split", "val",
                   "--json", str(val_json)], threads)
    metrics = json.loads(val_json.read_text())

    with open(run / "metrics.csv", newline="") as f:  # one row per epoch: train_time_s, images_per_s
        rows = list(csv.DictReader(f))
    loop_s = sum(float(r["train_time_s"]) for r in rows)
    images = sum(float(r["train_time_s"]) * float(r["images_per_s"]) for r in rows)

    import cnnkit

    images_val = sorted(p for p in (data.parent / "images" / "val").iterdir() if p.suffix == ".png")
    model = cnnkit.load(str(run))
    model.predict(str(images_val[0]))  # warm-up
    timing: dict[str, float] = {}
    wall = []
    for p in images_val:
        t = time.perf_counter()
        model.predict(str(p), timing=timing)
        wall.append((time.perf_counter() - t) * 1000)
    stages = {k.removesuffix("_ms"): round(timing[k] / len(images_val), 2)
              for k in ("preprocess_ms", "inference_ms", "postprocess_ms")}  # means, like Ultralytics' speed
    return {"model": "fastdet", "threads": torch.get_num_threads(), "budget_min": budget_min,
            "train_wall_s": round(train_wall, 1), "train_loop_s": round(loop_s, 1), "epochs": len(rows),
            "images_per_s": round(images / loop_s, 2) if loop_s else None,
            "map50": round(float(metrics["map50"]), 4), "map50_95": round(float(metrics["map50_95"]), 4),
            "val_images": len(images_val), "predict_ms": round(statistics.median(wall), 2),
            "predict_speed_ms": stages}


def table(rows: dict[str, dict]) -> str:
    head = f"{'':10}" + "".join(f"{c:>14}" for c in COLUMNS)
    lines = [head]
    for name, r in rows.items():
        lines.append(f"{name:10}" + "".join(f"{'-' if r.get(c) is None else r[c]:>14}" for c in COLUMNS))
    return "\n".join(lines)


def ratios(rows: dict[str, dict]) -> dict:
    if {"cnnkit", "yolo"} - rows.keys():
        return {}
    c, y = rows["cnnkit"], rows["yolo"]
    return {"map50_95_cnnkit_over_yolo": round(c["map50_95"] / y["map50_95"], 3) if y["map50_95"] else None,
            "latency_yolo_over_cnnkit": round(y["predict_ms"] / c["predict_ms"], 3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-min", type=float, default=7.5, help="training time budget per side, minutes")
    ap.add_argument("--threads", type=int, default=2, help="torch threads for both sides")
    ap.add_argument("--workers", type=int, default=0, help="Ultralytics dataloader processes")
    ap.add_argument("--only", choices=["yolo", "cnnkit", "both"], default="both")
    ap.add_argument("--work", help="keep data and runs here (default: a temp folder, removed at the end)")
    ap.add_argument("--train", type=int, default=200, help="train images")
    ap.add_argument("--val", type=int, default=50, help="val images")
    ap.add_argument("--data", choices=["shapes", "photo"], default="shapes",
                    help="the built-in scenes, or the same objects on photographs (benchmarks/photo_scenes.py)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = HERE / "results"
    results.mkdir(exist_ok=True)
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="detect_vs_yolo-", dir=results))
    work.mkdir(parents=True, exist_ok=True)
    rows: dict[str, dict] = {}
    try:
        data = make_data(work / "data", args.train, args.val, args.threads, args.data)
        if args.only in ("yolo", "both"):
            rows["yolo"] = yolo_side(data, work, args.budget_min, args.threads, args.workers)
            print(json.dumps({"yolo": rows["yolo"]}), flush=True)
        if args.only in ("cnnkit", "both"):
            rows["cnnkit"] = cnnkit_side(data, work, args.budget_min, args.threads)
            print(json.dumps({"cnnkit": rows["cnnkit"]}), flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    print(table(rows))
    r = ratios(rows)
    if r:
        print(f"mAP50-95 cnnkit/YOLO: {r['map50_95_cnnkit_over_yolo']} · "
              f"predict latency YOLO/cnnkit: {r['latency_yolo_over_cnnkit']}")
    save("detect_vs_yolo" + ("_photo" if args.data == "photo" else ""), {"data": {"name": args.data, "train": args.train, "val": args.val, "imgsz": IMGSZ,
                                     "classes": CLASSES, "max_objects": MAX_OBJECTS},
                            "budget_min": args.budget_min, "threads": args.threads, "batch": BATCH,
                            **rows, "ratios": r})


if __name__ == "__main__":
    main()
