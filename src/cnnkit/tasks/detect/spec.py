"""Object detection's and instance segmentation's workflow spec: data (shapes, YOLO, COCO,
VOC), the detector, task and card for a run, the final COCO evaluation through the predictor
(box AP, and mask AP for Mask R-CNN), drawn samples and tables."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.data.classification import make_loader
from cnnkit.data.defaults import derive_imgsz, resolve_batch_lr
from cnnkit.data.detection import (
    DetectionData,
    DetectionDataset,
    load_detection_data,
    parse_det_aug,
)
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import Evaluation, Setup, WorkflowSpec, provenance
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor, show_objects
from cnnkit.tasks.detect.config import DetectConfig, InstanceConfig
from cnnkit.tasks.detect.task import DetectMetrics, DetectTask, draw_detections

DEFAULT_AUG = "flip,scale=0.7:1.3,translate=0.1,color=0.3"
DEFAULT_IMGSZ = 320


def load_data(spec: str, seed: int, imgsz: int | None, classes: int = 8, max_objects: int = 6,
              verbose: bool = True, masks: bool = False, scenes: int | None = None) -> DetectionData:
    """``--data`` for detection (shapes with its generator settings and ``scenes`` training
    scenes, default 400; or a dataset file); the readers' warnings are printed when ``verbose``."""
    from cnnkit.data import detection

    sizes = None if scenes is None else {**detection.SHAPES_DET_SIZES, "train": scenes}
    data = load_detection_data(spec, imgsz, seed=seed, num_classes=classes, max_objects=max_objects,
                               masks=masks, sizes=sizes) if spec == "shapes" else load_detection_data(spec)
    if verbose:
        for w in data.warnings:
            console().print(f"[yellow]warning:[/] {w}")
    return data


