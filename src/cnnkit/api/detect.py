"""Object detection workflows behind ``cnnkit detect train|val|predict|anchors``.

Wires detection data (:mod:`cnnkit.data.detection` and the readers in ``data/formats``),
the detectors (:mod:`cnnkit.models.detection.zoo`), the task (:mod:`cnnkit.tasks.detect.task`)
and the Trainer together.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cnnkit
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import (
    copy_matching_weights,
    open_run,
    resolve_config,
    run_trainer,
    standard_hooks,
    write_run_results,
)
from cnnkit.api.classify import TrainResult
from cnnkit.core.results import Detections
from cnnkit.data.classification import make_loader
from cnnkit.data.decode import list_sources
from cnnkit.data.detection import (
    DetectionData,
    DetectionDataset,
    load_detection_data,
    parse_det_aug,
)
from cnnkit.engine.checkpoint import resolve_weights
from cnnkit.engine.progress import console
from cnnkit.engine.trainer import Trainer
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.detect.config import DetectConfig
from cnnkit.tasks.detect.task import DetectMetrics, DetectTask, draw_detections
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything

DEFAULT_AUG = "flip,scale=0.7:1.3,translate=0.1,color=0.3"


def config_from_file(path: str | Path, overrides: dict[str, Any], _cls: type = DetectConfig) -> DetectConfig:
    return _config_from_file(_cls, _cls.TASK, path, overrides)


def build_model(arch: str, num_classes: int, in_chans: int = 3, imgsz: int = 320, backbone: str | None = None,
                anchors: list | None = None, width: int = 16, pretrained: bool = False) -> torch.nn.Module:
    """The detector of a model card (``in_chans`` is always 3 for detection)."""
    from cnnkit.models.detection.zoo import build_detector

    kwargs = {"width": width} if arch == "fastdet" else {}
    return build_detector(arch, num_classes, imgsz, backbone, pretrained, anchors, **kwargs)


def _data(cfg_data: str, seed: int, imgsz: int | None, classes: int = 8, max_objects: int = 6,
          verbose: bool = True, masks: bool = False) -> DetectionData:
    data = load_detection_data(cfg_data, imgsz, seed=seed, num_classes=classes, max_objects=max_objects,
                               masks=masks) if cfg_data == "shapes" else load_detection_data(cfg_data)
    if verbose:
        for w in data.warnings:
            console().print(f"[yellow]warning:[/] {w}")
    return data


def _default_imgsz(data: DetectionData) -> int:
    return 320


def train(cfg: DetectConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          _cls: type = DetectConfig, **overrides: Any) -> TrainResult:
    """Train a detector; the Python twin of ``cnnkit detect train``.

    Returns:
        :class:`~cnnkit.api.classify.TrainResult`; ``metrics`` holds the validation
        ``map50_95``, ``map50``, ``map75``, ``per_class_ap``, size and occlusion APs.

    Examples:
        >>> result = cnnkit.train("detect", data="shapes", model="fastdet", epochs=30)
        >>> result.metrics["map50"]
    """
    from cnnkit.models.detection.anchors import read_anchors, scale_anchors

    con = console()
    kind = _cls.TASK
    masks = kind == "instance"
    cfg, ckpt, run = resolve_config(_cls, kind, cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = _data(cfg.data, cfg.seed, cfg.imgsz, cfg.classes, cfg.max_objects, verbose, masks)
    imgsz = cfg.imgsz or _default_imgsz(data)
    train_recs, val_recs = data.split("train"), data.split("val")
    if not train_recs:
        raise DataError(f"the train split of '{cfg.data}' has no images")
    if not val_recs:
        raise DataError(f"the val split of '{cfg.data}' has no images")
    anchors = None
    if cfg.anchors:
        levels, a_imgsz = read_anchors(cfg.anchors)
        anchors = [np.asarray(lv, np.float64).tolist() for lv in scale_anchors(levels, a_imgsz, imgsz)]
    aug = cfg.aug if cfg.aug is not None else DEFAULT_AUG
    model_kwargs = {"imgsz": imgsz, "backbone": cfg.backbone, "anchors": anchors}
    if cfg.model == "fastdet":
        model_kwargs["width"] = cfg.width
    model = build_model(cfg.model, len(data.names), 3, pretrained=cfg.pretrained, **model_kwargs)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init)
        if verbose and note:
            con.print(f"[yellow]note:[/] {note}")
    task = DetectTask(data.names, data.category_ids if hasattr(data, "category_ids") else None, masks)
    model.set_thresholds(0.001, cfg.iou, cfg.max_det, cfg.nms)
    gen = torch.Generator().manual_seed(cfg.seed)
    if masks and "occlude" in aug:
        raise CnnkitError("occlude paints over objects without changing their masks; leave it out for instance masks")
    if masks and verbose:
        bare, total = sum(r.maskless() for r in train_recs), sum(len(r.labels) for r in train_recs)
        if bare:
            con.print(f"[yellow]warning:[/] {bare} of {total} training objects have no mask or polygon "
                      "(box-only labels); Mask R-CNN learns their boxes, filled, as their masks")
    train_ds = DetectionDataset(train_recs, imgsz, parse_det_aug(aug, imgsz), cfg.mosaic, masks=masks)
    val_ds = DetectionDataset(val_recs, imgsz, masks=masks, full_masks=True)
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, drop_last=len(train_ds) > cfg.batch,
                               pin_memory=pin)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
    run = open_run(cfg, kind, run)
    card = {
        "task": kind, "arch": cfg.model, "model_kwargs": model_kwargs,
        "classes": data.names, "num_classes": len(data.names), "in_chans": 3, "imgsz": [imgsz, imgsz],
        "preprocess": {"resize": "letterbox", "imgsz": imgsz, "pad": 114, "input": "rgb 0-1"},
        "category_ids": getattr(data, "category_ids", None), "cnnkit_version": cnnkit.__version__,
        "iou": cfg.iou, "nms": cfg.nms, "max_det": cfg.max_det,
        "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "aug": aug, "mosaic": cfg.mosaic,
                    "classes": cfg.classes, "max_objects": cfg.max_objects,
                    "pretrained": cfg.pretrained, "init": cfg.init,
                    "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
    }
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, kind, verbose)
    return _finish(cfg, run, data, trainer, device, train_time, verbose)


def _load_init(model: torch.nn.Module, init: str) -> str:
    """Start from a detector's or a classifier's weights (a classifier fills the backbone)."""
    return copy_matching_weights(model, init, ("", "net.backbone.features.body.", "net.backbone.fpn.features.body."))


def _finish(cfg: DetectConfig, run, data: DetectionData, trainer: Trainer, device: torch.device,
            train_time: float, verbose: bool) -> TrainResult:
    from cnnkit.utils.plotting import plot_curves

    con = console()
    best = load(run.best, device=str(device), task=cfg.TASK)
    val_metrics = evaluate(best, data.split("val"), batch=cfg.batch * 2, workers=cfg.workers)
    test_metrics = None
    if data.splits.get("test"):
        test_metrics = evaluate(best, data.split("test"), batch=cfg.batch * 2, workers=cfg.workers)
    results = write_run_results(trainer, run, val_metrics, test_metrics, train_time)
    plot_curves(trainer.history, run.plots / "results.png",
                ["mask_map50_95", "map50_95", "mask_map50"] if best.pipeline.masks else ["map50_95", "map50"])
    draw_samples(best, data.split("val")[:16], run.plots / "val_predictions.png")
    if verbose:
        con.print(metrics_table(val_metrics, f"validation (best epoch {trainer.best_epoch})"))
        line = _line(val_metrics, "val")
        if test_metrics is not None:
            line += "  ·  " + _line(test_metrics, "test")
        con.print(line + f"  ·  trained {train_time:.0f} s")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, test_metrics, trainer.best_epoch, dict(trainer.skipped))


def _line(m: dict[str, Any], split: str) -> str:
    line = f"{split} mAP50-95 {m['map50_95']:.4f}  mAP50 {m['map50']:.4f}  mAP75 {m['map75']:.4f}"
    if m.get("mask_map50_95") is not None:
        line = (f"{split} mask mAP50-95 {m['mask_map50_95']:.4f}  mask mAP50 {m['mask_map50']:.4f}  "
                f"box mAP50-95 {m['map50_95']:.4f}  box mAP50 {m['map50']:.4f}")
    return line


def metrics_table(m: dict[str, Any], title: str):
    """Per-class AP (and mask AP for instance models) plus AP by object size and by occlusion,
    as a rich table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("group")
    t.add_column("AP50-95", justify="right")
    t.add_column("AP50", justify="right")
    t.add_column("objects", justify="right")

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    masks = m.get("mask_per_class_ap")
    if masks is not None:
        t.add_column("mask AP50-95", justify="right")
    counts = m.get("per_class_gt", {})
    for name, ap in m.get("per_class_ap", {}).items():
        extra = [f(masks.get(name))] if masks is not None else []
        t.add_row(name, f(ap), f(m.get("per_class_ap50", {}).get(name)), str(counts.get(name, "")), *extra)
    for key, label in (("size_ap", "size"), ("occlusion_ap", "occluded")):
        for bucket, v in (m.get(key) or {}).items():
            t.add_row(f"{label} {bucket}", f(v.get("map50_95")), f(v.get("map50")), str(v.get("num_gt", "")))
    return t


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


