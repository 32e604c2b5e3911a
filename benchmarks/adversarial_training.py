"""Adversarial training (`train --adv pgd`) against plain training: clean and robust accuracy.

    python benchmarks/adversarial_training.py [--digits-epochs 15] [--shapes-epochs 6] [--adv-steps 7]
        [--datasets digits,shapes] [--warm-epochs N] [--tag T]

For digits (eps 0.1) and shapes (eps 8/255), the same recipe is trained twice, on clean images
and with ``--adv pgd --adv-eps EPS --adv-steps N`` (PGD examples of every batch, step eps/4,
random start); with ``--warm-epochs N`` a third run starts from the plain one (``train --init
PLAIN --adv pgd`` for N epochs, the usual remedy when adversarial training from scratch does
not take off); all are attacked on the held-out split by ``cnnkit classify attack``: FGSM,
PGD-20 at the training eps (step eps/4) and PGD-20 at twice the eps. Accuracy figures do not
depend on timing, so this script may share the machine; it prints the training time of each
run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import save

SETTINGS = {"digits": ("0.1", 0.1, "test"), "shapes": ("8/255", 8 / 255, "val")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--digits-epochs", type=int, default=15)
    ap.add_argument("--shapes-epochs", type=int, default=6)
    ap.add_argument("--adv-steps", type=int, default=7)
    ap.add_argument("--limit", type=int, default=400, help="images attacked per split")
    ap.add_argument("--datasets", default="digits,shapes")
    ap.add_argument("--warm-epochs", type=int, default=0, help="epochs of --adv pgd from the plain weights (0: none)")
    ap.add_argument("--no-scratch", action="store_true", help="with --warm-epochs: skip --adv pgd from scratch")
    ap.add_argument("--tag", default="", help="suffix of the results file")
    args = ap.parse_args()
    import cnnkit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        every = {"digits": args.digits_epochs, "shapes": args.shapes_epochs}
        for data in args.datasets.split(","):
            eps_text, eps, split = SETTINGS[data]
            plain = Path(tmp) / f"{data}-plain"
            kinds = (None, "pgd", "warm") if args.warm_epochs else (None, "pgd")
            for adv in [k for k in kinds if not (args.no_scratch and args.warm_epochs and k == "pgd")]:
                run = Path(tmp) / f"{data}-{adv or 'plain'}"
                epochs = args.warm_epochs if adv == "warm" else every[data]
                t0 = time.perf_counter()
                extra = {"adv": "pgd", "adv_eps": eps_text, "adv_steps": args.adv_steps} if adv else {}
                if adv == "warm":
                    extra["init"] = str(plain)
                cnnkit.train("classify", data=data, epochs=epochs, out=str(run), verbose=False, **extra)
                minutes = (time.perf_counter() - t0) / 60
                label = f"--adv pgd (eps {eps_text}, {args.adv_steps} steps)"
                row = {"data": data, "training": "plain" if adv is None else label + (
                    ", --init plain" if adv == "warm" else ""), "epochs": epochs, "train_minutes": round(minutes, 2)}
                for name, kw in (("fgsm", {"method": "fgsm", "eps": eps_text}),
                                 ("pgd20", {"method": "pgd", "eps": eps_text, "steps": 20}),
                                 ("pgd20_2eps", {"method": "pgd", "eps": str(2 * eps), "steps": 20})):
                    r = cnnkit.attack("classify", run, data, split=split, limit=args.limit,
                                      out=str(Path(tmp) / "pics"), verbose=False, **kw)
                    row["clean"] = r["clean"]
                    row[name] = r["attacked"]
                rows.append(row)
                print(f"{data:<7} {row['training']:<46} {epochs:>3} epochs {minutes:5.1f} min  clean "
                      f"{row['clean']:.4f}  FGSM {row['fgsm']:.4f}  PGD-20 {row['pgd20']:.4f}  PGD-20 at 2 eps "
                      f"{row['pgd20_2eps']:.4f}", flush=True)
    save(f"adversarial_training{args.tag}", {"adv_steps": args.adv_steps, "limit": args.limit, "rows": rows})


if __name__ == "__main__":
    main()
