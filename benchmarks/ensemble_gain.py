"""How much an ensemble of small models gains over its members, and what TTA adds.

    python benchmarks/ensemble_gain.py [--data digits] [--epochs 1] [--triples 0,1,2 3,4,5 0,2,4 1,3,5]

Trains one model per seed (``cnnkit.train("classify", data=..., epochs=..., seed=S)``) and
evaluates each triple of seeds on the test split the way
``cnnkit classify val --weights A B C --split test`` does: every member alone, the
``--ensemble mean`` and ``--ensemble vote`` ensembles, and both again with ``--tta`` (``scale``
for digits, whose flipped images are other symbols; ``flip,scale`` otherwise). The peer is the
average member, measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import save


def train_runs(data: str, epochs: int, seeds: list[int], root: Path) -> list[dict]:
    import cnnkit

    runs = []
    for seed in seeds:
        out = root / f"{Path(data).name}-e{epochs}-s{seed}"
        t0 = time.perf_counter()
        r = cnnkit.train("classify", data=data, epochs=epochs, seed=seed, out=str(out), verbose=False)
        runs.append({"seed": seed, "run": str(out), "test_top1": r.test_metrics["top1"],
                     "train_s": round(time.perf_counter() - t0, 1)})
        print(runs[-1], flush=True)
    return runs


def evaluate_triple(paths: list[str], data: str, tta: str) -> dict:
    from cnnkit import val

    out: dict = {}
    for mode in ("mean", "vote"):
        for views in (None, tta):
            r = val("classify", paths, data, split="test", ensemble=mode, tta=views, verbose=False)
            key = mode + ("+tta" if views else "")
            out[key] = r["top1"]
            out.setdefault("members_top1" + ("_tta" if views else ""), r["members_top1"])
            out.setdefault("mean_member_top1" + ("_tta" if views else ""), r["mean_member_top1"])
    out["gain_mean"] = out["mean"] - out["mean_member_top1"]
    out["gain_vote"] = out["vote"] - out["mean_member_top1"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="digits",
                    help="digits, shapes, a folder, or opencv (OpenCV's 5,000 digits written as a folder, "
                         "3,000 / 1,000 / 1,000; Debian opencv-doc)")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--triples", nargs="+", default=["0,1,2", "3,4,5", "0,2,4", "1,3,5"],
                    help="seed triples, each as S1,S2,S3")
    args = ap.parse_args()
    try:
        groups = [[int(s) for s in t.split(",")] for t in args.triples]
    except ValueError:
        ap.error("--triples takes comma-separated seeds, e.g. 0,1,2 3,4,5")
    tta = "scale" if args.data in ("digits", "opencv") else "flip,scale"  # a flipped digit is another symbol
    with tempfile.TemporaryDirectory() as d:
        data = args.data
        if data == "opencv":
            from techniques import opencv_folder

            data = opencv_folder(Path(d) / "opencv-digits")
        runs = train_runs(data, args.epochs, sorted({s for g in groups for s in g}), Path(d))
        by_seed = {r["seed"]: r["run"] for r in runs}
        triples = []
        for seeds in groups:
            res = {"seeds": seeds, **evaluate_triple([by_seed[s] for s in seeds], data, tta)}
            triples.append(res)
            print(f"seeds {res['seeds']}: members {[round(t, 4) for t in res['members_top1']]} "
                  f"mean member {res['mean_member_top1']:.4f} · ensemble mean {res['mean']:.4f} "
                  f"vote {res['vote']:.4f} · with tta={tta}: members mean {res['mean_member_top1_tta']:.4f} "
                  f"ensemble mean {res['mean+tta']:.4f} vote {res['vote+tta']:.4f}", flush=True)
    for r in runs:
        r.pop("run")
    summary = {k: statistics.mean(t[k] for t in triples)
               for k in ("mean_member_top1", "mean", "vote", "mean_member_top1_tta", "mean+tta", "vote+tta",
                         "gain_mean", "gain_vote")}
    print("averaged over triples:", {k: round(v, 4) for k, v in summary.items()})
    save(f"ensemble_gain_{args.data}_e{args.epochs}", {
        "command": f"cnnkit classify val --weights A B C --data {args.data} --split test "
                   f"--ensemble mean|vote [--tta {tta}]",
        "data": args.data, "epochs": args.epochs, "tta": tta, "runs": runs, "triples": triples,
        "summary": summary})


if __name__ == "__main__":
    main()