def evaluate(model: Predictor, records, batch: int = 32, workers: int = 0, conf: float = 0.001,
             keep_predictions: bool = False):
    """COCO metrics of ``records`` (original-image pixels) on either backend; with
    ``keep_predictions`` also the raw predictions for ``--save-json``."""
    pipe = model.pipeline
    task = DetectTask(model.classes, model.card.extra.get("category_ids"), pipe.masks)
    loader = make_loader(DetectionDataset(records, pipe.size, masks=pipe.masks, full_masks=True), batch, False,
                         workers, task.collate)
    state = DetectMetrics(model.classes, model.card.extra.get("category_ids"), keep_predictions, pipe.masks)
    skipped: list = []
    for b in loader:
        skipped += b.get("skipped", [])
        if not len(b["targets"]):
            continue
        x = b["images"].float().div_(255)
        state.update(pipe.detections(model.raw(x), conf), b)
    metrics = state.compute()
    if skipped:
        metrics["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    return (metrics, state.predictions) if keep_predictions else metrics


def draw(model: Predictor, result: Detections, image=None) -> torch.Tensor:
    """The image of ``result`` with its boxes (and masks) drawn (uint8 (3, H, W))."""
    from cnnkit.data.decode import read_image

    img = read_image(image if image is not None else result.path, channels=3).contiguous()
    return draw_detections(img, result.boxes, result.labels, result.scores, model.classes, masks=result.masks)


def draw_samples(model: Predictor, records, path: Path, conf: float = 0.25) -> None:
    """A grid of ``records`` with predicted boxes (ground truth in white) as a PNG."""
    from torchvision.utils import make_grid, save_image

    pipe = model.pipeline
    ds = DetectionDataset(records, pipe.size, masks=pipe.masks)
    tiles = []
    for i in range(len(records)):
        x, t = ds[i]
        if x is None:
            continue
        o = pipe.detections(model.raw(x[None].float() / 255), conf)[0]
        img = draw_detections(x, t["boxes"], [0] * len(t["boxes"]), [1.0] * len(t["boxes"]),
                              ["gt"], width=1) if len(t["boxes"]) else x
        masks = (o["masks"][:, 0].cpu() >= 0.5) if "masks" in o else None
        tiles.append(draw_detections(img, o["boxes"].cpu(), o["labels"].cpu(), o["scores"].cpu(), model.classes,
                                     masks=masks))
    if tiles:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(torch.stack(tiles).float() / 255, nrow=4, padding=2), str(path))


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
        ds = _data("shapes", trained.get("seed", 0), pipe.size, card.num_classes, trained.get("max_objects", 6),
                   verbose, pipe.masks)
    else:
        ds = _data(data, 0, None, verbose=verbose)
    if list(ds.names) != m.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(m.classes)})")
    records = ds.split(split)
    if not records:
        raise DataError(f"the {split} split of '{data}' has no images")
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
    if json_path:
        write_json(json_path, metrics)
    if verbose:
        con = console()
        con.print(metrics_table(metrics, f"{split} split of {data} ({len(records)} images)"))
        con.print(_line(metrics, split))
        if save_json:
            con.print(f"COCO-format detections in {save_json}")
    return metrics


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
    ds = _data(data, seed, imgsz, verbose=verbose) if data != "shapes" else _data("shapes", seed, imgsz)
    size = imgsz or _default_imgsz(ds)
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
