"""Corruption benchmark: kernel speed against imagecorruptions, the 15 x 5 run's wall time on
1,000 `shapes` images, and the relative mCE of models trained with and without augmentation.

    python benchmarks/robustness.py [--epochs 15] [--speed-images 100] [--goal-images 1000] [--skip PARTS]

1. **Kernels.** The 15 ImageNet-C corruptions at severities 1-5 on ``--speed-images`` shapes
   images (64 px): cnnkit's batched tensor kernels (batch 64) against the `imagecorruptions`
   package (1.1.2, one image at a time, made importable by ``tests/reference_corruptions.py``'s
   shims; `make install` puts it in the venv). Milliseconds per image, per corruption.
2. **The goal run.** A shapes classifier trained with the defaults for ``--epochs``, then
   ``cnnkit classify robustness --corruptions imagenet-c --severities 1-5`` on 1,000 images of
   the train split (the val split has 400), timed end to end, with the PyTorch weights and with
   the model exported to ONNX.
3. **Augmentation.** Three classifiers trained alike but for ``--aug``: none, the shapes
   default (affine,flip) and the default plus photometric augmentations (noise, blur, colour
   jitter, gamma, shadow); each is evaluated on the val split under every corruption and the
   corruption errors are computed against the ``--aug none`` model (CE, mCE, relative mCE).
4. **Illumination.** The default classifier trained again with each ``--illumination`` mode
   (standardize, grayworld, equalize), all evaluated on the val split under the lighting
   corruptions (gamma, shadow, colour temperature, brightness, contrast, fog, frost).
5. **Illumination for detectors and segmenters** (part ``light-tasks``): the same four modes
   and lighting corruptions for fastdet on shapes scenes (160 px, 3 classes, up to 4 objects)
   and the default U-Net on shapes masks (64 px), each trained for ``--light-epochs``; mAP50-95
   and mIoU on the val split.

Run it alone: timings on 2 shared cores are off by 2-4x when anything else runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import save

LIGHTING = "illumination,brightness,contrast,fog,frost"
MODES = ("none", "standardize", "grayworld", "equalize")
LIGHT_TASKS = {"detect": {"classes": 3, "max_objects": 4, "imgsz": 160},  # fastdet, the detect default
               "segment": {"imgsz": 64}}  # the default U-Net
AUGS = {"none": "none", "default": "affine,flip",
        "default+photometric": "affine,flip,noise=0.05,blur=1.5,jitter=0.4,gamma=0.7:1.5,shadow=0.5"}


def kernel_speed(n: int) -> list[dict]:
    """ms per image of each ImageNet-C corruption (all five severities) for cnnkit and the reference."""
    from PIL import Image

    from cnnkit.data.shapes_classification import ShapesClassification
    from cnnkit.methods.corruptions import IMAGENET_C, corrupt

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from reference_corruptions import load

    ref = load()
    ds = ShapesClassification("train", size=n)
    images = torch.stack([ds[i][0] for i in range(n)])  # uint8 (n, 3, 64, 64)
    x = images.float() / 255
    arrays = images.permute(0, 2, 3, 1).numpy()
    rows = []
    for name in IMAGENET_C:
        corrupt(x[:8], name, 3, torch.Generator())  # first calls load libraries and pictures
        if ref is not None:
            getattr(ref, name)(Image.fromarray(arrays[0]) if name in ("pixelate", "jpeg_compression") else arrays[0], 3)
        t0 = time.perf_counter()
        for s in range(1, 6):
            g = torch.Generator().manual_seed(s)
            for i in range(0, n, 64):
                corrupt(x[i:i + 64], name, s, g)
        ours = (time.perf_counter() - t0) * 1e3 / (5 * n)
        row = {"corruption": name, "cnnkit_ms": round(ours, 3)}
        if ref is not None:
            f = getattr(ref, name)
            pil = name in ("pixelate", "jpeg_compression")
            t0 = time.perf_counter()
            for s in range(1, 6):
                np.random.seed(s)
                for a in arrays:
                    f(Image.fromarray(a) if pil else a, s)
            theirs = (time.perf_counter() - t0) * 1e3 / (5 * n)
            row.update(imagecorruptions_ms=round(theirs, 3), speedup=round(theirs / ours, 2))
        rows.append(row)
        print(f"{name:<18} cnnkit {ours:7.2f} ms/image" + (f"  imagecorruptions {row['imagecorruptions_ms']:8.2f}"
              f"  {row['speedup']:6.1f}x" if ref is not None else ""), flush=True)
    total = {"corruption": "all 15 x 5", "cnnkit_ms": round(sum(r["cnnkit_ms"] for r in rows), 2)}
    if ref is not None:
        total["imagecorruptions_ms"] = round(sum(r["imagecorruptions_ms"] for r in rows), 2)
        total["speedup"] = round(total["imagecorruptions_ms"] / total["cnnkit_ms"], 2)
    rows.append(total)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--speed-images", type=int, default=100)
    ap.add_argument("--goal-images", type=int, default=1000)
    ap.add_argument("--tag", default="", help="suffix of the results file (benchmarks/results/robustness{TAG}.json)")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: speed, goal, aug, illumination, "
                                               "light-tasks")
    ap.add_argument("--light-epochs", type=int, default=12, help="epochs of each detector and segmenter (part 5)")
    ap.add_argument("--resume", action="store_true",
                    help="part 5: keep the models already in benchmarks/results/robustness{TAG}.json and train the rest")
    args = ap.parse_args()
    import cnnkit
    from cnnkit.methods.corruptions import IMAGENET_C
    from cnnkit.methods.robustness import corruption_errors

    skip = set(filter(None, args.skip.split(",")))
    result: dict = {"epochs": args.epochs}
    if "speed" not in skip:
        print(f"== kernels on {args.speed_images} shapes images (64 px), severities 1-5", flush=True)
        result["kernels"] = kernel_speed(args.speed_images)
    with tempfile.TemporaryDirectory() as tmp:
        runs = {}
        for label, aug in AUGS.items():
            if (label != "default" and "aug" in skip) or not {"goal", "aug", "illumination"} - skip:
                continue
            runs[label] = Path(tmp) / label
            t0 = time.perf_counter()
            cnnkit.train("classify", data="shapes", epochs=args.epochs, aug=aug, out=str(runs[label]), verbose=False)
            print(f"trained --aug {aug} in {(time.perf_counter() - t0) / 60:.1f} min", flush=True)
        if "goal" not in skip:
            onnx = cnnkit.export(runs["default"], "onnx", out=str(Path(tmp) / "default.onnx"), verbose=False)["file"]
            result["goal"] = []
            for backend, weights in (("torch", runs["default"]), ("onnx", onnx)):
                t0 = time.perf_counter()
                r = cnnkit.robustness("classify", weights, "shapes", split="train", limit=args.goal_images,
                                      corruptions="imagenet-c", severities="1-5", out=str(Path(tmp) / "goal"),
                                      verbose=False)
                seconds = time.perf_counter() - t0
                result["goal"].append({"backend": backend, "images": r["images"], "seconds": round(seconds, 1),
                                       "evaluations": 1 + 15 * 5, "clean": r["clean"],
                                       "mean_imagenet_c": r["mean_imagenet_c"]})
                print(f"15 x 5 on {r['images']} images, {backend}: {seconds:.1f} s (clean top-1 {r['clean']:.4f}, "
                      f"mean under corruption {r['mean_imagenet_c']:.4f})", flush=True)
        if "aug" not in skip:
            tables = {}
            for label in AUGS:
                r = cnnkit.robustness("classify", runs[label], "shapes", split="val", corruptions="all",
                                      severities="1-5", out=str(Path(tmp) / label / "rob"), verbose=False)
                tables[label] = r
            base = tables["none"]
            rows = []
            for label, r in tables.items():
                errors = corruption_errors(r["clean"], r["corruptions"], base["clean"], base["corruptions"])
                ce = [errors[n]["ce"] for n in IMAGENET_C]
                rel = [errors[n]["relative_ce"] for n in IMAGENET_C]
                extra = {n: round(float(np.mean(r["corruptions"][n])), 4)
                         for n in ("occlusion", "gamma", "shadow", "colour_temperature")}
                row = {"aug": AUGS[label], "label": label, "clean": r["clean"], "mean_imagenet_c": r["mean_imagenet_c"],
                       "mce": round(float(np.mean(ce)), 4) if None not in ce else None,
                       "relative_mce": round(float(np.mean(rel)), 4) if None not in rel else None,
                       "per_corruption": {n: round(float(np.mean(r["corruptions"][n])), 4) for n in r["corruptions"]},
                       **extra}
                rows.append(row)
                print(f"{label:<20} clean {row['clean']:.4f}  under ImageNet-C {row['mean_imagenet_c']:.4f}  "
                      f"mCE {row['mce']:.3f}  relative mCE {row['relative_mce'] if row['relative_mce'] is None else round(row['relative_mce'], 3)}  "
                      + "  ".join(f"{k} {v:.3f}" for k, v in extra.items()), flush=True)
            result["augmentation"] = rows
        if "illumination" not in skip:
            lighting = LIGHTING
            rows = []
            for mode in MODES:
                run = runs["default"] if mode == "none" else Path(tmp) / f"light-{mode}"
                if mode != "none":
                    cnnkit.train("classify", data="shapes", epochs=args.epochs, illumination=mode, out=str(run),
                                 verbose=False)
                r = cnnkit.robustness("classify", run, "shapes", split="val", corruptions=lighting, severities="1-5",
                                      out=str(Path(tmp) / f"light-{mode}-rob"), verbose=False)
                row = {"illumination": mode, "clean": r["clean"], "mean": r["mean"],
                       **{n: round(float(np.mean(v)), 4) for n, v in r["corruptions"].items()}}
                rows.append(row)
                print(f"--illumination {mode:<12} clean {row['clean']:.4f}  mean under lighting {row['mean']:.4f}  "
                      + "  ".join(f"{n} {row[n]:.3f}" for n in r["corruptions"]), flush=True)
            result["illumination"] = rows
        if "light-tasks" not in skip:
            result["light_tasks"] = {}
            result["light_epochs"] = args.light_epochs
            done = {}
            previous = Path(__file__).parent / "results" / f"robustness{args.tag}.json"
            if args.resume and previous.exists():
                done = json.loads(previous.read_text()).get("light_tasks", {})
            for task, opts in LIGHT_TASKS.items():
                rows = []
                for mode in MODES:
                    kept = [row for row in done.get(task, []) if row["illumination"] == mode]
                    if kept:
                        rows.append(kept[0])
                        print(f"{task} --illumination {mode:<12} kept from {previous.name}", flush=True)
                        continue
                    run = Path(tmp) / f"{task}-light-{mode}"
                    t0 = time.perf_counter()
                    cnnkit.train(task, data="shapes", epochs=args.light_epochs, illumination=mode, out=str(run),
                                 verbose=False, **opts)
                    minutes = (time.perf_counter() - t0) / 60
                    r = cnnkit.robustness(task, run, "shapes", split="val", corruptions=LIGHTING, severities="1-5",
                                          out=str(Path(tmp) / f"{task}-light-{mode}-rob"), verbose=False)
                    row = {"illumination": mode, "metric": r.get("metric"), "clean": r["clean"], "mean": r["mean"],
                           "train_min": round(minutes, 1),
                           **{n: round(float(np.mean(v)), 4) for n, v in r["corruptions"].items()}}
                    rows.append(row)
                    print(f"{task} --illumination {mode:<12} clean {row['clean']:.4f}  mean under lighting "
                          f"{row['mean']:.4f}  " + "  ".join(f"{n} {row[n]:.3f}" for n in r["corruptions"]), flush=True)
                    result["light_tasks"][task] = rows
                    save(f"robustness{args.tag}", result)  # after every model: a long run keeps what it finished
                result["light_tasks"][task] = rows
    save(f"robustness{args.tag}", result)


if __name__ == "__main__":
    main()
