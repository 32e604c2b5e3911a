"""Classification techniques, measured: class imbalance, label noise, transfer learning.

    python benchmarks/techniques.py imbalance   # long-tailed digits (last class at 5%)
    python benchmarks/techniques.py noise       # 40% symmetric label noise on digits
    python benchmarks/techniques.py transfer    # shapes-pretrained vs scratch on 20 images/class
    python benchmarks/techniques.py missing     # accuracy vs missing share: zero-fill vs mask channel
    python benchmarks/techniques.py all

Every run is a normal ``cnnkit.train("classify", ...)`` call; figures are test-split metrics of
the best-on-val weights. Results go to ``benchmarks/results/techniques_<name>.json``.

``--data opencv`` runs every study on a second dataset of another kind:
OpenCV's 5,000 handwritten 20x20 digits (Debian ``opencv-doc``, ``make bench-data``), written
as a class-folder ImageFolder (3,000 train, 1,000 val, 1,000 test, stratified), trained at the
defaults cnnkit derives for a folder; results go to ``techniques_<name>_opencv.json``. Its
transfer study pretrains on digits 0-4 and fine-tunes on 5-9 (:func:`transfer_opencv`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

RESULTS = Path(__file__).resolve().parent / "results"


def _train(out: Path, **kw) -> dict:
    import cnnkit

    t0 = time.perf_counter()
    r = cnnkit.train("classify", out=str(out), verbose=False, **kw)
    test = r.test_metrics or r.metrics
    return {"test": test, "seconds": round(time.perf_counter() - t0, 1)}


def opencv_folder(root: Path, seed: int = 1) -> str:
    """OpenCV's digits as ``root/{train,val,test}/DIGIT/*.png`` (3,000 / 1,000 / 1,000, stratified)."""
    from digits_vs_svc import opencv_digits, write_class_folders

    images, y, _ = opencv_digits()
    rng = np.random.default_rng(seed)
    splits = {"train": [], "val": [], "test": []}
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(y == c))
        splits["train"] += idx[:300].tolist()
        splits["val"] += idx[300:400].tolist()
        splits["test"] += idx[400:].tolist()
    write_class_folders(root, images, y, splits)
    return str(root)


DATA = {"data": "digits", "tag": ""}  # --data opencv: the folder (main)


def minority_recall(metrics: dict, classes: list[str]) -> float:
    return float(np.mean([metrics["per_class"][c]["recall"] for c in classes]))


# ---- imbalance -------------------------------------------------------------------------------
IMBALANCE_STRATEGIES = ("none", "weighted-sampler", "oversample", "class-weights", "class-balanced",
                        "focal", "ohem", "smote")


