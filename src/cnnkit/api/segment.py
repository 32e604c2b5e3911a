"""Semantic segmentation workflows behind ``cnnkit segment train|val|predict``.

Wires segmentation data (:mod:`cnnkit.data.segmentation`), the networks
(:mod:`cnnkit.models.segmentation`), the task (:mod:`cnnkit.tasks.segment.task`) and the Trainer.
Two ways to feed images of any size, recorded in the model card so that val and predict
match training:

- ``resize`` (default): every image is resized to ``imgsz`` x ``imgsz``; predictions are
  resized back to the original size.
- ``crop`` (``--crop``): training takes random ``imgsz`` crops at the original resolution;
  val and predict slide an ``imgsz`` window over the whole image with overlap and Gaussian
  blending (MONAI's ``sliding_window_inference``), so large images keep their detail.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

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
from cnnkit.data.classification import make_loader
from cnnkit.data.decode import list_sources
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
from cnnkit.engine.trainer import Trainer
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.segment.config import SegmentConfig
from cnnkit.tasks.segment.task import SegmentTask, SegMetrics
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything

DEFAULT_AUG = "flip,affine,color=0.2"


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> SegmentConfig:
    return _config_from_file(SegmentConfig, "segment", path, overrides)


def build_model(arch: str, num_classes: int, in_chans: int = 3, encoder: str | None = None,
                pretrained: bool = False) -> torch.nn.Module:
    """The network of a model card."""
    from cnnkit.models.segmentation import build_segmenter

    return build_segmenter(arch, num_classes, in_chans, encoder, pretrained)


def _data(spec: str, seed: int, imgsz: int | None, classes: int = 4, max_objects: int = 4,
          scenes: int | None = None) -> SegmentationData:
    if spec == "shapes":
        sizes = None if scenes is None else {**SHAPES_SEG_SIZES, "train": scenes}
        return load_segmentation_data("shapes", imgsz, seed=seed, num_classes=classes, max_objects=max_objects,
                                      sizes=sizes)
    return load_segmentation_data(spec)


def _default_imgsz(data: SegmentationData) -> int:
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


def train(cfg: SegmentConfig | None = None, *, resume: str | Path | None = None, verbose: bool = True,
          **overrides: Any) -> TrainResult:
    """Train a segmentation network; the Python twin of ``cnnkit segment train``.

    Returns:
        :class:`~cnnkit.api.classify.TrainResult`; ``metrics`` holds the validation ``miou``,
        ``dice``, ``pixel_acc`` and ``per_class_iou`` at the images' original size.

    Examples:
        >>> result = cnnkit.train("segment", data="shapes", model="unet", epochs=20)
        >>> result.metrics["miou"]
    """
    con = console()
    cfg, ckpt, run = resolve_config(SegmentConfig, "segment", cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = _data(cfg.data, cfg.seed, cfg.imgsz, cfg.classes, cfg.max_objects, cfg.scenes)
    imgsz = cfg.imgsz or _default_imgsz(data)
    train_recs, val_recs = data.splits.get("train", []), data.splits.get("val", [])
    if not train_recs:
        raise DataError(f"the train split of '{cfg.data}' has no images")
    if not val_recs:
        raise DataError(f"the val split of '{cfg.data}' has no images")
    k = len(data.names)
    aug = cfg.aug if cfg.aug is not None else DEFAULT_AUG
    model = build_model(cfg.model, k, 3, cfg.encoder, cfg.pretrained)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init)
        if verbose:
            con.print(f"[yellow]note:[/] {note}")
    weights = class_weights_from(cfg.class_weights, train_recs, k)
    task = SegmentTask(data.names, cfg.loss, weights)
    mode = "crop" if cfg.crop else "resize"
    train_ds = SegmentationDataset(train_recs, imgsz, k, parse_seg_aug(aug, imgsz), mode=mode)
    val_ds = SegmentationDataset(val_recs, imgsz, k, mode=mode, train=False)
    gen = torch.Generator().manual_seed(cfg.seed)
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen,
                               drop_last=len(train_ds) > cfg.batch, pin_memory=pin)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
    run = open_run(cfg, "segment", run)
    card = {
        "task": "segment", "arch": cfg.model, "model_kwargs": {"encoder": model.encoder_name},
        "classes": data.names, "num_classes": k, "in_chans": 3, "imgsz": [imgsz, imgsz],
        "preprocess": {"resize": mode, "imgsz": imgsz, "input": "rgb 0-1", "ignore_index": IGNORE_INDEX},
        "cnnkit_version": cnnkit.__version__,
        "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "aug": aug, "loss": cfg.loss,
                    "classes": cfg.classes, "max_objects": cfg.max_objects, "scenes": cfg.scenes, "pretrained": cfg.pretrained,
                    "init": cfg.init, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")},
    }
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "segment", verbose)
    return _finish(cfg, run, data, trainer, device, train_time, verbose)


def _load_init(model: torch.nn.Module, init: str) -> str:
    """Start from a segmenter's or a classifier's weights (a classifier fills the encoder)."""
    return copy_matching_weights(model, init, ("", "encoder.features.body."))


def _finish(cfg: SegmentConfig, run, data: SegmentationData, trainer: Trainer, device: torch.device,
            train_time: float, verbose: bool) -> TrainResult:
    from cnnkit.utils.plotting import plot_curves

    con = console()
    best = load(run.best, device=str(device))
    val_metrics = evaluate(best, data.split("val"))
    test_metrics = evaluate(best, data.split("test")) if data.splits.get("test") else None
    results = write_run_results(trainer, run, val_metrics, test_metrics, train_time)
    plot_curves(trainer.history, run.plots / "results.png", ["miou", "dice", "pixel_acc"])
    draw_samples(best, data.split("val")[:8], run.plots / "val_predictions.png")
    if verbose:
        con.print(metrics_table(val_metrics, f"validation (best epoch {trainer.best_epoch})"))
        line = _line(val_metrics, "val")
        if test_metrics is not None:
            line += "  ·  " + _line(test_metrics, "test")
        con.print(line + f"  ·  trained {train_time:.0f} s")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, test_metrics, trainer.best_epoch, dict(trainer.skipped))


def _line(m: dict[str, Any], split: str) -> str:
    return f"{split} mIoU {m['miou']:.4f}  Dice {m['dice']:.4f}  pixel acc {m['pixel_acc']:.4f}"


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


# ---------------------------------------------------------------------------------------
# Loading and using a trained segmenter
def load(path: str | Path, device: str = "cpu", tile: bool | None = None) -> Predictor:
    """A segmenter :class:`~cnnkit.runtime.pipeline.Predictor` from ``best.safetensors``, its
    run folder or an exported ``.onnx``. ``tile`` (default: as trained; True for ``--crop``
    models) slides the card's window over full-resolution images."""
    return load_predictor(path, device, task="segment", tile=tile)


