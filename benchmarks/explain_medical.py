"""Are the explanations of a 3-D model right? ``cnnkit medical explain --eval`` on the phantoms.

    python benchmarks/explain_medical.py [--seg-epochs 30] [--cls-epochs 60] [--limit 16]

Trains the default 3-D U-Net (``cnnkit medical train --epochs 30``) and the DenseNet-121
classifier at the README's recipe (``--model densenet3d --lr 3e-3 --epochs 60``), then explains
the test volumes with ``cnnkit medical explain --data phantoms --split test --eval``: the U-Net
for every class in each label volume (organ, lesion), scored on that class's voxels; the
classifier for each volume's true class, scored on the lesion's voxels where it has one. Each
method's energy-in-mask, pointing game and deletion / insertion AUC are reported beside smooth
random maps (the ``random`` row), the baseline a map that ignores the object gets. Occlusion
(3,375 masked passes per 32-voxel volume) and Score-CAM are left out for time.

Accuracy only: the figures do not depend on what else runs on the machine.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from _common import save

METHODS = "gradcam,gradcam++,eigencam,saliency,ig"


def main() -> None:
    import cnnkit

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seg-epochs", type=int, default=30)
    ap.add_argument("--cls-epochs", type=int, default=60)
    ap.add_argument("--limit", type=int, default=16)
    ap.add_argument("--methods", default=METHODS)
    args = ap.parse_args()
    out = {}
    with tempfile.TemporaryDirectory() as d:
        for name, kw in (("unet3d", {"epochs": args.seg_epochs}),
                         ("densenet3d", {"model": "densenet3d", "lr": 3e-3, "epochs": args.cls_epochs})):
            run = Path(d) / name
            r = cnnkit.train("medical", data="phantoms", out=str(run), verbose=False, **kw)
            test = r.test_metrics or r.metrics
            e = cnnkit.explain("medical", run, data="phantoms", split="test", limit=args.limit, method=args.methods,
                               eval=True, out=str(Path(d) / f"{name}-maps"), verbose=False)
            out[name] = {"train": kw, "test_metrics": {k: v for k, v in test.items() if isinstance(v, (int, float))},
                         "layer": e["layer"], "summary": e["summary"]}
            print(name, out[name]["layer"], {m: {k: round(v, 3) for k, v in s.items() if isinstance(v, float)}
                                             for m, s in e["summary"].items()}, flush=True)
            save("explain_medical", out)


if __name__ == "__main__":
    main()
