"""Adversarial training (`train --adv pgd`) against plain training: clean and robust accuracy.

    python benchmarks/adversarial_training.py [--digits-epochs 15] [--shapes-epochs 6] [--adv-steps 7]

For digits (eps 0.1) and shapes (eps 8/255), the same recipe is trained twice, on clean images
and with ``--adv pgd --adv-eps EPS --adv-steps N`` (PGD examples of every batch, step eps/4,
random start), and both are attacked on the held-out split by ``cnnkit classify attack``: FGSM,
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
    args = ap.parse_args()
    import cnnkit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for data, epochs in (("digits", args.digits_epochs), ("shapes", args.shapes_epochs)):
            eps_text, eps, split = SETTINGS[data]
            for adv in (None, "pgd"):
                run = Path(tmp) / f"{data}-{adv or 'plain'}"
                t0 = time.perf_counter()
                extra = {"adv": adv, "adv_eps": eps_text, "adv_steps": args.adv_steps} if adv else {}
                cnnkit.train("classify", data=data, epochs=epochs, out=str(run), verbose=False, **extra)
                minutes = (time.perf_counter() - t0) / 60
                row = {"data": data, "training": f"--adv pgd (eps {eps_text}, {args.adv_steps} steps)" if adv
                       else "plain", "epochs": epochs, "train_minutes": round(minutes, 2)}
                for name, kw in (("fgsm", {"method": "fgsm", "eps": eps_text}),
                                 ("pgd20", {"method": "pgd", "eps": eps_text, "steps": 20}),
                                 ("pgd20_2eps", {"method": "pgd", "eps": str(2 * eps), "steps": 20})):
                    r = cnnkit.attack("classify", run, data, split=split, limit=args.limit,
                                      out=str(Path(tmp) / "pics"), verbose=False, **kw)
                    row["clean"] = r["clean"]
                    row[name] = r["attacked"]
                rows.append(row)
                print(f"{data:<7} {row['training']:<32} {epochs:>3} epochs {minutes:5.1f} min  clean "
                      f"{row['clean']:.4f}  FGSM {row['fgsm']:.4f}  PGD-20 {row['pgd20']:.4f}  PGD-20 at 2 eps "
                      f"{row['pgd20_2eps']:.4f}", flush=True)
    save("adversarial_training", {"adv_steps": args.adv_steps, "limit": args.limit, "rows": rows})


if __name__ == "__main__":
    main()
