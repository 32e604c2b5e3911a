"""`cnnkit classify attack` against torchattacks: robust accuracy and time at the same settings.

    python benchmarks/attack_torchattacks.py [--epochs 10] [--batch 64]

Two smallcnn classifiers are trained here (digits at 16 px, shapes at 64 px); each is attacked
with FGSM and PGD (10 steps, step eps/4, random start) in the L-infinity ball, and with the
Carlini-Wagner L2 attack at torchattacks' defaults (c 1, kappa 0, 50 Adam steps at 0.01), and
the standard AutoAttack (APGD-CE, APGD-T, FAB-T with 100 steps each, Square with 5,000 queries,
each on what the ones before left), by cnnkit
(``cnnkit.methods.attack``, through the same ``AttackBackend`` that ``cnnkit classify attack``
puts under ``val``) and by torchattacks 3.5.1 (the peer, installed by this script into
``benchmarks/.peer-torchattacks`` with pip ``--target`` and put on this process's path only,
never into cnnkit's environment), on the same network (inputs in [0, 1], normalization inside)
and the same images, both against the true labels (``val``'s loop hands them to cnnkit's
attacking backend; here the script does). Robust accuracy is measured against the true labels. Time: the whole attack of the split in
batches of ``--batch`` (each includes a forward pass on the adversarial batch), the two libraries
alternating batch by batch, alone on this machine. PGD starts at a random point of the ball, so
it runs with ``--seeds`` seeds in each library and the table gives the mean.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save

PEER = Path(__file__).parent / ".peer-torchattacks"
SETTINGS = {"digits": 0.1, "shapes": 8 / 255}  # eps per dataset: digits are easy to separate, shapes are not


def install_peer() -> None:
    if not (PEER / "torchattacks").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(PEER),
                        "torchattacks==3.5.1"], check=True)
    sys.path.insert(0, str(PEER))


class StandardAutoAttack:
    """torchattacks' standard AutoAttack, built from its parts so that the steps and queries can
    match cnnkit's: APGD-CE, APGD-T, FAB-T (``steps`` each) and Square (``queries``), each on the
    images the ones before left (``MultiAttack``). torchattacks' own ``AutoAttack`` class fixes
    10 steps; the reference (and cnnkit) default to 100."""

    def __init__(self, torchattacks, core, eps: float, steps: int, queries: int, n_classes: int, seed: int):
        ta = torchattacks
        self.attack = ta.MultiAttack([
            ta.APGD(core, eps=eps, steps=steps, loss="ce", n_restarts=1, seed=seed),
            ta.APGDT(core, eps=eps, steps=steps, n_restarts=1, n_classes=n_classes, seed=seed),
            ta.FAB(core, eps=eps, steps=steps, n_restarts=1, multi_targeted=True, n_classes=n_classes, seed=seed),
            ta.Square(core, eps=eps, n_queries=queries, n_restarts=1, seed=seed)])

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.attack(x, y)


def compare(name: str, run: Path, data: str, split: str, method: str, eps: float, batch: int,
            seeds: int) -> dict:
    import torchattacks

    from cnnkit.data.classification import load_classification_data
    from cnnkit.methods.attack import AttackBackend, AttackConfig
    from cnnkit.runtime.pipeline import load

    p = load(run)
    records = load_classification_data(data, channels=p.card.input.channels).split(split)
    xs = torch.stack([p.pipeline.prepare(records[i][0])[0] for i in range(len(records))])
    ys = torch.tensor([int(records[i][1]) for i in range(len(records))])
    core = p.backend.core
    with torch.no_grad():
        clean = sum(int((core(xs[i:i + batch]).argmax(1) == ys[i:i + batch]).sum()) for i in range(0, len(xs), batch))
    tops = {"cnnkit": [], "torchattacks": []}
    secs = {"cnnkit": 0.0, "torchattacks": 0.0}
    l2 = {"cnnkit": [], "torchattacks": []}  # per image overturned: the perturbation's L2 size
    for seed in range(seeds if method == "pgd" else 1):  # PGD's random start: several seeds, same for both
        if method == "autoattack":  # the standard AutoAttack, the reference's 100 steps and 5,000 queries
            ours = AttackBackend(p.backend, p.pipeline, AttackConfig("autoattack", eps, 100, seed=seed, queries=5000))
            peer = StandardAutoAttack(torchattacks, core, eps, 100, 5000, len(p.card.classes), seed)
        elif method == "cw":  # torchattacks' CW defaults: c 1, kappa 0, 50 Adam steps at 0.01
            ours = AttackBackend(p.backend, p.pipeline, AttackConfig("cw", eps, 50, 0.01, c=1.0, kappa=0.0))
            peer = torchattacks.CW(core, c=1, kappa=0, steps=50, lr=0.01)
        else:
            ours = AttackBackend(p.backend, p.pipeline, AttackConfig(method, eps, 10, eps / 4, seed=seed))
            torch.manual_seed(seed)  # torchattacks draws its start from torch's global generator
            peer = (torchattacks.FGSM(core, eps=eps) if method == "fgsm" else
                    torchattacks.PGD(core, eps=eps, alpha=eps / 4, steps=10, random_start=True))
        right = {"cnnkit": 0, "torchattacks": 0}
        for i in range(0, len(xs), batch):
            x, y = xs[i:i + batch], ys[i:i + batch]
            t0 = time.perf_counter()
            ours.labels = y
            out = ours(x)[0]
            t1 = time.perf_counter()
            adv = peer(x, y)
            with torch.no_grad():
                out_peer = core(adv)
            t2 = time.perf_counter()
            secs["cnnkit"] += t1 - t0
            secs["torchattacks"] += t2 - t1
            right["cnnkit"] += int((out.argmax(1) == y).sum())
            right["torchattacks"] += int((out_peer.argmax(1) == y).sum())
            l2["torchattacks"] += (adv - x).flatten(1).norm(dim=1)[out_peer.argmax(1) != y].tolist()
            l2["cnnkit"] += [v for v, f in zip(ours.stats.l2[-len(x):], (out.argmax(1) != y).tolist()) if f]
        for k, runs in tops.items():
            runs.append(right[k] / len(xs))
    n = len(xs)
    mean = {k: sum(v) / len(v) for k, v in tops.items()}
    row = {"model": name, "method": method, "eps": round(eps, 5), "images": n, "seeds": len(tops["cnnkit"]),
           "clean_top1": clean / n, "cnnkit_top1": mean["cnnkit"], "torchattacks_top1": mean["torchattacks"],
           "cnnkit_runs": tops["cnnkit"], "torchattacks_runs": tops["torchattacks"],
           "cnnkit_s": round(secs["cnnkit"], 3), "torchattacks_s": round(secs["torchattacks"], 3)}
    row["diff_points"] = round(100 * (row["cnnkit_top1"] - row["torchattacks_top1"]), 2)
    for k, v in l2.items():  # mean L2 of the perturbations that overturned an answer (CW's figure of merit)
        row[f"{k}_mean_l2"] = round(sum(v) / len(v), 4) if v else None
    row["speedup"] = round(row["torchattacks_s"] / row["cnnkit_s"], 2)
    if ours.stats.broke:  # AutoAttack: the images each of cnnkit's four attacks broke first
        row["cnnkit_broken_by"] = dict(ours.stats.broke)
    print(f"{name:<8} {method:<5} eps {eps:.4f}  clean {row['clean_top1']:.4f}  cnnkit {row['cnnkit_top1']:.4f}  "
          f"torchattacks {row['torchattacks_top1']:.4f} ({row['diff_points']:+.2f} points, mean of {row['seeds']} "
          f"seeds)  time cnnkit "
          f"{row['cnnkit_s']:.2f} s, torchattacks {row['torchattacks_s']:.2f} s ({row['speedup']:.2f}x)", flush=True)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=5, help="PGD random starts per library")
    ap.add_argument("--methods", default="fgsm,pgd,cw,autoattack", help="comma-separated attacks to compare")
    ap.add_argument("--datasets", default="digits,shapes", help="comma-separated: digits, shapes")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    install_peer()
    import cnnkit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data, split in (("digits", "test"), ("shapes", "val")):
            if data not in args.datasets.split(","):
                continue
            run = Path(tmp) / data
            cnnkit.train("classify", data=data, epochs=args.epochs, out=str(run), verbose=False)
            for method in args.methods.split(","):
                rows.append(compare(data, run, data, split, method, SETTINGS[data], args.batch, args.seeds))
    save(f"attack_torchattacks{args.tag}", {"epochs": args.epochs, "batch": args.batch, "seeds": args.seeds, "rows": rows})


if __name__ == "__main__":
    main()