def imbalance(epochs: int = 20, ratio: float = 0.05, seeds=(0,), strategies=IMBALANCE_STRATEGIES) -> dict:
    """Long-tailed digits: class k keeps ratio**(k/9) of its train images; val and test stay balanced."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for s in strategies:
                r = _train(Path(tmp) / f"{s}-{seed}", data=DATA["data"], epochs=epochs, seed=seed,
                           imbalance_ratio=ratio, imbalance=None if s == "none" else s)
                t = r["test"]
                rows.append({"strategy": s, "seed": seed, "top1": t["top1"],
                             "balanced_accuracy": t["balanced_accuracy"], "macro_f1": t["macro_f1"],
                             "minority_recall": minority_recall(t, ["7", "8", "9"]),
                             "recall_9": t["per_class"]["9"]["recall"], "seconds": r["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    return {"epochs": epochs, "ratio": ratio, "rows": rows}


# ---- label noise -----------------------------------------------------------------------------
def noise(epochs: int = 20, p: float = 0.4, seeds=(0,), losses=("ce", "sce", "gce")) -> dict:
    """Symmetric noise in train and val labels; the test split stays clean."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            for loss in losses:
                r = _train(Path(tmp) / f"{loss}-{seed}", data=DATA["data"], epochs=epochs, seed=seed,
                           label_noise=p, loss=loss, label_smoothing=0.0)
                rows.append({"loss": loss, "seed": seed, "clean_test_top1": r["test"]["top1"],
                             "seconds": r["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    return {"epochs": epochs, "noise": p, "rows": rows}


# ---- transfer learning -----------------------------------------------------------------------
def write_shapes_folder(root: Path, classes: list[int], per_class: dict[str, int], seed: int, imgsz: int = 64) -> Path:
    """An ImageFolder of ``shapes`` renders for a subset of the shape classes (one large shape,
    light clutter and occlusion: easier than the built-in ``shapes`` classification set)."""
    from PIL import Image

    from cnnkit.data.shapes import SHAPE_CLASSES, SceneParams, sample_scene

    params = SceneParams(imgsz=imgsz, size_range=(0.5, 0.85), clutter=0.2, occlusion=0.1, max_occlusion=0.3,
                         lighting=0.3, noise=0.02)
    for si, (split, n) in enumerate(per_class.items()):
        for c in classes:
            d = root / split / SHAPE_CLASSES[c]
            d.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, si, c, i])
                Image.fromarray(sample_scene(params, rng, classes=[c]).image).save(d / f"{i}.png")
    return root


SHAPES_AUG = "crop=0.6,flip"  # shapes folders: flips keep the labels


def transfer(pre_epochs: int = 10, ft_epochs: int = 15, shots: int = 20, seeds=(0,), imgsz: int = 32) -> dict:
    """Pretrain smallcnn on shapes classes 0-3 (200 images each, 32 px), fine-tune on classes 4-7
    with ``shots`` images per class (batch 16); compare with the same net from scratch at equal
    epochs and settings. Augmentation ``crop=0.6,flip`` (the folder default when the figures were
    measured; a mirrored shape is the same shape, so flips keep these labels)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        src = write_shapes_folder(tmp / "source", [0, 1, 2, 3], {"train": 200, "val": 25}, seed=1, imgsz=imgsz)
        pre = _train(tmp / "pre", data=str(src), epochs=pre_epochs, imgsz=imgsz, aug=SHAPES_AUG)
        print(json.dumps({"pretrain_val_top1": pre["test"]["top1"], "seconds": pre["seconds"]}), flush=True)
        for seed in seeds:
            tgt = write_shapes_folder(tmp / f"target{seed}", [4, 5, 6, 7],
                                      {"train": shots, "val": 20, "test": 100}, seed=100 + seed, imgsz=imgsz)
            for mode, kw in (("scratch", {}), ("finetune", {"init": str(tmp / "pre")}),
                             ("linear-probe", {"init": str(tmp / "pre"), "linear_probe": True}),
                             ("finetune-llrd", {"init": str(tmp / "pre"), "layer_decay": 0.6})):
                r = _train(tmp / f"{mode}-{seed}", data=str(tgt), epochs=ft_epochs, seed=seed, imgsz=imgsz,
                           batch=16, aug=SHAPES_AUG, **kw)
                rows.append({"mode": mode, "seed": seed, "test_top1": r["test"]["top1"], "seconds": r["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    return {"pretrain": {"val_top1": pre["test"]["top1"], "epochs": pre_epochs, "seconds": pre["seconds"]},
            "ft_epochs": ft_epochs, "shots": shots, "rows": rows}


def transfer_opencv(pre_epochs: int = 10, ft_epochs: int = 15, shots: int = 20, seeds=(0,)) -> dict:
    """The transfer study on OpenCV's 5,000 digits (``--data opencv``): pretrain on digits 0-4
    (300 train / 50 val images each), fine-tune on digits 5-9 with ``shots`` images per class (20
    val, 100 test each, none of them seen in pretraining), against the same net from scratch at
    equal epochs. Every other option is what cnnkit derives for these folders (16 px, affine
    augmentation, the batch for a small set)."""
    from digits_vs_svc import opencv_digits, write_class_folders

    images, y, _ = opencv_digits()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        order = {c: np.random.default_rng([1, c]).permutation(np.flatnonzero(y == c)) for c in range(10)}
        src = tmp / "source"
        write_class_folders(src, images, y, {"train": [i for c in range(5) for i in order[c][:300]],
                                             "val": [i for c in range(5) for i in order[c][300:350]]})
        pre = _train(tmp / "pre", data=str(src), epochs=pre_epochs)
        print(json.dumps({"pretrain_val_top1": pre["test"]["top1"], "seconds": pre["seconds"]}), flush=True)
        for seed in seeds:
            tgt, rng = tmp / f"target{seed}", np.random.default_rng(100 + seed)
            picks = {c: rng.permutation(order[c]) for c in range(5, 10)}
            write_class_folders(tgt, images, y, {"train": [i for c in picks for i in picks[c][:shots]],
                                                 "val": [i for c in picks for i in picks[c][shots:shots + 20]],
                                                 "test": [i for c in picks for i in picks[c][shots + 20:shots + 120]]})
            for mode, kw in (("scratch", {}), ("finetune", {"init": str(tmp / "pre")}),
                             ("linear-probe", {"init": str(tmp / "pre"), "linear_probe": True}),
                             ("finetune-llrd", {"init": str(tmp / "pre"), "layer_decay": 0.6})):
                r = _train(tmp / f"{mode}-{seed}", data=str(tgt), epochs=ft_epochs, seed=seed, **kw)
                rows.append({"mode": mode, "seed": seed, "test_top1": r["test"]["top1"], "seconds": r["seconds"]})
                print(json.dumps(rows[-1]), flush=True)
    return {"pretrain": {"val_top1": pre["test"]["top1"], "epochs": pre_epochs, "seconds": pre["seconds"]},
            "ft_epochs": ft_epochs, "shots": shots, "rows": rows}


# ---- missing data ----------------------------------------------------------------------------
def missing(epochs: int = 20, p: float = 0.6, seeds=(0,), ratios=(0.0, 0.1, 0.3, 0.5, 0.7)) -> dict:
    """Digits with square patches missing: a plain model, a zero-fill model trained with
    ``--missing P`` and a mask-channel model trained the same way, on the same holes."""
    from cnnkit.methods.missing import missing_curve

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in seeds:
            runs = []
            for name, kw in (("plain", {}), ("zero-fill", {"missing": p}),
                             ("mask-channel", {"missing": p, "missing_input": "mask"})):
                out = Path(tmp) / f"{name}-{seed}"
                _train(out, data=DATA["data"], epochs=epochs, seed=seed, **kw)
                runs.append(str(out))
            curve = missing_curve(runs, DATA["data"], list(ratios), split="test", verbose=False,
                                  plot=RESULTS / f"missing_curve{DATA['tag']}_seed{seed}.png")
            rows.append({"seed": seed, **curve})
            print(json.dumps(rows[-1]), flush=True)
    return {"epochs": epochs, "train_missing": p, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=["imbalance", "noise", "transfer", "missing", "all"])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--shots", type=int, default=20, help="transfer: target images per class")
    ap.add_argument("--data", choices=["digits", "opencv"], default="digits",
                    help="opencv: OpenCV's 5,000 digits as a folder (transfer: digits 0-4 to 5-9)")
    args = ap.parse_args()
    RESULTS.mkdir(exist_ok=True)
    folder = None
    if args.data == "opencv":
        folder = tempfile.TemporaryDirectory()
        DATA.update(data=opencv_folder(Path(folder.name) / "opencv-digits"), tag="_opencv")
    todo = ["imbalance", "noise", "transfer", "missing"] if args.which == "all" else [args.which]
    for name in todo:
        if name == "transfer":
            out = (transfer_opencv if folder is not None else transfer)(seeds=args.seeds, shots=args.shots)
        else:
            out = globals()[name](epochs=args.epochs, seeds=args.seeds)
        shots = f"_{args.shots}shots" if name == "transfer" and args.shots != 20 else ""
        path = RESULTS / f"techniques_{name}{DATA['tag']}{shots}.json"
        path.write_text(json.dumps({"data": args.data, **out}, indent=1))
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
