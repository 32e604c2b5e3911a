"""Semantic segmentation's workflow spec: data (shapes or mask folders), the segmenter, task
and card for a run, the final evaluation at each image's original size through the predictor,
drawn samples and tables; plus the predictor-side helpers ``scores``, ``evaluate``,
``draw_samples`` and ``overlay`` that ``val`` and ``predict`` use."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cnnkit.core.card import InputSpec, ModelCard, OutputSpec
from cnnkit.data.classification import make_loader
from cnnkit.data.defaults import derive_imgsz, resolve_batch_lr
from cnnkit.data.segmentation import (
    IGNORE_INDEX,
    SHAPES_SEG_SIZES,
    SegmentationData,
    SegmentationDataset,
    SegRecord,
    load_segmentation_data,
    palette_bytes,
    write_mask,
)
from cnnkit.engine.progress import console
from cnnkit.engine.workflow import Evaluation, Setup, WorkflowSpec, provenance
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor, show_objects, wants_objects
from cnnkit.tasks.segment.config import SegmentConfig
from cnnkit.tasks.segment.task import SegmentTask, SegMetrics

DEFAULT_AUG = "flip,vflip"  # with SegmentConfig.DEFAULT_LR: see the comment there


def load_data(spec: str, seed: int, imgsz: int | None, classes: int = 4, max_objects: int = 4,
          scenes: int | None = None) -> SegmentationData:
    if spec == "shapes":
        sizes = None if scenes is None else {**SHAPES_SEG_SIZES, "train": scenes}
        return load_segmentation_data("shapes", imgsz, seed=seed, num_classes=classes, max_objects=max_objects,
                                      sizes=sizes)
    return load_segmentation_data(spec)


def default_imgsz(data: SegmentationData) -> int:
    return 128 if data.name == "shapes" else 256


def parse_seg_aug(spec: str | None, imgsz: int) -> list:
    """Segmentation augmentation: the detection names (masks move with geometric transforms,
    nearest-neighbour) except ``occlude``, which paints over objects and needs boxes."""
    from cnnkit.data.detection import parse_det_aug
    from cnnkit.data.transforms import split_aug

    if any(name == "occlude" for name, _ in split_aug(spec)):
        raise CnnkitError("occlude paints patches over boxes and is for detection; use erase=P for segmentation")
    return parse_det_aug(spec, imgsz)


def class_weights_from(spec: str | None, records: list[SegRecord], num_classes: int) -> torch.Tensor | None:
    """``auto``: ``1 / sqrt(pixel frequency)`` over the train masks, scaled to mean 1 (classes
    never seen get the largest weight); or explicit comma-separated weights."""
    if spec in (None, "", "none"):
        return None
    if spec == "auto":
        counts = np.zeros(num_classes, np.float64)
        for r in records:
            m = r.load_mask().numpy()
            counts += np.bincount(m[m != IGNORE_INDEX].ravel(), minlength=num_classes)[:num_classes]
        freq = counts / max(1.0, counts.sum())
        w = 1.0 / np.sqrt(np.maximum(freq, freq[freq > 0].min() if (freq > 0).any() else 1.0))
        return torch.tensor(w / w.mean(), dtype=torch.float32)
    try:
        w = [float(v) for v in str(spec).split(",")]
    except ValueError:
        raise CnnkitError(f"--class-weights takes 'auto' or {num_classes} comma-separated numbers, got '{spec}'") from None
    if len(w) != num_classes or min(w) < 0:
        raise CnnkitError(f"--class-weights needs {num_classes} non-negative numbers (one per class), got {len(w)}")
    return torch.tensor(w, dtype=torch.float32)


def scores(model: Predictor, image: torch.Tensor) -> torch.Tensor:
    """Class scores ``(K, H, W)`` of one uint8 image at its original size."""
    x, meta = model.pipeline.prepare(image)
    return model.pipeline.scores(model.raw(x[None], [meta]), meta)


def object_boxes(mask: torch.Tensor) -> torch.Tensor:
    """The objects of a class-index mask ``(H, W)``: each connected region (8-connected) of a
    foreground class (not background, not ignored pixels), as ``(N, 4)`` float xyxy boxes in
    pixels (x2/y2 exclusive)."""
    import numpy as np
    from scipy import ndimage

    m = np.asarray(mask)
    boxes = []
    for c in np.unique(m):
        if c in (0, IGNORE_INDEX):
            continue
        regions, _ = ndimage.label(m == c, structure=np.ones((3, 3), bool))
        boxes += [(sx.start, sy.start, sx.stop, sy.stop) for sy, sx in ndimage.find_objects(regions)]
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


def evaluate(model: Predictor, records: list[SegRecord]) -> dict[str, Any]:
    """mIoU, Dice, pixel accuracy and per-class IoU/Dice of ``records`` at original size."""
    from cnnkit.errors import ImageDecodeError

    ds = SegmentationDataset(records, None, len(model.classes), train=False)
    state = SegMetrics(model.classes)
    skipped = []
    for i in range(len(ds)):
        try:
            img, mask = ds.load(i)
        except ImageDecodeError as e:  # reported, as training skips it too
            skipped.append({"path": e.path, "reason": e.reason})
            continue
        if wants_objects(model) and not model.pipeline.tile:  # whole image resized (tiles have no objects of their own)
            h, w = model.pipeline.size
            show_objects(model, [object_boxes(mask) * torch.tensor([w, h, w, h]) / torch.tensor(
                [mask.shape[1], mask.shape[0]] * 2)])
        state.add_predictions(scores(model, img).argmax(0).cpu(), mask.long())
    out = state.compute()
    out["num_images"] = len(records) - len(skipped)
    if skipped:
        out["skipped_images"] = skipped
    return out


def draw_samples(model: Predictor, records: list[SegRecord], path: Path) -> None:
    """Rows of image | ground truth | prediction (masks blended over the image) as a PNG."""
    from torchvision.utils import make_grid, save_image

    from cnnkit.errors import ImageDecodeError

    ds = SegmentationDataset(records, None, len(model.classes), train=False)
    tiles = []
    for i in range(len(ds)):
        try:
            img, mask = ds.load(i)
        except ImageDecodeError:
            continue
        tiles += [img, overlay(img, mask), overlay(img, scores(model, img).argmax(0).cpu())]
    if tiles:
        size = max(max(t.shape[-2:]) for t in tiles)
        tiles = [F.interpolate(t[None].float(), size=(size, size), mode="nearest")[0] for t in tiles]
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        save_image(make_grid(torch.stack(tiles) / 255, nrow=6, padding=2), str(path))


def overlay(image: torch.Tensor, mask: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """uint8 (3, H, W): ``image`` with each non-background class painted in its palette colour
    (Pascal VOC's palette, the one mask PNGs carry); ignored pixels (255) stay as they are."""
    pal = torch.tensor(palette_bytes(), dtype=torch.float32).view(256, 3)
    m = mask.long().clamp(0, 255)
    color = pal[m].permute(2, 0, 1)
    paint = ((m > 0) & (m != IGNORE_INDEX))[None]
    out = torch.where(paint, image.float() * (1 - alpha) + color * alpha, image.float())
    return out.round().clamp(0, 255).to(torch.uint8)


def metrics_table(m: dict[str, Any], title: str):
    """IoU and Dice per class as a rich table."""
    from rich.table import Table

    t = Table(title=title, title_justify="left")
    t.add_column("class")
    t.add_column("IoU", justify="right")
    t.add_column("Dice", justify="right")
    for name, iou in m["per_class_iou"].items():
        d = m["per_class_dice"][name]
        t.add_row(name, "-" if iou is None else f"{iou:.3f}", "-" if d is None else f"{d:.3f}")
    return t


class SegmentSpec(WorkflowSpec):
    config = SegmentConfig
    curves = ("miou", "dice", "pixel_acc")

    def setup(self, cfg: SegmentConfig, device, verbose: bool, resuming: bool) -> Setup:
        from cnnkit.models.finetune import copy_matching_weights
        from cnnkit.models.segmentation import build_segmenter

        data = load_data(cfg.data, cfg.seed, cfg.imgsz, cfg.classes, cfg.max_objects, cfg.scenes)
        train_recs, val_recs = data.splits.get("train", []), data.splits.get("val", [])
        derived: dict = {}
        if not cfg.crop:  # (crops keep the images' scale: no size to derive)
            derive_imgsz(cfg, derived, [r.path for r in train_recs], 32, default_imgsz(data))
        imgsz = cfg.imgsz or default_imgsz(data)
        if not train_recs:
            raise DataError(f"the train split of '{cfg.data}' has no images")
        if not val_recs:
            raise DataError(f"the val split of '{cfg.data}' has no images")
        k = len(data.names)
        aug = cfg.aug if cfg.aug is not None else DEFAULT_AUG
        model = build_segmenter(cfg.model, k, 3, cfg.encoder, cfg.pretrained, cfg.illumination)
        if cfg.init and not resuming:  # a segmenter's or a classifier's weights (a classifier fills the encoder)
            note = copy_matching_weights(model, cfg.init, ("", "encoder.features.body."))
            if verbose:
                console().print(f"[yellow]note:[/] {note}")
        task = SegmentTask(data.names, cfg.loss, class_weights_from(cfg.class_weights, train_recs, k))
        mode = "crop" if cfg.crop else "resize"
        train_ds = SegmentationDataset(train_recs, imgsz, k, parse_seg_aug(aug, imgsz), mode=mode)
        resolve_batch_lr(cfg, derived, len(train_recs), all(r.path for r in train_recs))
        val_ds = SegmentationDataset(val_recs, imgsz, k, mode=mode, train=False)
        gen = torch.Generator().manual_seed(cfg.seed)
        pin = device.type == "cuda"
        train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                                   drop_last=len(train_ds) > cfg.batch, pin_memory=pin)
        val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
        card = ModelCard("segment", cfg.model, list(data.names),
                         InputSpec(imgsz, imgsz, 3, "tile" if cfg.crop else "resize", illumination=cfg.illumination),
                         OutputSpec(("logits",), "seg-logits"), {"encoder": model.encoder_name},
                         provenance=provenance(cfg, aug=aug, loss=cfg.loss, classes=cfg.classes,
                                               max_objects=cfg.max_objects, scenes=cfg.scenes),
                         extra={"ignore_index": IGNORE_INDEX})
        return Setup(model, task, train_loader, val_loader, card, data, derived=derived)

    def evaluate(self, cfg: SegmentConfig, setup: Setup, predictor, split: str, keep: int = 0):
        return evaluate(predictor, setup.data.split(split)), []

    def line(self, m: dict[str, Any], split: str) -> str:
        return f"{split} mIoU {m['miou']:.4f}  Dice {m['dice']:.4f}  pixel acc {m['pixel_acc']:.4f}"

    def report(self, cfg, run, setup, predictor, trainer, val, test, kept, verbose) -> None:
        draw_samples(predictor, setup.data.split("val")[:8], run.plots / "val_predictions.png")
        if verbose:
            console().print(metrics_table(val, f"validation (best epoch {trainer.best_epoch})"))

    # ---- val and predict
    load_options = ("tile",)

    def val_records(self, model, data: str, split: str, verbose: bool) -> list:
        from cnnkit.engine.workflow import eval_records

        if data == "shapes":  # the scenes the model was trained on: its seed, size and generator settings
            trained = model.card.provenance
            ds = load_data("shapes", trained.get("seed", 0), model.card.input.height,
                           trained.get("classes", len(model.classes) - 1), trained.get("max_objects", 4),
                           trained.get("scenes") if split == "train" else 0)
        else:
            ds = load_data(data, 0, None)
        return eval_records(model, ds, data, split)

    def record_input(self, records, i: int):
        return records[i].load_image()

    def explain_truth(self, records, i: int) -> list:
        """Every foreground class in the mask, with its pixels."""
        mask = records[i].load_mask().numpy()
        return [(int(c), mask == c) for c in sorted(set(mask.flatten().tolist()) - {0})]

    def val_metrics(self, model, records, options: dict[str, Any]) -> Evaluation:
        metrics = evaluate(model, records)
        return Evaluation(metrics, skipped=metrics.pop("skipped_images", []))

    def val_table(self, metrics: dict[str, Any], title: str):
        return metrics_table(metrics, title)

    def save_results(self, model, results: list, out: Path, options: dict[str, Any]) -> str:
        """``NAME_mask.png`` (class ids as a palette PNG) and ``NAME_overlay.png`` per image."""
        from PIL import Image

        from cnnkit.data.decode import read_image

        used: set[str] = set()
        for r in results:
            stem = Path(r.path).stem
            base, n = stem, 1
            while base in used:  # same name in two sub-folders
                n += 1
                base = f"{stem}_{n}"
            used.add(base)
            r.mask_file = str(out / f"{base}_mask.png")
            write_mask(r.mask_file, r.mask.numpy())
            img = read_image(r.path, channels=3)
            Image.fromarray(overlay(img, r.mask).permute(1, 2, 0).numpy()).save(out / f"{base}_overlay.png")
        return f"masks and overlays in {out}/"

    def result_line(self, model, r) -> str:
        fr = r.fractions()
        what = ", ".join(f"{k} {v:.0%}" for k, v in sorted(fr.items(), key=lambda kv: -kv[1]) if k != model.classes[0])
        return f"{r.path}: {r.width}x{r.height}, {what or 'background only'}"


SPEC = SegmentSpec()