class DetectSpec(WorkflowSpec):
    """``detect`` (any detector) and, with ``masks``, ``instance`` (Mask R-CNN)."""

    def __init__(self, masks: bool = False):
        self.masks = masks
        self.config = InstanceConfig if masks else DetectConfig
        self.curves = ("mask_map50_95", "map50_95", "mask_map50") if masks else ("map50_95", "map50")

    def setup(self, cfg: DetectConfig, device, verbose: bool, resuming: bool) -> Setup:
        from cnnkit.models.detection.anchors import read_anchors, scale_anchors
        from cnnkit.models.detection.zoo import build_detector
        from cnnkit.models.finetune import copy_matching_weights

        con, masks = console(), self.masks
        data = load_data(cfg.data, cfg.seed, cfg.imgsz, cfg.classes, cfg.max_objects, verbose, masks, cfg.scenes)
        train_recs, val_recs = data.split("train"), data.split("val")
        derived: dict = {}  # letterboxed: the longer side counts
        derive_imgsz(cfg, derived, [r.path for r in train_recs], 32, DEFAULT_IMGSZ, side="long")
        imgsz = cfg.imgsz or DEFAULT_IMGSZ
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
        extra = {"width": cfg.width, "illumination": cfg.illumination} if cfg.model == "fastdet" else {}
        model = build_detector(cfg.model, len(data.names), imgsz, cfg.backbone, cfg.pretrained, anchors, **extra)
        if cfg.init and not resuming:  # a detector's or a classifier's weights (a classifier fills the backbone)
            note = copy_matching_weights(model, cfg.init, ("", "net.backbone.features.body.",
                                                           "net.backbone.fpn.features.body."))
            if verbose and note:
                con.print(f"[yellow]note:[/] {note}")
        category_ids = getattr(data, "category_ids", None)
        from cnnkit.tasks.detect.losses import FastDetLoss

        task = DetectTask(data.names, category_ids, masks, FastDetLoss.for_model(model) if cfg.model == "fastdet" else None)
        model.set_thresholds(0.001, cfg.iou, cfg.max_det, cfg.nms)
        if masks and "occlude" in aug:
            raise CnnkitError("occlude paints over objects without changing their masks; leave it out for instance masks")
        if masks and verbose:
            bare, total = sum(r.maskless() for r in train_recs), sum(len(r.labels) for r in train_recs)
            if bare:
                con.print(f"[yellow]warning:[/] {bare} of {total} training objects have no mask or polygon "
                          "(box-only labels); Mask R-CNN learns their boxes, filled, as their masks")
        train_ds = DetectionDataset(train_recs, imgsz, parse_det_aug(aug, imgsz), cfg.mosaic, masks=masks)
        resolve_batch_lr(cfg, derived, len(train_recs), all(r.path for r in train_recs))
        val_ds = DetectionDataset(val_recs, imgsz, masks=masks, full_masks=True)
        pin = device.type == "cuda"
        gen = torch.Generator().manual_seed(cfg.seed)
        train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                                   drop_last=len(train_ds) > cfg.batch, pin_memory=pin)
        val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
        names = ("scores", "boxes") if cfg.model == "fastdet" else ("boxes", "scores", "labels") + (
            ("masks",) if masks else ())
        card = ModelCard(self.name, cfg.model, list(data.names), InputSpec(imgsz, imgsz, 3, "letterbox",
                                                                     illumination=cfg.illumination),
                         OutputSpec(names, "fastdet" if cfg.model == "fastdet" else "detections"), model_kwargs,
                         {"iou": cfg.iou, "nms": cfg.nms, "max_det": cfg.max_det},
                         provenance(cfg, aug=aug, mosaic=cfg.mosaic, classes=cfg.classes, max_objects=cfg.max_objects,
                                    scenes=cfg.scenes),
                         extra={"category_ids": category_ids})
        return Setup(model, task, train_loader, val_loader, card, data, derived=derived)

    def evaluate(self, cfg: DetectConfig, setup: Setup, predictor, split: str, keep: int = 0):
        return evaluate(predictor, setup.data.split(split), cfg.batch * 2, cfg.workers), []

    def line(self, m: dict[str, Any], split: str) -> str:
        if m.get("mask_map50_95") is not None:
            return (f"{split} mask mAP50-95 {m['mask_map50_95']:.4f}  mask mAP50 {m['mask_map50']:.4f}  "
                    f"box mAP50-95 {m['map50_95']:.4f}  box mAP50 {m['map50']:.4f}")
        return f"{split} mAP50-95 {m['map50_95']:.4f}  mAP50 {m['map50']:.4f}  mAP75 {m['map75']:.4f}"

    def report(self, cfg, run, setup, predictor, trainer, val, test, kept, verbose) -> None:
        draw_samples(predictor, setup.data.split("val")[:16], run.plots / "val_predictions.png")
        if verbose:
            console().print(metrics_table(val, f"validation (best epoch {trainer.best_epoch})"))

    # ---- val and predict
    load_options = ("iou", "nms")
    call_options = ("conf", "max_det")

    def val_records(self, model, data: str, split: str, verbose: bool) -> list:
        from cnnkit.engine.workflow import eval_records

        card, pipe = model.card, model.pipeline
        if data == "shapes":  # the scenes the model was trained on: its seed, size and generator settings
            trained = card.provenance
            ds = load_data("shapes", trained.get("seed", 0), pipe.size, card.num_classes,
                           trained.get("max_objects", 6), verbose, pipe.masks,
                           trained.get("scenes") if split == "train" else 0)
        else:
            ds = load_data(data, 0, None, verbose=verbose)
        return eval_records(model, ds, data, split)

    def record_input(self, records, i: int):
        return records[i].load()

    def explain_truth(self, records, i: int) -> list:
        """Every ground-truth object (the detection matching it is explained) and its box's pixels."""
        import numpy as np

        r = records[i]
        out = []
        for box, label in zip(r.boxes, r.labels):
            mask = np.zeros((int(r.height), int(r.width)), bool)
            x1, y1, x2, y2 = np.round(box).astype(int)
            mask[max(0, y1):y2, max(0, x1):x2] = True
            out.append(({"box": box.tolist(), "label": int(label)}, mask))
        return out

    def val_metrics(self, model, records, options: dict[str, Any]) -> Evaluation:
        """COCO metrics; ``save_json`` also writes the detections in COCO results format (with
        RLE masks for instance models)."""
        from cnnkit.tasks.detect.metrics import coco_results
        from cnnkit.utils.io import write_json

        metrics, preds = evaluate(model, records, options["batch"], options["workers"], options["conf"],
                                  keep_predictions=True)
        metrics["num_images"] = len(records)
        skipped = metrics.pop("skipped_images", [])
        notes = []
        if options["save_json"]:
            res = coco_results([p[0] for p in preds], [p[1] for p in preds], [p[2] for p in preds],
                               [p[3] for p in preds], model.card.extra.get("category_ids"))
            if model.pipeline.masks:  # results come out in the order of preds and of each image's detections
                for d, r in zip(res, [r for p in preds for r in p[4]]):
                    d["segmentation"] = {"size": [int(v) for v in r["size"]], "counts": r["counts"].decode("ascii")}
            write_json(options["save_json"], res)
            notes.append(f"COCO-format detections in {options['save_json']}")
        return Evaluation(metrics, skipped=skipped, notes=notes)

    def val_table(self, metrics: dict[str, Any], title: str):
        return metrics_table(metrics, title)

    def save_results(self, model, results: list, out: Path, options: dict[str, Any]) -> str:
        from PIL import Image

        for r in results:
            Image.fromarray(draw(model, r).permute(1, 2, 0).numpy()).save(out / (Path(r.path).stem + ".png"))
        return f"drawn boxes in {out}/"

    def result_line(self, model, r) -> str:
        counts: dict[str, int] = {}
        for c in r.labels.tolist():
            counts[model.classes[c]] = counts.get(model.classes[c], 0) + 1
        what = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "no objects"
        return f"{r.path}: {r.width}x{r.height}, {what}"


DETECT, INSTANCE = DetectSpec(), DetectSpec(masks=True)


def draw(model: Predictor, result, image=None) -> torch.Tensor:
    """The image of a :class:`~cnnkit.core.results.Detections` ``result`` with its boxes (and
    masks) drawn (uint8 (3, H, W))."""
    from cnnkit.data.decode import read_image

    img = read_image(image if image is not None else result.path, channels=3).contiguous()
    return draw_detections(img, result.boxes, result.labels, result.scores, model.classes, masks=result.masks)


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
        show_objects(model, [t["boxes"] for t in b["targets"]])  # letterboxed pixels: the core's input
        state.update(pipe.detections(model.raw(x), conf), b)
    metrics = state.compute()
    if skipped:
        metrics["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    return (metrics, state.predictions) if keep_predictions else metrics


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
