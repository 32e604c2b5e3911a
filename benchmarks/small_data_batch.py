"""The batch a small training set of one's own gets (issue 19): the rule in
``cnnkit.data.defaults.fit_batch`` against the fixed default, and whether the learning rate
should follow the batch.

    python benchmarks/small_data_batch.py [--sizes 100 200 400 1437] [--seeds 0 1 2]

The data are scikit-learn's 1,797 digits written as PNG class folders (the same split as
``digits_vs_svc.py --folder``: 360 test images), with the train folder cut to a stratified
subset of each size; cnnkit holds out 20% of it for validation, as a user's folder gets. Each
size and seed trains three ways at the default 20 epochs, everything else left to the data:

- ``fixed``: ``--batch 32 --lr 2e-3``, the classification default before the rule;
- ``derived``: no options (the batch halved until an epoch takes at least 20 steps, never below
  8; the learning rate stays 2e-3);
- ``sqrt-lr``: the derived batch with the learning rate scaled by the square root of the batch
  ratio, the usual rule for AdamW (measured worse or equal, so not adopted).

Reports test top-1 per run and the mean per size and way. Accuracy, not time: runs may share
the machine without changing the figures (each run is seeded).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import numpy as np
import yaml
from _common import save
from digits_vs_svc import sklearn_digits, write_class_folders


def write_folders(root: Path, size: int, split_seed: int = 1) -> None:
    """The digits folder of ``digits_vs_svc.py --folder`` with ``train/`` cut to ``size`` images."""
    from sklearn.model_selection import train_test_split

    images, y, _ = sklearn_digits()
    itr, ite = train_test_split(np.arange(len(y)), test_size=0.2, stratify=y, random_state=split_seed)
    if size < len(itr):
        itr, _ = train_test_split(itr, train_size=size, stratify=y[itr], random_state=split_seed)
    write_class_folders(root, images, y, {"train": itr, "test": ite})


def main() -> None:
    import cnnkit
    from cnnkit.data.defaults import fit_batch
    from cnnkit.tasks.classify.config import ClassifyConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100, 200, 400, 1437])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = ap.parse_args()
    base_batch, base_lr = ClassifyConfig.DEFAULT_BATCH, ClassifyConfig.DEFAULT_LR
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for size in args.sizes:
            root = Path(d) / f"digits{size}"
            write_folders(root, size)
            n_train = size - round(0.2 * size)  # roughly what cnnkit keeps after the val hold-out
            small = fit_batch(n_train, base_batch)
            ways = {"fixed": {"batch": base_batch, "lr": base_lr}, "derived": {},
                    "sqrt-lr": {"batch": small, "lr": round(base_lr * (small / base_batch) ** 0.5, 6)}}
            for seed in args.seeds:
                for way, opts in ways.items():
                    if way == "sqrt-lr" and small == base_batch:
                        continue  # the same run as fixed
                    out = Path(d) / f"run{size}-{way}-{seed}"
                    r = cnnkit.train("classify", data=str(root), out=str(out), seed=seed, verbose=False, **opts)
                    cfg = yaml.safe_load((out / "config.yaml").read_text())
                    rows.append({"size": size, "way": way, "seed": seed, "batch": cfg["batch"], "lr": cfg["lr"],
                                 "test_top1": r.test_metrics["top1"]})
                    print(rows[-1], flush=True)
    summary = {}
    for size in args.sizes:
        for way in ("fixed", "derived", "sqrt-lr"):
            tops = [r["test_top1"] for r in rows if r["size"] == size and r["way"] == way]
            if tops:
                summary[f"{size} {way}"] = {"mean": round(statistics.mean(tops), 4), "min": min(tops),
                                            "batch": next(r["batch"] for r in rows if r["size"] == size and r["way"] == way)}
    for k, v in summary.items():
        print(f"{k:>22}: {v}")
    save("small_data_batch", {"epochs": 20, "rows": rows, "summary": summary})


if __name__ == "__main__":
    main()
