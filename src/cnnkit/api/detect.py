"""Object detection workflows behind ``cnnkit detect train|val|predict|anchors``.

Wires detection data (:mod:`cnnkit.data.detection` and the readers in ``data/formats``),
the detectors (:mod:`cnnkit.models.detection.zoo`), the task (:mod:`cnnkit.tasks.detect.task`)
and the Trainer together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.core.results import Detections
from cnnkit.data.decode import list_sources
from cnnkit.engine import workflow
from cnnkit.engine.checkpoint import resolve_weights
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import TrainResult
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.detect.config import DetectConfig, InstanceConfig
from cnnkit.tasks.detect.spec import (
    DEFAULT_IMGSZ,
    DETECT,
    INSTANCE,
    evaluate,
    load_data,
    metrics_table,
)
from cnnkit.tasks.detect.task import draw_detections
from cnnkit.utils.io import write_json


def config_from_file(path: str | Path, overrides: dict[str, Any], _cls: type = DetectConfig) -> DetectConfig:
    return _config_from_file(_cls, _cls.TASK, path, overrides)


def train(cfg: DetectConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          _cls: type = DetectConfig, **overrides: Any) -> TrainResult:
    """Train a detector; the Python twin of ``cnnkit detect train`` (``_cls=InstanceConfig``:
    ``cnnkit instance train``).

    Returns:
        :class:`~cnnkit.engine.workflow.TrainResult`; ``metrics`` holds the validation
        ``map50_95``, ``map50``, ``map75``, ``per_class_ap``, size and occlusion APs.

    Examples:
        >>> result = cnnkit.train("detect", data="shapes", model="fastdet", epochs=30)
        >>> result.metrics["map50"]
    """
    spec = INSTANCE if _cls is InstanceConfig else DETECT
    return workflow.train(spec, cfg, resume=resume, verbose=verbose, **overrides)


# ---------------------------------------------------------------------------------------
# Loading and using a trained detector
def load(path: str | Path, device: str = "cpu", task: str = "detect", iou: float | None = None,
         nms: str | None = None) -> Predictor:
    """A detector :class:`~cnnkit.runtime.pipeline.Predictor` (``task="instance"``: Mask
    R-CNN, each detection with a mask) from ``best.safetensors``, its run folder or an
    exported ``.onnx``. ``iou`` and ``nms`` (``hard`` or ``soft``) default to the card's.

    Examples:
        >>> det = cnnkit.load("runs/detect/train")
        >>> det("street.jpg", conf=0.25)[0].boxes
    """
    return load_predictor(path, device, task=task, iou=iou, nms=nms)


def draw(model: Predictor, result: Detections, image=None) -> torch.Tensor:
    """The image of ``result`` with its boxes (and masks) drawn (uint8 (3, H, W))."""
    from cnnkit.data.decode import read_image

    img = read_image(image if image is not None else result.path, channels=3).contiguous()
    return draw_detections(img, result.boxes, result.labels, result.scores, model.classes, masks=result.masks)


def val(weights: str | Path, data: str, split: str = "val", batch: int = 32, device: str = "auto",
        workers: int = 0, conf: float = 0.001, iou: float = 0.6, json_path: str | Path | None = None,
        save_json: str | Path | None = None, verbose: bool = True, nms: str | None = None,
        task: str = "detect") -> dict[str, Any]:
    """Evaluate a detector (``.safetensors``, run folder or ``.onnx``) on a dataset split: COCO
    mAP@[.5:.95], mAP50, mAP75, per-class AP, AR, AP by object size and by occlusion
    (``task="instance"``: also mask AP). ``save_json`` writes the detections in COCO results
    format (with RLE masks for instance models). ``nms`` (``hard`` or ``soft``) defaults to the
    one used in training."""
    from cnnkit.tasks.detect.metrics import coco_results

    m = load(weights, device, task, iou, nms)
    card, pipe = m.card, m.pipeline
    if data == "shapes":
        trained = card.provenance
        ds = load_data("shapes", trained.get("seed", 0), pipe.size, card.num_classes, trained.get("max_objects", 6),
                   verbose, pipe.masks)
    else:
        ds = load_data(data, 0, None, verbose=verbose)
    records = workflow.eval_records(m, ds, data, split)
    metrics, preds = evaluate(m, records, batch, workers, conf, keep_predictions=True)
    metrics.update(split=split, weights=str(resolve_weights(weights)), num_images=len(records),
                   backend=m.backend.name)
    if save_json:
        ids = [p[0] for p in preds]
        res = coco_results(ids, [p[1] for p in preds], [p[2] for p in preds], [p[3] for p in preds],
                           card.extra.get("category_ids"))
        if pipe.masks:  # results come out in the order of preds and of each image's detections
            rles = [r for p in preds for r in p[4]]
            for d, r in zip(res, rles):
                d["segmentation"] = {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
        write_json(save_json, res)
    return workflow.finish_val(metrics, json_path, verbose,
                               metrics_table(metrics, f"{split} split of {data} ({len(records)} images)"),
                               DETECT.line(metrics, split), notes=[f"COCO-format detections in {save_json}"] if save_json else [])


def predict(weights: str | Path, source: str | Path, conf: float = 0.25, iou: float = 0.5, max_det: int = 100,
            device: str = "auto", json_path: str | Path | None = None, save_dir: str | Path | None = None,
            verbose: bool = True, nms: str = "hard", task: str = "detect") -> list[dict[str, Any]]:
    """Detect objects in a file or folder; print a line per image and the time per stage;
    ``json_path`` writes the list of results (instance models add each object's ``mask`` as
    COCO RLE), ``save_dir`` PNGs with the boxes (and masks) drawn."""
    m = load(weights, device, task, iou, nms)
    skipped: list[tuple[str, str]] = []
    timing: dict[str, float] = {}
    results = m(list_sources(source), batch=8, conf=conf, max_det=max_det, skipped=skipped, timing=timing)
    con = console()
    if save_dir:
        from PIL import Image

        out = Path(save_dir)
        out.mkdir(parents=True, exist_ok=True)
        for r in results:
            Image.fromarray(draw(m, r).permute(1, 2, 0).numpy()).save(out / (Path(r.path).stem + ".png"))
    rows = [r.to_dict() for r in results]
    if json_path:
        write_json(json_path, rows)
    if verbose:
        for r in results:
            counts: dict[str, int] = {}
            for c in r.labels.tolist():
                counts[m.classes[c]] = counts.get(m.classes[c], 0) + 1
            what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no objects"
            con.print(f"{r.path}: {r.width}x{r.height}, {what}")
        n = max(1, timing["images"])
        con.print(f"speed: {timing['preprocess_ms'] / n:.1f} ms preprocess, {timing['inference_ms'] / n:.1f} ms "
                  f"inference, {timing['postprocess_ms'] / n:.1f} ms postprocess per image at "
                  f"{m.pipeline.size}x{m.pipeline.size} ({m.backend.name})")
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if save_dir:
            con.print(f"drawn boxes in {save_dir}/")
    return rows


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
