"""Every detector on ``shapes`` through the CLI, and occlusion augmentation, measured.

    python benchmarks/detect_models.py models [--only fastdet,fasterrcnn,retinanet,ssd] [--time-min M]
    python benchmarks/detect_models.py occlusion [--time-min M]
    python benchmarks/detect_models.py speed

``models``: each detector is trained by the command a user would type (printed as it runs),
``cnnkit detect train --data shapes --classes 3 --max-objects 4 --model NAME --time M``, on the
built-in scenes (400 train / 100 val at 320 px, overlaps and occluders); the table gives the
best-on-val mAP50 / mAP50-95 (pycocotools), the epochs that fit and the training time.
``--time`` is a wall-clock budget in minutes per model, validation included (default: 8 for
fastdet, 20 for the others).

``occlusion``: fastdet twice with the same budget, default augmentation with and without
``occlude=0.5`` (patches painted over half of the objects), scored per occlusion bucket of the
ground truth (share of each object hidden: 0, <30%, 30-60%, >60%); then the default model is
validated again with ``--nms soft`` on the val and test splits.

``speed``: training images/s of one optimizer step per detector (batch 8, 320 px, 2 threads),
and Faster R-CNN with torchvision's COCO sampling (2000 proposals, 512 RoIs per image) beside
cnnkit's (500, 128).

With ``--work DIR``, a run folder that already holds ``results.json`` is scored again rather
than retrained.

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
CNNKIT = [str(Path(sys.executable).with_name("cnnkit"))] if Path(sys.executable).with_name("cnnkit").exists() \
    else [sys.executable, "-m", "cnnkit"]
DATA = ["--data", "shapes", "--classes", "3", "--max-objects", "4"]
DEFAULT_MINUTES = {"fastdet": 8.0, "fasterrcnn": 20.0, "retinanet": 20.0, "ssd": 20.0, "ssdlite": 20.0}
DEFAULT_AUG = "flip,scale=0.7:1.3,translate=0.1,color=0.3"


def train(out: Path, model: str, minutes: float, threads: int, extra: list[str] = (),
          device: list[str] = ()) -> dict:
    """One ``cnnkit detect train`` run; its results.json plus the command. ``device`` holds
    options that place the run (``--device cuda --workers 4``), shown in the command too."""
    cmd = ["detect", "train", *DATA, "--model", model, "--time", f"{minutes:g}", *extra, *device]
    shown = "cnnkit " + " ".join(cmd)
    if (out / "results.json").exists():
        print("= reusing", out, flush=True)
    else:
        print("+", shown, flush=True)
        subprocess.run([*CNNKIT, *cmd, "--out", str(out)], check=True,
                       env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    res = json.loads((out / "results.json").read_text())
    test = res.get("test") or {}
    return {"model": model, "command": shown, "map50": round(res["map50"], 4), "map50_95": round(res["map50_95"], 4),
            "test_map50": test.get("map50"), "test_map50_95": test.get("map50_95"),
            "epochs": res["epochs_run"], "best_epoch": res["best_epoch"], "train_time_s": res["train_time_s"],
            "occlusion_ap": res.get("occlusion_ap"), "size_ap": res.get("size_ap")}


def val(run: Path, split: str, nms: str, threads: int) -> dict:
    """``cnnkit detect val`` of a run on the shapes split; its metrics."""
    out = run / f"val_{split}_{nms}.json"
    subprocess.run([*CNNKIT, "detect", "val", "--weights", str(run), "--data", "shapes", "--split", split,
                    "--nms", nms, "--json", str(out)], check=True, capture_output=True,
                   env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    m = json.loads(out.read_text())
    return {"split": split, "nms": nms, "map50": round(m["map50"], 4), "map50_95": round(m["map50_95"], 4),
            "occlusion_ap": {k: round(v["map50_95"], 4) for k, v in m["occlusion_ap"].items()}}


def models(work: Path, names: list[str], minutes: float | None, threads: int, device: list[str] = (),
           jobs: int = 1) -> list[dict]:
    """Train each detector (``jobs`` at a time: on a GPU the runs share it side by side)."""
    from concurrent.futures import ThreadPoolExecutor

    def one(name: str) -> dict:
        row = train(work / name, name, minutes or DEFAULT_MINUTES[name], threads, device=device)
        print(json.dumps({k: row[k] for k in ("model", "map50", "map50_95", "epochs", "train_time_s")}), flush=True)
        return row

    with ThreadPoolExecutor(max(1, jobs)) as pool:
        rows = list(pool.map(one, names))
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
    nms = [val(work / "default", split, method, threads) for method in ("hard", "soft") for split in ("val", "test")]
    print(f"\n{'nms':<6}{'split':<6}{'mAP50':>8}{'mAP50-95':>10}" + "".join(f"{'AP ' + b:>12}" for b in buckets))
    for r in nms:
        print(f"{r['nms']:<6}{r['split']:<6}{r['map50']:>8.3f}{r['map50_95']:>10.3f}"
              + "".join(f"{r['occlusion_ap'][b]:>12.3f}" for b in buckets))
    return rows + [{"aug": "default", "nms_comparison": nms}]


def speed(threads: int) -> list[dict]:
    """Training images/s of one step (batch 8, 320 px), after one warm-up step."""
    import time

    import torch

    from cnnkit.models.detection.zoo import build_detector

    torch.set_num_threads(threads)
    x = torch.rand(8, 3, 320, 320)
    targets = [{"boxes": torch.tensor([[10.0, 10, 80, 90], [100, 120, 200, 180]]), "labels": torch.tensor([0, 2])}] * 8
    rows = []
    for name, coco in (("fastdet", False), ("fasterrcnn", False), ("fasterrcnn", True), ("retinanet", False),
                       ("ssd", False), ("ssdlite", False)):
        model = build_detector(name, 3, 320).train()
        if coco:  # torchvision's defaults, sized for COCO at 800 px
            from torchvision.models.detection._utils import BalancedPositiveNegativeSampler

            model.net.roi_heads.fg_bg_sampler = BalancedPositiveNegativeSampler(512, 0.25)
            model.net.rpn._pre_nms_top_n = {"training": 2000, "testing": 1000}
            model.net.rpn._post_nms_top_n = {"training": 2000, "testing": 1000}
        opt = torch.optim.AdamW(model.parameters(), 1e-4)
        for step in range(4):
            if step == 1:
                t0 = time.perf_counter()
            out = model(x, targets)
            loss = out["loss"] if "loss" in out else sum(out.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        rows.append({"model": name + (" (torchvision COCO sampling)" if coco else ""),
                     "images_per_s": round(3 * len(x) / (time.perf_counter() - t0), 2)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    from _common import save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("study", choices=["models", "occlusion", "speed"])
    ap.add_argument("--only", default="fastdet,fasterrcnn,retinanet,ssd", help="comma-separated detectors")
    ap.add_argument("--time-min", type=float, default=None, help="training budget per run, minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", help="keep the run folders here")
    ap.add_argument("--device", default=None, help="models: --device of each run (e.g. cuda)")
    ap.add_argument("--workers", type=int, default=None, help="models: data-loading workers of each run")
    ap.add_argument("--jobs", type=int, default=1, help="models: runs at a time (several share one GPU)")
    args = ap.parse_args()
    work = Path(args.work).resolve() if args.work else Path(tempfile.mkdtemp(prefix="detect_models-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        if args.study == "models":
            device = (["--device", args.device] if args.device else []) + \
                (["--workers", str(args.workers)] if args.workers is not None else [])
            rows = models(work, args.only.split(","), args.time_min, args.threads, device, args.jobs)
            save("detect_models" + (f"_{args.device.split(':')[0]}" if args.device else ""),
                 {"data": "shapes, 3 classes, 1-4 objects, 320 px, 400 train / 100 val",
                  "threads": args.threads, "device": args.device or "cpu", "jobs": args.jobs, "rows": rows})
        elif args.study == "speed":
            save("detect_speed", {"threads": args.threads, "batch": 8, "imgsz": 320, "rows": speed(args.threads)})
        else:
            rows = occlusion(work, args.time_min, args.threads)
            save("detect_occlusion", {"data": "shapes, 3 classes, 1-4 objects, 320 px, 400 train / 100 val",
                                      "threads": args.threads, "rows": rows})
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
