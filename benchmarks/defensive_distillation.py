"""Defensive distillation on digits: what it holds against FGSM and PGD, and how CW and AutoAttack break it.

    python benchmarks/defensive_distillation.py [--epochs 10] [--temperature 20] [--limit 270]

A smallcnn is trained on digits as usual (plain), a teacher is trained with its loss at
temperature T (``--train-temperature T``), and a student of the same architecture is trained
only on the teacher's soft labels at T (``--teacher RUN --kd-temperature T --kd-alpha 1``;
Papernot et al., 2016); all are used at T = 1 and attacked on the test split by ``cnnkit
classify attack``: FGSM and PGD-20 at eps 0.1 (L-infinity), and the Carlini-Wagner L2 attack
(50 Adam steps at 0.01, c 1 and 10), and the standard AutoAttack at eps 0.1 (its APGD-T uses the
scale-invariant DLR loss, and its Square attack no gradients at all). Trained at T, the logits come out about T times larger,
so the softmax saturates at T = 1 and the cross-entropy gradients FGSM and PGD follow vanish
(gradient masking); CW works on the logit margin, which does not saturate. Accuracy figures do not depend on timing: this script may
share the machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import save

ATTACKS = {"FGSM eps 0.1": {"method": "fgsm", "eps": "0.1"},
           "PGD-20 eps 0.1": {"method": "pgd", "eps": "0.1", "steps": 20},
           "CW c 1": {"method": "cw", "steps": 50, "c": 1.0},
           "CW c 10": {"method": "cw", "steps": 50, "c": 10.0},
           "AutoAttack eps 0.1": {"method": "autoattack", "eps": "0.1"}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--temperature", type=float, default=20.0)
    ap.add_argument("--limit", type=int, default=270, help="test images attacked")
    args = ap.parse_args()
    import cnnkit

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        plain = Path(tmp) / "plain"
        cnnkit.train("classify", data="digits", epochs=args.epochs, out=str(plain), verbose=False)
        teacher = Path(tmp) / "teacher"
        cnnkit.train("classify", data="digits", epochs=args.epochs, train_temperature=args.temperature,
                     out=str(teacher), verbose=False)
        student = Path(tmp) / "distilled"
        cnnkit.train("classify", data="digits", epochs=args.epochs, teacher=str(teacher),
                     kd_temperature=args.temperature, kd_alpha=1.0, out=str(student), verbose=False)
        t = f"{args.temperature:g}"
        for label, run in (("plain", plain), (f"teacher trained at T {t}", teacher),
                           (f"defensive distillation, T {t}", student)):
            row = {"model": label}
            for name, kw in ATTACKS.items():
                r = cnnkit.attack("classify", run, "digits", split="test", limit=args.limit,
                                  out=str(Path(tmp) / "pics"), verbose=False, **kw)
                row["clean"] = r["clean"]
                row[name] = r["attacked"]
                if kw["method"] == "cw":
                    row[f"{name} mean L2"] = r["mean_l2"]
                if kw["method"] == "autoattack":  # which of its four attacks broke each image first
                    row[f"{name} broken by"] = r["broken_by"]
            rows.append(row)
            print(f"{label:<34} clean {row['clean']:.4f}  " + "  ".join(
                f"{n} {row[n]:.4f}" + (f" (L2 {row[n + ' mean L2']:.3f})" if n.startswith("CW") else "")
                + (f" {row[n + ' broken by']}" if n.startswith("AutoAttack") else "")
                for n in ATTACKS), flush=True)
    save("defensive_distillation", {"epochs": args.epochs, "temperature": args.temperature, "limit": args.limit,
                                    "rows": rows})


if __name__ == "__main__":
    main()
