"""cnnkit's default digits training versus scikit-learn's SVC on the same fixed split.

    python benchmarks/digits_vs_svc.py [--seeds 0 1 2 3 4]

The SVC (RBF kernel, pixels scaled to [0, 1]) picks C and gamma on the validation split,
like cnnkit picks its best epoch on it; both report top-1 on the 270 test digits.
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
    flat = lambda x: x.reshape(len(x), -1).astype(np.float64) / 255.0  # noqa: E731
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = ap.parse_args()
    svc = svc_peer()
    print("svc", svc, flush=True)
    ours = cnnkit_runs(args.seeds)
    print(f"cnnkit smallcnn (defaults): test top-1 mean {ours['test_top1_mean']:.4f} "
          f"(min {ours['test_top1_min']:.4f}) · SVC: {svc['test_top1']:.4f}")
    save("digits_vs_svc", {"command": "cnnkit classify train --data digits", "cnnkit": ours, "svc": svc})


if __name__ == "__main__":
    main()
