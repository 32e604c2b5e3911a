"""cnnkit's U-Net vs segmentation_models_pytorch's U-Net: same encoder, data, time budget.

    pip install -c constraints.txt segmentation-models-pytorch     # the peer; a benchmark-only dependency
    python benchmarks/segment_vs_smp.py [--minutes 10] [--encoder resnet18] [--threads 1] [--parallel]
    python benchmarks/segment_vs_smp.py --epochs 60 --device cuda --workers 2     # fixed epochs instead of time
    python benchmarks/segment_vs_smp.py --data photo --minutes 9 --parallel        # shapes on real photographs
    python benchmarks/segment_vs_smp.py --data photo --peer-recipe plain ...       # the peer's own plain loop

cnnkit: the command a user types, ``cnnkit segment train --data shapes --encoder E --time M``
(built-in shapes scenes: 600 train / 150 val at 128 px, background + 4 shape classes; its
defaults: CE + Dice, AdamW 1e-3, 1 warmup epoch then cosine stretched to the budget, horizontal
and vertical flips, batch 16, best epoch on val; before issue 19, AdamW 3e-3 and flip + affine +
colour augmentation, which ``--lr 3e-3 --aug flip,affine,color=0.2`` gives back). Options after
the script's own go to the cnnkit command.

``--data photo``: the same objects drawn on crops of OpenCV's sample photographs, 300 train / 60
val at 128 px, train and val from different photographs (benchmarks/photo_scenes.py; cnnkit gets
``--data <its data.yaml>`` and its data-derived defaults).

Peer: ``smp.Unet(E, encoder_weights=None, classes=5)`` trained by a plain PyTorch loop, by default
(``--peer-recipe cnnkit``) with the same recipe: the same data loader (cnnkit's dataset and augmentation, so the data pipeline is not
what differs), ``smp.losses.DiceLoss("multiclass")`` + cross-entropy, AdamW at cnnkit's default rate, the same
warmup + cosine schedule stretched to the budget after the first epoch, validation after
every epoch inside the budget and the best epoch kept. Both are scored on the val split by
the same code (mIoU over the 5 classes at 128 px, cnnkit.tasks.segment.task.SegMetrics).
``--peer-recipe plain`` trains the peer as a user would by hand: CE + Dice, AdamW 1e-3 at a
constant rate, horizontal and vertical flips only, batch 16.

Throughput: training images/s, validation excluded (cnnkit: the mean of metrics.csv's
``images_per_s``; peer: images over the seconds spent in training steps). The two runs go one
after the other with the same number of torch threads, or with ``--parallel`` side by side
(1 thread each on a 2-core machine: the same conditions for both, in half the time).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def start_cnnkit(work: Path, args, extra: list[str]):
    """``cnnkit segment train`` as a user types it, started in the background."""
    exe = Path(sys.executable).with_name("cnnkit")
    budget = ["--epochs", str(args.epochs)] if args.epochs else ["--time", f"{args.minutes:g}"]
    cmd = ["segment", "train", "--data", args.data_spec, "--encoder", args.encoder, *budget, "--seed", str(args.seed),
           "--device", args.device, "--workers", str(args.workers), *extra]
    print("+ cnnkit " + " ".join(cmd), flush=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    proc = subprocess.Popen([str(exe) if exe.exists() else sys.executable, *([] if exe.exists() else ["-m", "cnnkit"]),
                             *cmd, "--out", str(work / "cnnkit")], env=env, stdout=subprocess.DEVNULL)
    return proc, cmd


def finish_cnnkit(work: Path, proc, cmd: list[str]) -> dict:
    if proc.wait() != 0:
        raise SystemExit("cnnkit segment train failed")
    out = work / "cnnkit"
    res = json.loads((out / "results.json").read_text())
    import csv

    rows = list(csv.DictReader((out / "metrics.csv").open()))
    ips = [float(r["images_per_s"]) for r in rows if r.get("images_per_s")]
    return {"miou": round(res["miou"], 4), "dice": round(res["dice"], 4), "epochs": res["epochs_run"],
            "best_epoch": res["best_epoch"], "train_images_per_s": round(sum(ips) / len(ips), 2),
            "train_time_s": res["train_time_s"], "stop_reason": res.get("stop_reason", ""),
            "command": "cnnkit " + " ".join(cmd),
            "curve": [round(float(r["miou"]), 4) for r in rows if r.get("miou")],
            "train_loss": [round(float(r["train_loss"]), 4) for r in rows if r.get("train_loss")],
            "derived": [ln.strip() for ln in (out / "config.yaml").read_text().splitlines() if "derived" in ln]}


def run_smp(minutes: float, encoder: str, threads: int, seed: int, epochs: int = 0, device: str = "cpu",
            workers: int = 0, log=print, data_spec: str = "shapes", recipe: str = "cnnkit") -> dict:
    import segmentation_models_pytorch as smp

    from cnnkit.data.classification import make_loader
    from cnnkit.data.segmentation import (
        SegmentationDataset,
        load_segmentation_data,
        shapes_segmentation,
    )
    from cnnkit.tasks.segment.config import SegmentConfig
    from cnnkit.tasks.segment.spec import DEFAULT_AUG, parse_seg_aug
    from cnnkit.tasks.segment.task import SegmentTask, SegMetrics

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    data = shapes_segmentation(128, seed=seed) if data_spec == "shapes" else load_segmentation_data(data_spec)
    k = len(data.names)
    task = SegmentTask(data.names)
    aug = parse_seg_aug(DEFAULT_AUG if recipe == "cnnkit" else "flip,vflip", 128)
    train_ds = SegmentationDataset(data.split("train"), 128, k, aug)
    val_ds = SegmentationDataset(data.split("val"), 128, k, train=False)
    dev = torch.device(device)
    train_dl = make_loader(train_ds, 16, True, workers, task.collate, torch.Generator().manual_seed(seed),
                           drop_last=True)
    val_dl = make_loader(val_ds, 32, False, workers, task.collate)
    model = smp.Unet(encoder, encoder_weights=None, classes=k).to(dev, memory_format=torch.channels_last)
    mean = torch.tensor([0.485, 0.456, 0.406], device=dev).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], device=dev).view(1, 3, 1, 1)
    dice = smp.losses.DiceLoss("multiclass", ignore_index=255)
    opt = torch.optim.AdamW(model.parameters(), SegmentConfig.DEFAULT_LR if recipe == "cnnkit" else 1e-3,
                            weight_decay=0.01)
    steps_per_epoch = len(train_dl)
    total = [(epochs or 30) * steps_per_epoch]  # with a time budget: replaced after each epoch by what fits

    def lr_at(step: int) -> float:
        if recipe == "plain":
            return 1.0
        warm = steps_per_epoch
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total[0] - warm))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    budget, used, train_s, images, step, epoch, best = minutes * 60, 0.0, 0.0, 0, 0, 0, 0.0
    curve, losses = [], []
    while (epoch < epochs) if epochs else (used < budget):
        t0 = time.perf_counter()
        model.train()
        for b in train_dl:
            x = ((b["images"].to(dev).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
            y = b["masks"].to(dev)
            out = model(x)
            loss = F.cross_entropy(out, y, ignore_index=255) + dice(out, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if dev.type == "cuda":
                torch.cuda.synchronize()
            step += 1
            images += len(y)
        train_s += time.perf_counter() - t0
        model.eval()
        state = SegMetrics(data.names)
        with torch.no_grad():
            for b in val_dl:
                x = ((b["images"].to(dev).float() / 255 - mean) / std).contiguous(memory_format=torch.channels_last)
                state.update(model(x).cpu(), b)
        miou = state.compute()["miou"]
        best = max(best, miou)
        curve.append(round(miou, 4))
        losses.append(round(loss.item(), 4))  # the epoch's last step
        epoch += 1
        used += time.perf_counter() - t0
        fit = epochs or max(epoch, int(budget / (used / epoch)))
        total[0] = fit * steps_per_epoch
        log(f"smp epoch {epoch}/{fit}  loss {loss.item():.4f}  val mIoU {miou:.4f}")
        if epoch >= fit:
            break
    return {"miou": round(best, 4), "epochs": epoch, "train_images_per_s": round(images / train_s, 2),
            "train_time_s": round(used, 1), "smp": smp.__version__, "recipe": recipe, "curve": curve,
            "train_loss": losses}


def main() -> None:
    from _common import save

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--epochs", type=int, default=0, help="train this many epochs instead of --minutes")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workers", type=int, default=0, help="data-loader workers of each side")
    ap.add_argument("--encoder", default="resnet18")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--parallel", action="store_true", help="run both sides at once (1 thread each on 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--data", choices=["shapes", "photo"], default="shapes",
                    help="the built-in scenes, or the shapes on photographs of benchmarks/photo_scenes.py")
    ap.add_argument("--peer-recipe", choices=["cnnkit", "plain"], default="cnnkit",
                    help="the peer's loop: cnnkit's recipe, or a plain one (AdamW 1e-3 constant, flips)")
    ap.add_argument("--only", choices=["cnnkit", "smp"], default=None, help="run one side only")
    ap.add_argument("--tag", default="", help="suffix of the results file name")
    ap.add_argument("--out", default=None, help="keep cnnkit's run folder here (default: a temporary one)")
    args, extra = ap.parse_known_args()
    torch.set_num_threads(args.threads)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = args.out or tmp
        args.data_spec = "shapes"
        if args.data == "photo":
            from photo_scenes import write_photo_scenes

            args.data_spec = str(write_photo_scenes(Path(tmp) / "photo_scenes", seed=args.seed))
        proc = None
        if args.only in (None, "cnnkit"):
            proc, cmd = start_cnnkit(Path(work), args, extra)
            if not args.parallel:
                rows["cnnkit"] = finish_cnnkit(Path(work), proc, cmd)
                proc = None
        if args.only in (None, "smp"):
            rows["smp"] = run_smp(args.minutes, args.encoder, args.threads, args.seed, args.epochs, args.device,
                                  args.workers, log=lambda m: print(m, flush=True), data_spec=args.data_spec,
                                  recipe=args.peer_recipe)
            print(json.dumps(rows["smp"]), flush=True)
        if proc is not None:
            rows["cnnkit"] = finish_cnnkit(Path(work), proc, cmd)
        if "cnnkit" in rows:
            print(json.dumps(rows["cnnkit"]), flush=True)
    result = {"data": args.data, "peer_recipe": args.peer_recipe, "minutes": args.minutes, "epochs": args.epochs,
              "device": args.device, "encoder": args.encoder,
              "threads": args.threads, "parallel": args.parallel, "cnnkit_args": extra, **rows}
    if len(rows) == 2:
        result["ratio_miou"] = round(rows["cnnkit"]["miou"] / max(1e-9, rows["smp"]["miou"]), 3)
        result["ratio_throughput"] = round(rows["cnnkit"]["train_images_per_s"] / rows["smp"]["train_images_per_s"], 3)
        print(f"\nmIoU cnnkit/smp {result['ratio_miou']}  training images/s cnnkit/smp {result['ratio_throughput']}")
    save("segment_vs_smp" + (f"_{args.tag}" if args.tag else ""), result)


if __name__ == "__main__":
    main()
