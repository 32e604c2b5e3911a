"""The Ultralytics side of ``detect_vs_yolo.py``; runs under ``benchmarks/.venv-yolo/bin/python``.

    .venv-yolo/bin/python benchmarks/_yolo_runner.py --data DIR/data.yaml --budget-min 7.5 \\
        --threads 2 --work WORK --json OUT.json

Trains YOLOv8n from scratch (``YOLO("yolov8n.yaml")``, ``pretrained=False``, ``amp=False``,
imgsz 320, batch 16, CPU) for a time budget, validates the resulting weights on the val split,
times ``predict`` image by image, and prints one JSON line (also written to ``--json``).

How Ultralytics' ``time=`` works (``ultralytics/engine/trainer.py``, checked in 8.4.190):

- ``time`` is in hours and overrides ``epochs``. The clock (``train_time_start``) starts after the
  model, optimizer and dataloaders are built, so the label scan (``labels/<split>.cache``) is
  not counted; the per-epoch validation (``val=True``) is.
- After every optimizer step it checks ``elapsed > time``; when over, it stops mid-epoch, still
  validates that partial epoch and saves it. After each epoch it re-estimates
  ``epochs = ceil(time / mean epoch time)`` and rebuilds the LR scheduler for that count, so the
  cosine/linear decay and ``close_mosaic`` (last 10 epochs without mosaic) fit the budget; it
  also stops when ``epoch >= epochs``. The first epoch's schedule assumes the default 100
  epochs (warmup is 3 epochs throughout).
- After the loop, ``final_eval`` validates ``best.pt`` again (not counted in the budget), and
  ``YOLO.train`` reloads ``best.pt`` (best fitness = 0.1 mAP50 + 0.9 mAP50-95 on the val split),
  which is what ``val()`` and the predict timing below use.

Fairness and offline details handled here:

- Threads: ``import ultralytics`` sets ``OMP_NUM_THREADS=1`` when unset, and ``select_device``
  (called by the trainer, the standalone validator and the predictor) calls
  ``torch.set_num_threads(NUM_THREADS)`` with ``NUM_THREADS = min(8, cpu_count - 1)``: one
  thread on a 2-core machine, whatever you set before. So we set ``OMP_NUM_THREADS`` ourselves
  and point ``ultralytics.utils.torch_utils.NUM_THREADS`` at ``--threads``; the thread count seen
  during training and predict is reported (``threads_seen``) to prove it held.
- Dataloader workers: Ultralytics uses ``min(cpu_count, workers, batches)`` worker processes
  (default ``workers=8``, so 2 on this machine); ``--workers`` sets it (default 0: on 2 cores
  with 2 torch threads, 0 and 2 workers measured the same within noise).
- Offline: ``YOLO_OFFLINE=1`` (no online check, no analytics events), ``YOLO_AUTOINSTALL=0``
  (no pip calls), and ``YOLO_CONFIG_DIR`` in ``--work`` with matplotlib's DejaVuSans.ttf as
  ``Ultralytics/Arial.ttf`` (``check_font`` would download Arial otherwise). An audit hook
  records every attempted internet connection or DNS look-up (``network_attempts``).
- Outputs go under ``--work``; Ultralytics also writes ``labels/train.cache`` and
  ``labels/val.cache`` next to the dataset's label folders.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

NETWORK: list[str] = []


def _audit(event: str, args: tuple) -> None:
    if event == "socket.connect" and isinstance(args[1], tuple):  # (host, port): not a local AF_UNIX socket
        NETWORK.append(f"connect {args[1][:2]}")
    elif event == "socket.getaddrinfo":
        NETWORK.append(f"getaddrinfo {args[0]}")


def offline_env(work: Path, threads: int) -> None:
    """Environment Ultralytics reads at import: offline, no auto-install, config in ``work``."""
    import matplotlib

    cfg = work / "yolo-config"
    font = cfg / "Ultralytics" / "Arial.ttf"
    font.parent.mkdir(parents=True, exist_ok=True)
    if not font.exists():
        shutil.copy(Path(matplotlib.get_data_path()) / "fonts" / "ttf" / "DejaVuSans.ttf", font)
    os.environ.update(YOLO_OFFLINE="1", YOLO_AUTOINSTALL="0", YOLO_CONFIG_DIR=str(cfg),
                      OMP_NUM_THREADS=str(threads))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="Ultralytics data.yaml")
    ap.add_argument("--budget-min", type=float, default=7.5, help="training time budget in minutes")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workers", type=int, default=0, help="dataloader worker processes")
    ap.add_argument("--imgsz", type=int, default=320)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work", required=True, help="folder for config, runs and weights")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args()
    work = Path(args.work).resolve()
    data = str(Path(args.data).resolve())

    sys.addaudithook(_audit)
    offline_env(work, args.threads)
    import torch

    import ultralytics
    import ultralytics.utils.torch_utils as tu
    from ultralytics import YOLO, settings

    settings.update({"sync": False})  # the settings file lives in our own YOLO_CONFIG_DIR
    tu.NUM_THREADS = args.threads  # select_device() resets torch threads to this (see docstring)
    torch.set_num_threads(args.threads)

    threads_seen: set[int] = set()
    count = {"images": 0, "loop_s": 0.0, "batches": 0, "t0": 0.0, "epochs": 0}

    def epoch_start(trainer) -> None:
        threads_seen.add(torch.get_num_threads())
        count["batches"], count["t0"] = 0, time.perf_counter()

    def batch_end(trainer) -> None:
        count["batches"] += 1

    def epoch_end(trainer) -> None:  # also runs for the epoch that the time budget cut short
        count["loop_s"] += time.perf_counter() - count["t0"]
        n, nb = len(trainer.train_loader.dataset), len(trainer.train_loader)
        count["images"] += n if count["batches"] == nb else min(n, count["batches"] * trainer.batch_size)
        count["epochs"] += 1

    model = YOLO("yolov8n.yaml")
    for event, fn in (("on_train_epoch_start", epoch_start), ("on_train_batch_end", batch_end),
                      ("on_train_epoch_end", epoch_end)):
        model.add_callback(event, fn)
    t0 = time.perf_counter()
    model.train(data=data, imgsz=args.imgsz, batch=args.batch, time=args.budget_min / 60, amp=False,
                device="cpu", workers=args.workers, pretrained=False, plots=False, val=True, seed=args.seed,
                project=str(work / "runs"), name="train", exist_ok=True)
    wall_train = time.perf_counter() - t0
    trainer = model.trainer
    train_s = trainer.epoch_time_start - trainer.train_time_start  # the time= clock at the last epoch's end

    m = model.val(data=data, split="val", imgsz=args.imgsz, batch=args.batch, device="cpu", plots=False,
                  project=str(work / "runs"), name="val", exist_ok=True, verbose=False)

    images = sorted(p for p in Path(trainer.data["val"]).iterdir()
                    if p.suffix.lower() in {".png", ".jpg", ".jpeg", ".bmp"})
    model.predict(str(images[0]), imgsz=args.imgsz, device="cpu", verbose=False)  # build predictor, warm up
    threads_seen.add(torch.get_num_threads())
    wall, speed = [], {"preprocess": [], "inference": [], "postprocess": []}
    for p in images:
        t = time.perf_counter()
        r = model.predict(str(p), imgsz=args.imgsz, device="cpu", verbose=False)[0]
        wall.append((time.perf_counter() - t) * 1000)
        for k in speed:
            speed[k].append(r.speed[k])

    out = {
        "peer": "ultralytics", "ultralytics": ultralytics.__version__, "torch": torch.__version__,
        "model": "yolov8n.yaml (scratch)", "imgsz": args.imgsz, "batch": args.batch,
        "threads": args.threads, "threads_seen": sorted(threads_seen), "workers": args.workers,
        "budget_min": args.budget_min, "train_images": len(trainer.train_loader.dataset),
        "train_s": round(train_s, 1), "train_loop_s": round(count["loop_s"], 1),
        "train_wall_s": round(wall_train, 1), "epochs": count["epochs"],
        "epochs_float": round(count["images"] / len(trainer.train_loader.dataset), 2),
        "images_per_s": round(count["images"] / count["loop_s"], 2) if count["loop_s"] else None,
        "map50": round(float(m.box.map50), 4), "map50_95": round(float(m.box.map), 4),
        "val_images": len(images),
        "predict_ms": round(statistics.median(wall), 2),
        "predict_speed_ms": {k: round(statistics.median(v), 2) for k, v in speed.items()},
        "weights": str(trainer.best if trainer.best.exists() else trainer.last),
        "network_attempts": sorted(set(NETWORK)),
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
