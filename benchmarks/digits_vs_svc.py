"""cnnkit's default digits training versus scikit-learn's SVC on the same fixed split.

    python benchmarks/digits_vs_svc.py [--seeds 0 1 2 3 4] [--folder]

The SVC (RBF kernel, pixels scaled to [0, 1]) picks C and gamma on the validation split,
like cnnkit picks its best epoch on it; both report top-1 on the 270 test digits.

``--folder`` runs the same comparison as a new user meets it: the 1,797 digits written as PNG
class folders (``train/`` and ``test/``, a stratified 80/20 split of its own, seeded), trained
by ``cnnkit classify train --data FOLDER`` with no other option (the input size and
augmentation come from the images), timed end to end; the SVC picks C and gamma on a
stratified 20% of the folder's train images, as cnnkit holds out its val split.

``--folder --opencv`` does the same on a second dataset of another kind: OpenCV's 5,000
handwritten digits (20x20 px, scanned pen strokes rather than 8x8 averaged blocks; Debian's
``opencv-doc``, installed by ``make bench-data``), 1,000 of them for test.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import numpy as np
from _common import save


def svc_peer() -> dict:
    from sklearn.svm import SVC

    from cnnkit.data.digits import digits_arrays

    (xtr, ytr), (xva, yva), (xte, yte) = (digits_arrays(s) for s in ("train", "val", "test"))
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0
    t0 = time.perf_counter()
    best = max(((SVC(C=c, gamma=g).fit(flat(xtr), ytr).score(flat(xva), yva), c, g)
                for c in (1, 3, 10, 30) for g in ("scale", 0.01, 0.03, 0.1)), key=lambda t: t[0])
    _, c, g = best
    model = SVC(C=c, gamma=g).fit(flat(xtr), ytr)
    return {"test_top1": float(model.score(flat(xte), yte)), "val_top1": float(best[0]), "C": c,
            "gamma": g, "fit_and_search_s": round(time.perf_counter() - t0, 2)}


def cnnkit_runs(seeds: list[int]) -> dict:
    import cnnkit

    runs = []
    for seed in seeds:
        with tempfile.TemporaryDirectory() as d:
            t0 = time.perf_counter()
            r = cnnkit.train("classify", data="digits", seed=seed, out=d, verbose=False)
            runs.append({"seed": seed, "test_top1": r.test_metrics["top1"], "val_top1": r.metrics["top1"],
                         "train_s": round(time.perf_counter() - t0, 1)})
            print(runs[-1], flush=True)
    tops = [r["test_top1"] for r in runs]
    return {"runs": runs, "test_top1_mean": statistics.mean(tops), "test_top1_min": min(tops)}


OPENCV_DIGITS = "/usr/share/doc/opencv-doc/examples/data/digits.png"  # Debian opencv-doc (make bench-data)


def sklearn_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 8x8 digits: (uint8 images, labels, the SVC's features)."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    return (x.reshape(-1, 8, 8) * 255 / 16).round().astype(np.uint8), y, x / 16.0


def opencv_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """OpenCV's 5,000 handwritten digits (20x20, white on black, 500 per class; its sample
    ``digits.py`` cuts the same sheet): (uint8 images, labels, the SVC's features)."""
    from pathlib import Path

    from PIL import Image

    if not Path(OPENCV_DIGITS).is_file():
        raise SystemExit(f"{OPENCV_DIGITS} is missing: run `make bench-data` (Debian's opencv-doc)")
    sheet = np.asarray(Image.open(OPENCV_DIGITS).convert("L"))
    cells = sheet.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(-1, 20, 20)
    y = np.repeat(np.arange(10), 500)  # five rows of 100 per digit
    return cells, y, cells.reshape(len(cells), -1) / 255.0


def write_class_folders(root, images: np.ndarray, y: np.ndarray, splits: dict) -> None:
    """``root/SPLIT/LABEL/INDEX.png`` for the indices of each split (grayscale PNGs)."""
    from PIL import Image

    for split, idx in splits.items():
        for i in idx:
            folder = root / split / str(y[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i], "L").save(folder / f"{i}.png")


def folder_runs(seeds: list[int], dataset: str = "sklearn", split_seed: int = 1) -> dict:
    """Write the digits as PNG folders, train with no options per seed, and fit the SVC."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sklearn.model_selection import train_test_split
    from sklearn.svm import SVC

    images, y, flat = sklearn_digits() if dataset == "sklearn" else opencv_digits()
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=split_seed)
    fit, pick = train_test_split(itr, test_size=0.2, stratify=y[itr], random_state=split_seed)
    t0 = time.perf_counter()
    best = max(((SVC(C=c, gamma=g).fit(flat[fit], y[fit]).score(flat[pick], y[pick]), c, g)
                for c in (1, 3, 10, 30) for g in ("scale", 0.01, 0.03, 0.1)), key=lambda t: t[0])
    svc = {"test_top1": float(SVC(C=best[1], gamma=best[2]).fit(flat[fit], y[fit]).score(flat[ite], y[ite])),
           "C": best[1], "gamma": best[2], "search_and_fit_s": round(time.perf_counter() - t0, 1)}
    print("svc", svc, flush=True)
    exe = Path(sys.executable).with_name("cnnkit")
    runs = []
    with tempfile.TemporaryDirectory() as d:
        root = Path(d) / "digits"
        write_class_folders(root, images, y, {"train": itr, "test": ite})
        for seed in seeds:
            out = Path(d) / f"run{seed}"
            cmd = [str(exe), "classify", "train", "--data", str(root), "--out", str(out)]
            cmd += ["--seed", str(seed)] if seed else []
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            res = json.loads((out / "results.json").read_text())
            config = (out / "config.yaml").read_text()
            runs.append({"seed": seed, "test_top1": res["test"]["top1"], "val_top1": res["top1"],
                         "wall_s": round(time.perf_counter() - t0, 1),
                         "derived": [line for line in config.splitlines() if "derived from the data" in line]})
            print(runs[-1], flush=True)
    tops = [r["test_top1"] for r in runs]
    return {"command": "cnnkit classify train --data FOLDER", "dataset": dataset, "images": len(y),
            "test_images": len(ite), "runs": runs, "svc": svc,
            "test_top1_mean": statistics.mean(tops), "test_top1_min": min(tops)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--folder", action="store_true", help="the digits as PNG class folders, no options")
    ap.add_argument("--opencv", action="store_true",
                    help="with --folder: OpenCV's 5,000 20x20 handwritten digits (a second dataset)")
    args = ap.parse_args()
    if args.folder:
        name = "opencv" if args.opencv else "sklearn"
        save("digits_folder_vs_svc" + ("_opencv" if args.opencv else ""), folder_runs(args.seeds, name))
        return
    svc = svc_peer()
    print("svc", svc, flush=True)
    ours = cnnkit_runs(args.seeds)
    print(f"cnnkit smallcnn (defaults): test top-1 mean {ours['test_top1_mean']:.4f} "
          f"(min {ours['test_top1_min']:.4f}) · SVC: {svc['test_top1']:.4f}")
    save("digits_vs_svc", {"command": "cnnkit classify train --data digits", "cnnkit": ours, "svc": svc})


if __name__ == "__main__":
    main()
