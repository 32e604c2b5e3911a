"""`cnnkit explain` against pytorch-grad-cam (same maps, time per image) and against random maps
(are the maps on the object?).

    python benchmarks/explain_gradcam.py [--images 32] [--epochs 8] [--det-minutes 2]

1. **Parity and speed.** Grad-CAM, Grad-CAM++, Score-CAM and EigenCAM from cnnkit
   (``cnnkit.methods.explain``) and from pytorch-grad-cam 1.5.7 (the peer, installed by this
   script into ``benchmarks/.peer-gradcam`` with pip ``--target`` and put on this process's path
   only, never into cnnkit's environment) on the same network, target layer, target classes and
   images: the largest absolute difference between the maps and the time per image at batch 1
   (median of the images, the two libraries interleaved image by image), for the smallcnn
   shapes classifier trained here (64 px, layer ``stages.3``) and a freshly initialized resnet18
   at 224 px (layer ``layer4``).
2. **Energy in the object.** ``cnnkit classify explain`` and ``cnnkit detect explain`` with
   ``--data shapes --eval`` on the trained classifier and on fastdet trained here for
   ``--det-minutes``: the share of each map inside the object's pixels (classifier) or box
   (detector), the pointing game and the deletion/insertion AUCs, for every method and for smooth
   random maps.

Run it alone: two processes on 2 cores mislead.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _common import save

PEER = Path(__file__).parent / ".peer-gradcam"
PEER_PACKAGES = ["grad-cam==1.5.7", "ttach==0.0.3", "opencv-python-headless"]


def install_peer() -> None:
    if not (PEER / "pytorch_grad_cam").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", str(PEER),
                        *PEER_PACKAGES], check=True)
    sys.path.insert(0, str(PEER))


def parity(name: str, pipe, model, core, layer, images: torch.Tensor, classes: list[int]) -> list[dict]:
    """Both libraries on every image (batch 1), method by method."""
    from pytorch_grad_cam import EigenCAM, GradCAM, GradCAMPlusPlus, ScoreCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    from cnnkit.methods import explain as E

    peers = {"gradcam": GradCAM, "gradcam++": GradCAMPlusPlus, "scorecam": ScoreCAM, "eigencam": EigenCAM}
    rows = []
    for method, peer_cls in peers.items():
        peer = peer_cls(model=core, target_layers=[layer])
        diffs, ours_ms, peer_ms, flipped = [], [], [], 0
        for x, c in zip(images, classes):
            t0 = time.perf_counter()
            ours = E.explain_one(method, pipe, core, layer, x, c)
            t1 = time.perf_counter()
            theirs = torch.from_numpy(peer(input_tensor=x[None], targets=[ClassifierOutputTarget(c)])[0])
            t2 = time.perf_counter()
            ours_ms.append((t1 - t0) * 1e3)
            peer_ms.append((t2 - t1) * 1e3)
            d = float((ours - theirs).abs().max())
            if method == "eigencam" and d > 0.5:  # the SVD's sign: cnnkit fixes it, the peer does not
                flipped += 1
                continue
            diffs.append(d)
        row = {"model": name, "method": method, "images": len(images), "max_abs_diff": max(diffs) if diffs else None,
               "cnnkit_ms": round(statistics.median(ours_ms), 2), "peer_ms": round(statistics.median(peer_ms), 2)}
        row["speedup"] = round(row["peer_ms"] / row["cnnkit_ms"], 2)
        if method == "eigencam":
            row["sign_flipped"] = flipped
        rows.append(row)
        print(f"{name:<22} {method:<10} max |diff| {row['max_abs_diff'] if diffs else float('nan'):.2e}  cnnkit "
              f"{row['cnnkit_ms']:7.2f} ms  pytorch-grad-cam {row['peer_ms']:7.2f} ms  ({row['speedup']:.2f}x)"
              + (f"  sign flipped on {flipped}" if method == "eigencam" else ""), flush=True)
    return rows


DOCS = Path(__file__).resolve().parents[1] / "docs" / "images"
GRID_METHODS = ("gradcam", "gradcam++", "scorecam", "eigencam", "saliency", "ig", "occlusion")


def grid(rows: list[dict], path: Path, images: int = 4, cell: int = 128) -> None:
    """The README's picture: the first ``images`` explained targets (rows) by method (columns)."""
    from PIL import Image, ImageDraw

    targets = list(dict.fromkeys((r["image"], r["target"]) for r in rows if r.get("png")))[:images]
    sheet = Image.new("RGB", (cell * len(GRID_METHODS), 18 + cell * len(targets)), "white")
    draw = ImageDraw.Draw(sheet)
    for j, method in enumerate(GRID_METHODS):
        draw.text((j * cell + 4, 3), method, fill="black")
    for i, key in enumerate(targets):
        for j, method in enumerate(GRID_METHODS):
            row = next(r for r in rows if (r["image"], r["target"]) == key and r["method"] == method)
            tile = Image.open(row["png"]).convert("RGB").resize((cell, cell), Image.BILINEAR)
            sheet.paste(tile, (j * cell, 18 + i * cell))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    print(f"wrote {path}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=32, help="images per model and method")
    ap.add_argument("--epochs", type=int, default=8, help="epochs of the shapes classifier")
    ap.add_argument("--det-minutes", type=float, default=2.0, help="training time of the shapes detector")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    install_peer()
    import cnnkit
    from cnnkit.core.card import InputSpec, ModelCard
    from cnnkit.data.shapes_classification import ShapesClassification
    from cnnkit.methods.explain import resolve_layer
    from cnnkit.runtime.pipeline import load, pipeline_for

    with tempfile.TemporaryDirectory() as tmp:
        cls_run = Path(tmp) / "cls"
        cnnkit.train("classify", data="shapes", epochs=args.epochs, out=str(cls_run), verbose=False)
        p = load(cls_run)
        val = ShapesClassification("val")
        images = torch.stack([p.pipeline.prepare(val[i][0])[0] for i in range(args.images)])
        top = p.raw(images)[0].argmax(1).tolist()
        _, layer = resolve_layer(p.pipeline, p.model, None)
        rows = parity("smallcnn shapes 64 px", p.pipeline, p.model, p.backend.core, layer, images, top)

        torch.manual_seed(0)
        card = ModelCard("classify", "resnet18", [str(i) for i in range(10)],
                         InputSpec(224, 224, 3, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225)),
                         model_kwargs={"drop_rate": 0.0})
        pipe = pipeline_for(card)
        model = pipe.build().eval()
        core = pipe.core(model).eval()
        big = torch.rand(max(4, args.images // 4), 3, 224, 224, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            top = core(big).argmax(1).tolist()
        rows += parity("resnet18 224 px (init)", pipe, model, core, model.layer4, big, top)

        det_run = Path(tmp) / "det"
        cnnkit.train("detect", data="shapes", time=args.det_minutes, out=str(det_run), verbose=False)
        quality = {}
        for task, run in (("classify", cls_run), ("detect", det_run)):
            r = cnnkit.explain(task, run, data="shapes", limit=args.images, method="all", eval=True,
                               out=str(Path(tmp) / f"maps-{task}"), verbose=True)
            grid(r["rows"], DOCS / f"explain_{task}.png")
            quality[task] = {"summary": r["summary"], "layer": r["layer"],
                             "metric": cnnkit.val(task, run, "shapes", verbose=False).get(
                                 "top1" if task == "classify" else "map50_95")}
    save("explain_gradcam", {"images": args.images, "epochs": args.epochs, "det_minutes": args.det_minutes,
                             "parity": rows, "quality": quality})


if __name__ == "__main__":
    main()
