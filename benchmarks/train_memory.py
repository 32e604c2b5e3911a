"""CPU training with freed memory kept for the next step, against glibc's default, side by side.

    make bench-data                        # the photographs the segmentation set is cut from
    python benchmarks/train_memory.py [--tasks segment,detect,classify] [--epochs 3]

What it measures: :func:`cnnkit.utils.memory.keep_freed_memory`, which ``Trainer.fit`` wraps
around CPU training (glibc ``mallopt``: no fresh mappings, no trimming, so a step's freed
activations and gradients are reused instead of mapped and zeroed again by the kernel). Each task's
``cnnkit TASK train`` command runs twice at the same moment, 1 torch thread each on the 2 cores:
once as shipped and once with ``CNNKIT_KEEP_FREED_MEMORY=0`` (glibc's defaults, what a plain
PyTorch loop gets). Reported per run: training images/s (metrics.csv, the first epoch left out),
minor page faults and peak resident memory of the whole process (``wait4``), and the val metric,
which must be the same in both (the setting changes where memory comes from, not any number).

- segment: the U-Net (resnet18) at batch 16 on the shapes-on-photographs set of
  benchmarks/photo_scenes.py (300 train images, 128 px).
- detect: fastdet on the built-in ``shapes`` scenes at its defaults.
- classify: the built-in ``digits`` at its defaults (16 px, small tensors).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METRIC = {"segment": "miou", "detect": "map50_95", "classify": "top1"}


def command(task: str, data: str, epochs: int) -> list[str]:
    extra = {"segment": ["--batch", "16"], "detect": [], "classify": []}[task]
    return [task, "train", "--data", data, "--epochs", str(epochs), "--seed", "0", "--workers", "0", *extra]


def start(cmd: list[str], out: Path, keep: bool) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("cnnkit")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CNNKIT_KEEP_FREED_MEMORY": "1" if keep else "0"}
    return subprocess.Popen([str(exe), *cmd, "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, out: Path, task: str) -> dict:
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"cnnkit {task} train failed: {proc.stderr.read()[-2000:]}")
    run = next(out.glob("**/metrics.csv")).parent
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    ips = [float(r["images_per_s"]) for r in rows[1:] or rows]
    metric = json.loads((run / "results.json").read_text())[METRIC[task]]
    return {"images_per_s": round(sum(ips) / len(ips), 3), "minor_faults": usage.ru_minflt,
            "peak_rss_mb": usage.ru_maxrss // 1024, METRIC[task]: metric}


def main() -> None:
    from _common import save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", default="segment,detect,classify")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--tag", default="")
    args = ap.parse_args()
    result: dict = {"epochs": args.epochs, "threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            data = {"detect": "shapes", "classify": "digits"}.get(task)
            if task == "segment":
                from photo_scenes import write_photo_scenes

                data = str(write_photo_scenes(Path(tmp) / "photo_scenes", seed=0))
            cmd = command(task, data, args.epochs)
            print("+ cnnkit " + " ".join(cmd), flush=True)
            outs = {side: Path(tmp) / f"{task}_{side}" for side in ("keep", "default")}
            procs = {side: start(cmd, outs[side], side == "keep") for side in outs}
            rows = {side: finish(procs[side], outs[side], task) for side in outs}
            rows["speed_up"] = round(rows["keep"]["images_per_s"] / rows["default"]["images_per_s"], 3)
            rows["fault_ratio"] = round(rows["default"]["minor_faults"] / max(1, rows["keep"]["minor_faults"]), 1)
            rows["same_metric"] = rows["keep"][METRIC[task]] == rows["default"][METRIC[task]]
            result[task] = {"command": "cnnkit " + " ".join(cmd), **rows}
            print(json.dumps(result[task]), flush=True)
    print(f"\n{'task':<10}{'images/s kept':>15}{'default':>10}{'speed-up':>10}{'faults kept':>13}{'default':>12}"
          f"{'peak MB kept':>14}{'default':>9}  same metric")
    for task in args.tasks.split(","):
        r = result[task]
        k, d = r["keep"], r["default"]
        print(f"{task:<10}{k['images_per_s']:>15.2f}{d['images_per_s']:>10.2f}{r['speed_up']:>10.3f}"
              f"{k['minor_faults']:>13,}{d['minor_faults']:>12,}{k['peak_rss_mb']:>14}{d['peak_rss_mb']:>9}  "
              f"{r['same_metric']}")
    save("train_memory" + (f"_{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
