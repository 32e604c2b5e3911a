"""``cnnkit detect anchors``: anchors fitted to a dataset's boxes (k-means with IoU distance),
compared with the defaults by best-possible recall, written for ``--anchors``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from cnnkit.engine.progress import console
from cnnkit.errors import CnnkitError, DataError
from cnnkit.tasks.detect.spec import DEFAULT_IMGSZ, load_data


def anchors(data: str, k: int | None = None, model: str = "fasterrcnn", imgsz: int | None = None,
            out: str | Path = "anchors.yaml", thr: float = 0.5, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    """Fit anchors to a dataset's boxes by k-means with IoU distance and compare best-possible
    recall of the default and the fitted anchors; write them for ``--anchors``."""
    from cnnkit.data.detection import all_boxes_wh
    from cnnkit.models.detection.anchors import (
        anchor_pairs,
        best_possible_recall,
        kmeans_anchors,
        mean_best_iou,
        split_levels,
        write_anchors,
    )
    from cnnkit.models.detection.zoo import default_anchors

    if model not in ("fasterrcnn", "retinanet"):
        raise CnnkitError(f"anchors are fitted for fasterrcnn or retinanet, not '{model}' (fastdet is anchor-free)")
    ds = load_data(data, seed, imgsz, verbose=verbose) if data != "shapes" else load_data("shapes", seed, imgsz)
    size = imgsz or DEFAULT_IMGSZ
    wh = all_boxes_wh(ds.split("train"), size)
    wh = wh[(wh > 0).all(1)]
    if len(wh) == 0:
        raise DataError(f"the train split of '{data}' has no boxes to fit anchors to")
    sizes, ratios = default_anchors(model, size)
    current = np.concatenate(anchor_pairs(sizes, ratios))
    levels = 5
    k = k or 15  # 3 anchors for each of the 5 levels
    fitted = kmeans_anchors(wh, k, seed=seed)
    per_level = split_levels(fitted, levels)
    report = {
        "boxes": len(wh), "imgsz": size, "model": model, "k": k, "thr": thr,
        "current": {"anchors": len(current), "bpr": best_possible_recall(wh, current, thr),
                    "mean_best_iou": mean_best_iou(wh, current)},
        "fitted": {"anchors": len(fitted), "bpr": best_possible_recall(wh, fitted, thr),
                   "mean_best_iou": mean_best_iou(wh, fitted)},
    }
    write_anchors(out, per_level, size, meta=report)
    report["file"] = str(out)
    if verbose:
        con = console()
        con.print(f"{len(wh)} boxes at {size} px; best-possible recall at shape-IoU >= {thr}:")
        for key in ("current", "fitted"):
            r = report[key]
            con.print(f"  {key:<8} {r['anchors']:>3} anchors  BPR {r['bpr']:.4f}  mean best IoU {r['mean_best_iou']:.4f}")
        con.print(f"wrote {out}; train with --anchors {out} (--model {model})")
    return report