def scores(model: Predictor, image: torch.Tensor) -> torch.Tensor:
    """Class scores ``(K, H, W)`` of one uint8 image at its original size."""
    x, meta = model.pipeline.prepare(image)
    return model.pipeline.scores(model.raw(x[None], [meta]), meta)


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


def val(weights: str | Path, data: str, split: str = "val", device: str = "auto", tile: bool | None = None,
        json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Evaluate a segmenter (``.safetensors``, run folder or ``.onnx``) on a dataset split at the
    images' original size: mIoU, Dice, pixel accuracy, per-class IoU and Dice."""
    from cnnkit.engine.checkpoint import resolve_weights

    m = load(weights, device, tile)
    if data == "shapes":
        trained = m.card.provenance
        ds = _data("shapes", trained.get("seed", 0), m.card.input.height, trained.get("classes", len(m.classes) - 1),
                   trained.get("max_objects", 4), trained.get("scenes") if split == "train" else 0)
    else:
        ds = _data(data, 0, None)
    if list(ds.names) != m.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(m.classes)})")
    records = ds.split(split)
    if not records:
        raise DataError(f"the {split} split of '{data}' has no images")
    metrics = evaluate(m, records)
    metrics.update(split=split, weights=str(resolve_weights(weights)), backend=m.backend.name)
    if json_path:
        write_json(json_path, metrics)
    if verbose:
        con = console()
        con.print(metrics_table(metrics, f"{split} split of {data} ({len(records)} images)"))
        con.print(_line(metrics, split))
        for row in metrics.get("skipped_images", []):
            con.print(f"[yellow]skipped[/] {row['path']}: {row['reason']}")
    return metrics


def predict(weights: str | Path, source: str | Path, device: str = "auto", tile: bool | None = None,
            json_path: str | Path | None = None, save_dir: str | Path | None = None,
            verbose: bool = True) -> list[dict[str, Any]]:
    """Segment a file or folder: with ``save_dir`` write ``NAME_mask.png`` (class ids as a palette
    PNG) and ``NAME_overlay.png`` per image; ``json_path`` writes
    ``[{"path", "width", "height", "classes": {name: pixel share}, "mask"}]``."""
    from PIL import Image

    from cnnkit.data.decode import read_image

    m = load(weights, device, tile)
    skipped: list[tuple[str, str]] = []
    timing: dict[str, float] = {}
    results = m(list_sources(source), batch=8, skipped=skipped, timing=timing)
    out = Path(save_dir) if save_dir else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
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
    rows = [r.to_dict() for r in results]
    if json_path:
        write_json(json_path, rows)
    if verbose:
        con = console()
        for r in results:
            fr = r.fractions()
            what = ", ".join(f"{k} {v:.0%}" for k, v in sorted(fr.items(), key=lambda kv: -kv[1]) if k != m.classes[0])
            con.print(f"{r.path}: {r.width}x{r.height}, {what or 'background only'}")
        n = max(1, timing["images"])
        con.print(f"speed: {timing['preprocess_ms'] / n:.1f} ms preprocess, {timing['inference_ms'] / n:.1f} ms "
                  f"inference, {timing['postprocess_ms'] / n:.1f} ms postprocess per image ({m.backend.name})")
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if out is not None:
            con.print(f"masks and overlays in {out}/")
    return rows
