"""Classification workflows behind ``cnnkit classify train|val|predict`` and the Python API.

This module wires data, task, model and engine together; the learning itself lives in
``cnnkit.tasks.classify`` (loss, metrics, decoding) and ``cnnkit.engine`` (the loop).
"""

from __future__ import annotations

import datetime as _dt
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import cnnkit
from cnnkit.data.classification import (ClassificationData, TransformedDataset,
                                        load_classification_data, make_loader)
from cnnkit.data.decode import ImageLike, is_image_file, read_image
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, parse_aug
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import list_sources, open_run, resolve_config, run_trainer, standard_hooks
from cnnkit.engine.checkpoint import load_weights, resolve_weights
from cnnkit.engine.config import TrainConfig
from cnnkit.engine.progress import console, per_class_table
from cnnkit.engine.run import RunDir
from cnnkit.engine.trainer import Trainer, evaluate, resolve_amp
from cnnkit.errors import CnnkitError, DataError, ImageDecodeError, ModelError
from cnnkit.tasks.classify import ClassifyTask, Prediction
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything

# Per-dataset defaults used when --imgsz / --aug are not given.
DATA_DEFAULTS = {"digits": {"aug": "affine"}, "shapes": {"aug": "affine,flip"}}
FOLDER_AUG = "crop=0.6,flip"


@dataclass
class ClassifyConfig(TrainConfig):
    """``cnnkit classify train`` options (the shared ones plus classification's own)."""

    # defaults measured on digits (benchmarks/digits_vs_svc.py): one-cycle + EMA gave the
    # steadiest test accuracy across seeds
    schedule: str = "onecycle"
    ema: float = 0.995
    label_smoothing: float = 0.1
    aug: str | None = None  # None: the dataset's default (digits: affine; shapes: affine,flip; folders: crop=0.6,flip)
    drop_rate: float = 0.2
    val_fraction: float = 0.2  # held out from train/ when a folder has no val/
    channels: int | None = None  # None: detect (1 for all-grayscale folders, else 3)
    attention: str | None = None  # se, cbam or eca blocks in the backbone (smallcnn, resnets)
    pool: str = "avg"  # global pooling: avg, max, avgmax, lp, gem, spp

    def validate(self) -> None:
        super().validate()
        if not 0 <= self.label_smoothing < 1:
            raise CnnkitError(f"--label-smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0 < self.val_fraction < 1:
            raise CnnkitError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.channels not in (None, 1, 3):
            raise CnnkitError(f"--channels must be 1 or 3, got {self.channels}")
        if not 0 <= self.drop_rate < 1:
            raise CnnkitError(f"--drop-rate must be in [0, 1), got {self.drop_rate}")


@dataclass
class TrainResult:
    """What ``train`` returns: where the run went and its final metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    test_metrics: dict[str, Any] | None = None
    best_epoch: int = 0
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def weights(self) -> Path:
        return self.run_dir / "weights" / "best.safetensors"


# ---------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------
class ClassifierModel:
    """A trained classifier rebuilt from its weights and model card.

    Examples:
        >>> model = cnnkit.load("runs/classify/train/weights/best.safetensors")
        >>> model.predict(["a.png", "b.png"])[0].label
    """

    def __init__(self, model: torch.nn.Module, card: dict[str, Any], device: torch.device):
        self.model = model.to(device).eval()
        self.card = card
        self.device = device
        self.classes: list[str] = list(card["classes"])
        self.preprocess = Preprocess.from_dict(card["preprocess"])
        self.task = ClassifyTask(self.classes)
        self._transform = self.preprocess.eval_transform()

    @property
    def channels(self) -> int:
        return int(self.card["in_chans"])

    def prepare(self, image: ImageLike) -> torch.Tensor:
        """Decode (shared :func:`read_image`) and preprocess one image to ``(C, S, S)``."""
        return self._transform(read_image(image, self.channels))

    @torch.no_grad()
    def logits(self, batch: torch.Tensor) -> torch.Tensor:
        return self.model(batch.to(self.device)).float()

    def predict(self, images: ImageLike | Sequence[ImageLike], topk: int = 5,
                batch: int = 64) -> list[Prediction]:
        """Classify images (paths, bytes, PIL images, arrays or tensors).

        Returns one :class:`~cnnkit.tasks.classify.Prediction` per image, in order.
        """
        if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            images = [images]
        out: list[Prediction] = []
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            x = torch.stack([self.prepare(im) for im in chunk])
            paths = [str(p) if isinstance(p, (str, Path)) else None for p in chunk]
            out += self.task.decode(self.logits(x), paths, topk)
        return out


def load(path: str | Path, device: str | None = "cpu") -> ClassifierModel:
    """Rebuild a classifier from ``best.safetensors`` (+ its ``.json`` card) or a run folder."""
    state, card = load_weights(path)
    if card.get("task") != "classify":
        raise ModelError(f"weights '{path}' are for task '{card.get('task')}', not classify")
    model = ClassifyTask.build_model(card["arch"], len(card["classes"]), int(card["in_chans"]),
                                     **card.get("model_kwargs", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelError(f"weights '{path}' do not match the '{card['arch']}' architecture in "
                         "their model card") from None
    return ClassifierModel(model, card, select_device(device))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def _stats(data: ClassificationData, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.name == "digits" and not pretrained:
        ds = data.splits["train"]
        x = ds.images.float() / 255.0
        return (round(float(x.mean()), 4),), (round(float(x.std()), 4),)
    if data.channels == 1:
        return (0.449,), (0.226,)
    return IMAGENET_MEAN, IMAGENET_STD


def _default_aug(data: ClassificationData) -> str:
    return DATA_DEFAULTS.get(data.name, {}).get("aug", FOLDER_AUG)


def _load_init(model: torch.nn.Module, path: str, in_chans: int, num_classes: int) -> str:
    """Load starting weights (``--init``); rebuild the head when the class count differs."""
    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():
        state, card = load_weights(p)
        if int(card.get("in_chans", in_chans)) != in_chans:
            raise ModelError(f"--init weights '{path}' take {card['in_chans']}-channel images but the "
                             f"data has {in_chans} channel(s); pass --channels {card['in_chans']}")
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        raise ModelError(f"--init weights '{path}' do not exist")
    arch = getattr(model, "cnnkit_arch", "?")
    own = model.state_dict()
    if not set(state) & set(own):
        raise ModelError(f"--init weights '{path}' share no parameter names with model '{arch}'")
    head = model.get_classifier()
    head_prefix = next(n for n, m in model.named_modules() if m is head) + "."
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    body = [k for k in mismatched if not k.startswith(head_prefix)]
    if body:
        raise ModelError(f"--init weights '{path}' do not fit model '{arch}' (shape mismatch in "
                         f"{body[0]}); use the architecture they were trained with")
    note = ""
    if mismatched:
        state = {k: v for k, v in state.items() if k not in mismatched}
        note = f"the classifier head was rebuilt for {num_classes} classes"
    model.load_state_dict(state, strict=False)
    return note


def train(cfg: ClassifyConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train a classifier; the Python twin of ``cnnkit classify train``.

    Args:
        cfg: a full config; or pass options as keywords (``data="digits", epochs=5``).
        resume: a run folder or ``last.ckpt`` to continue exactly where it stopped.
        verbose: print progress and tables.

    Returns:
        :class:`TrainResult` with the run folder and the best epoch's validation metrics.
    """
    con = console()
    cfg, ckpt, run = resolve_config(ClassifyConfig, "classify", cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_classification_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                    channels=cfg.channels)
    imgsz = cfg.imgsz or data.default_imgsz
    mean, std = _stats(data, cfg.pretrained)
    pre = Preprocess(imgsz, mean, std, data.channels)
    aug = cfg.aug if cfg.aug is not None else _default_aug(data)
    train_tf = pre.train_transform(parse_aug(aug, imgsz))
    task = ClassifyTask(data.classes, cfg.label_smoothing)
    model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool}
    model = ClassifyTask.build_model(cfg.model, len(data.classes), data.channels, cfg.pretrained,
                                     **model_kwargs)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init, data.channels, len(data.classes))
        if verbose and note:
            con.print(f"[yellow]note:[/] {note}")

    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = TransformedDataset(data.split("train"), train_tf)
    val_ds = TransformedDataset(data.split("val"), pre.eval_transform())
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
    if len(train_ds) == 0:
        raise DataError(f"the train split of '{cfg.data}' has no images")

    run = open_run(cfg, "classify", run)
    card = {
        "task": "classify", "arch": cfg.model, "model_kwargs": model_kwargs,
        "classes": data.classes, "num_classes": len(data.classes), "in_chans": data.channels,
        "imgsz": [imgsz, imgsz], "preprocess": pre.to_dict(), "cnnkit_version": cnnkit.__version__,
        "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "aug": aug,
                    "pretrained": cfg.pretrained, "init": cfg.init,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "classify", verbose)
    return _finish(cfg, run, data, pre, task, trainer, device, train_time, verbose)


def _finish(cfg: ClassifyConfig, run: RunDir, data: ClassificationData, pre: Preprocess,
            task: ClassifyTask, trainer: Trainer, device: torch.device, train_time: float,
            verbose: bool) -> TrainResult:
    """Evaluate the best weights on val (and test), write results.json and plots."""
    from cnnkit.utils.plotting import plot_confusion, plot_curves

    con = console()
    best = load(run.best, device=str(device))
    amp = resolve_amp(cfg.amp, device)
    val_loader = make_loader(TransformedDataset(data.split("val"), pre.eval_transform()), cfg.batch * 2,
                             False, cfg.workers, task.collate)
    val_metrics, kept, _ = evaluate(best.model, val_loader, task, device, amp, keep=32)
    test_metrics = None
    if "test" in data.splits:
        test_loader = make_loader(TransformedDataset(data.split("test"), pre.eval_transform()),
                                  cfg.batch * 2, False, cfg.workers, task.collate)
        test_metrics, _, _ = evaluate(best.model, test_loader, task, device, amp)
    results = {**_public(val_metrics), "split": "val", "best_epoch": trainer.best_epoch,
               "epochs_run": trainer.epoch, "train_time_s": round(train_time, 2),
               "weights": str(run.best)}
    if test_metrics is not None:
        results["test"] = _public(test_metrics)
    if trainer.skipped:
        results["skipped_images"] = [{"path": p, "reason": r} for p, r in sorted(trainer.skipped.items())]
    write_json(run.results, results)
    plot_curves(trainer.history, run.plots / "results.png", ["top1", "macro_f1", "balanced_accuracy"])
    plot_confusion(val_metrics["confusion_matrix"], data.classes, run.plots / "confusion_matrix.png",
                   title=f"confusion matrix (val, epoch {trainer.best_epoch})")
    _plot_predictions(kept, task, pre, run.plots / "val_predictions.png")
    if verbose:
        con.print(per_class_table(val_metrics, f"validation (best epoch {trainer.best_epoch})"))
        line = f"val top1 {val_metrics['top1']:.4f}  macro_f1 {val_metrics['macro_f1']:.4f}"
        if test_metrics is not None:
            line += f"  ·  test top1 {test_metrics['top1']:.4f}  macro_f1 {test_metrics['macro_f1']:.4f}"
        con.print(line)
        if trainer.skipped:
            con.print(f"[yellow]skipped {len(trainer.skipped)} unreadable image(s):[/]")
            for p, r in sorted(trainer.skipped.items()):
                con.print(f"  {p}: {r}")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, results.get("test"), trainer.best_epoch, dict(trainer.skipped))


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "num_images", "per_class",
            "confusion_matrix")
    return {k: metrics[k] for k in keys if k in metrics}


def _plot_predictions(kept: list, task: ClassifyTask, pre: Preprocess, path: Path) -> None:
    from cnnkit.utils.plotting import denormalize, plot_image_grid

    if not kept:
        return
    images, titles, colors = [], [], []
    for img, out, target in kept:
        pred = task.decode(out[None])[0]
        truth = task.classes[int(target)]
        images.append(denormalize(img, pre.mean, pre.std))
        titles.append(f"{pred.label} {pred.score:.2f}" + ("" if pred.label == truth else f"\n(true {truth})"))
        colors.append("green" if pred.label == truth else "red")
    plot_image_grid(images, titles, path, colors)


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> ClassifyConfig:
    """A config from ``config.yaml`` with explicitly given options on top."""
    return _config_from_file(ClassifyConfig, "classify", path, overrides)


# ---------------------------------------------------------------------------------------
# Validation and prediction
# ---------------------------------------------------------------------------------------
def val(weights: str | Path, data: str, split: str = "val", batch: int = 64, device: str = "auto",
        workers: int = 0, json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Evaluate weights on a dataset split; the twin of ``cnnkit classify val``."""
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    model = load(weights, device)
    ds = load_classification_data(data, channels=model.channels)
    if list(ds.classes) != model.classes:
        if len(ds.classes) != len(model.classes):
            raise ModelError(f"weights '{weights}' were trained on {len(model.classes)} classes but "
                             f"data '{data}' has {len(ds.classes)}; evaluate on data with the same classes")
        raise ModelError(f"weights '{weights}' were trained on classes {model.classes} but data "
                         f"'{data}' has {ds.classes}; evaluate on data with the same classes")
    loader = make_loader(TransformedDataset(ds.split(split), model.preprocess.eval_transform()), batch,
                         False, workers, model.task.collate)
    metrics, _, skipped = evaluate(model.model, loader, model.task, model.device)
    result = {**_public(metrics), "split": split, "data": data, "weights": str(resolve_weights(weights))}
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        con = console()
        con.print(per_class_table(metrics, f"{data} · {split} · {metrics.get('num_images', 0)} images"))
        con.print(f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
                  f"balanced_accuracy {metrics['balanced_accuracy']:.4f}")
        for p, r in skipped:
            con.print(f"[yellow]skipped[/] {p}: {r}")
    return result


def predict(self, images: ImageLike | Sequence[ImageLike], topk: int = 5,
                batch: int = 64) -> list[Prediction]:
        """Classify images (paths, bytes, PIL images, arrays or tensors).

        Returns one :class:`~cnnkit.tasks.classify.Prediction` per image, in order.
        """
        if isinstance(images, (str, Path, bytes)) or not isinstance(images, Sequence):
            images = [images]
        out: list[Prediction] = []
        for i in range(0, len(images), batch):
            chunk = images[i:i + batch]
            x = torch.stack([self.prepare(im) for im in chunk])
            paths = [str(p) if isinstance(p, (str, Path)) else None for p in chunk]
            out += self.task.decode(self.logits(x), paths, topk)
        return out


def load(path: str | Path, device: str | None = "cpu") -> ClassifierModel:
    """Rebuild a classifier from ``best.safetensors`` (+ its ``.json`` card) or a run folder."""
    state, card = load_weights(path)
    if card.get("task") != "classify":
        raise ModelError(f"weights '{path}' are for task '{card.get('task')}', not classify")
    model = ClassifyTask.build_model(card["arch"], len(card["classes"]), int(card["in_chans"]),
                                     **card.get("model_kwargs", {}))
    try:
        model.load_state_dict(state)
    except RuntimeError:
        raise ModelError(f"weights '{path}' do not match the '{card['arch']}' architecture in "
                         "their model card") from None
    return ClassifierModel(model, card, select_device(device))


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def _stats(data: ClassificationData, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.name == "digits" and not pretrained:
        ds = data.splits["train"]
        x = ds.images.float() / 255.0
        return (round(float(x.mean()), 4),), (round(float(x.std()), 4),)
    if data.channels == 1:
        return (0.449,), (0.226,)
    return IMAGENET_MEAN, IMAGENET_STD


def _default_aug(data: ClassificationData) -> str:
    return DATA_DEFAULTS.get(data.name, {}).get("aug", FOLDER_AUG)


def _load_init(model: torch.nn.Module, path: str, in_chans: int, num_classes: int) -> str:
    """Load starting weights (``--init``); rebuild the head when the class count differs."""
    p = Path(path)
    if p.suffix == ".safetensors" or p.is_dir():
        state, card = load_weights(p)
        if int(card.get("in_chans", in_chans)) != in_chans:
            raise ModelError(f"--init weights '{path}' take {card['in_chans']}-channel images but the "
                             f"data has {in_chans} channel(s); pass --channels {card['in_chans']}")
    elif p.is_file():
        state = torch.load(p, map_location="cpu", weights_only=True)
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    else:
        raise ModelError(f"--init weights '{path}' do not exist")
    arch = getattr(model, "cnnkit_arch", "?")
    own = model.state_dict()
    if not set(state) & set(own):
        raise ModelError(f"--init weights '{path}' share no parameter names with model '{arch}'")
    head = model.get_classifier()
    head_prefix = next(n for n, m in model.named_modules() if m is head) + "."
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    body = [k for k in mismatched if not k.startswith(head_prefix)]
    if body:
        raise ModelError(f"--init weights '{path}' do not fit model '{arch}' (shape mismatch in "
                         f"{body[0]}); use the architecture they were trained with")
    note = ""
    if mismatched:
        state = {k: v for k, v in state.items() if k not in mismatched}
        note = f"the classifier head was rebuilt for {num_classes} classes"
    model.load_state_dict(state, strict=False)
    return note


def train(cfg: ClassifyConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train a classifier; the Python twin of ``cnnkit classify train``.

    Args:
        cfg: a full config; or pass options as keywords (``data="digits", epochs=5``).
        resume: a run folder or ``last.ckpt`` to continue exactly where it stopped.
        verbose: print progress and tables.

    Returns:
        :class:`TrainResult` with the run folder and the best epoch's validation metrics.
    """
    con = console()
    cfg, ckpt, run = resolve_config(ClassifyConfig, "classify", cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_classification_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                    channels=cfg.channels)
    imgsz = cfg.imgsz or data.default_imgsz
    mean, std = _stats(data, cfg.pretrained)
    pre = Preprocess(imgsz, mean, std, data.channels)
    aug = cfg.aug if cfg.aug is not None else _default_aug(data)
    train_tf = pre.train_transform(parse_aug(aug, imgsz))
    task = ClassifyTask(data.classes, cfg.label_smoothing)
    model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool}
    model = ClassifyTask.build_model(cfg.model, len(data.classes), data.channels, cfg.pretrained,
                                     **model_kwargs)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init, data.channels, len(data.classes))
        if verbose and note:
            con.print(f"[yellow]note:[/] {note}")

    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = TransformedDataset(data.split("train"), train_tf)
    val_ds = TransformedDataset(data.split("val"), pre.eval_transform())
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
    if len(train_ds) == 0:
        raise DataError(f"the train split of '{cfg.data}' has no images")

    run = open_run(cfg, "classify", run)
    card = {
        "task": "classify", "arch": cfg.model, "model_kwargs": model_kwargs,
        "classes": data.classes, "num_classes": len(data.classes), "in_chans": data.channels,
        "imgsz": [imgsz, imgsz], "preprocess": pre.to_dict(), "cnnkit_version": cnnkit.__version__,
        "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "aug": aug,
                    "pretrained": cfg.pretrained, "init": cfg.init,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "classify", verbose)
    return _finish(cfg, run, data, pre, task, trainer, device, train_time, verbose)


def _finish(cfg: ClassifyConfig, run: RunDir, data: ClassificationData, pre: Preprocess,
            task: ClassifyTask, trainer: Trainer, device: torch.device, train_time: float,
            verbose: bool) -> TrainResult:
    """Evaluate the best weights on val (and test), write results.json and plots."""
    from cnnkit.utils.plotting import plot_confusion, plot_curves

    con = console()
    best = load(run.best, device=str(device))
    amp = resolve_amp(cfg.amp, device)
    val_loader = make_loader(TransformedDataset(data.split("val"), pre.eval_transform()), cfg.batch * 2,
                             False, cfg.workers, task.collate)
    val_metrics, kept, _ = evaluate(best.model, val_loader, task, device, amp, keep=32)
    test_metrics = None
    if "test" in data.splits:
        test_loader = make_loader(TransformedDataset(data.split("test"), pre.eval_transform()),
                                  cfg.batch * 2, False, cfg.workers, task.collate)
        test_metrics, _, _ = evaluate(best.model, test_loader, task, device, amp)
    results = {**_public(val_metrics), "split": "val", "best_epoch": trainer.best_epoch,
               "epochs_run": trainer.epoch, "train_time_s": round(train_time, 2),
               "weights": str(run.best)}
    if test_metrics is not None:
        results["test"] = _public(test_metrics)
    if trainer.skipped:
        results["skipped_images"] = [{"path": p, "reason": r} for p, r in sorted(trainer.skipped.items())]
    write_json(run.results, results)
    plot_curves(trainer.history, run.plots / "results.png", ["top1", "macro_f1", "balanced_accuracy"])
    plot_confusion(val_metrics["confusion_matrix"], data.classes, run.plots / "confusion_matrix.png",
                   title=f"confusion matrix (val, epoch {trainer.best_epoch})")
    _plot_predictions(kept, task, pre, run.plots / "val_predictions.png")
    if verbose:
        con.print(per_class_table(val_metrics, f"validation (best epoch {trainer.best_epoch})"))
        line = f"val top1 {val_metrics['top1']:.4f}  macro_f1 {val_metrics['macro_f1']:.4f}"
        if test_metrics is not None:
            line += f"  ·  test top1 {test_metrics['top1']:.4f}  macro_f1 {test_metrics['macro_f1']:.4f}"
        con.print(line)
        if trainer.skipped:
            con.print(f"[yellow]skipped {len(trainer.skipped)} unreadable image(s):[/]")
            for p, r in sorted(trainer.skipped.items()):
                con.print(f"  {p}: {r}")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, results.get("test"), trainer.best_epoch, dict(trainer.skipped))


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("top1", "top5", "macro_f1", "balanced_accuracy", "loss", "num_images", "per_class",
            "confusion_matrix")
    return {k: metrics[k] for k in keys if k in metrics}


def _plot_predictions(kept: list, task: ClassifyTask, pre: Preprocess, path: Path) -> None:
    from cnnkit.utils.plotting import denormalize, plot_image_grid

    if not kept:
        return
    images, titles, colors = [], [], []
    for img, out, target in kept:
        pred = task.decode(out[None])[0]
        truth = task.classes[int(target)]
        images.append(denormalize(img, pre.mean, pre.std))
        titles.append(f"{pred.label} {pred.score:.2f}" + ("" if pred.label == truth else f"\n(true {truth})"))
        colors.append("green" if pred.label == truth else "red")
    plot_image_grid(images, titles, path, colors)


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> ClassifyConfig:
    """A config from ``config.yaml`` with explicitly given options on top."""
    return _config_from_file(ClassifyConfig, "classify", path, overrides)


# ---------------------------------------------------------------------------------------
# Validation and prediction
# ---------------------------------------------------------------------------------------
def val(weights: str | Path, data: str, split: str = "val", batch: int = 64, device: str = "auto",
        workers: int = 0, json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Evaluate weights on a dataset split; the twin of ``cnnkit classify val``."""
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    model = load(weights, device)
    ds = load_classification_data(data, channels=model.channels)
    if list(ds.classes) != model.classes:
        if len(ds.classes) != len(model.classes):
            raise ModelError(f"weights '{weights}' were trained on {len(model.classes)} classes but "
                             f"data '{data}' has {len(ds.classes)}; evaluate on data with the same classes")
        raise ModelError(f"weights '{weights}' were trained on classes {model.classes} but data "
                         f"'{data}' has {ds.classes}; evaluate on data with the same classes")
    loader = make_loader(TransformedDataset(ds.split(split), model.preprocess.eval_transform()), batch,
                         False, workers, model.task.collate)
    metrics, _, skipped = evaluate(model.model, loader, model.task, model.device)
    result = {**_public(metrics), "split": split, "data": data, "weights": str(resolve_weights(weights))}
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        con = console()
        con.print(per_class_table(metrics, f"{data} · {split} · {metrics.get('num_images', 0)} images"))
        con.print(f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
                  f"balanced_accuracy {metrics['balanced_accuracy']:.4f}")
        for p, r in skipped:
            con.print(f"[yellow]skipped[/] {p}: {r}")
    return result


def list_sources(source: str | Path) -> list[Path]:
    """Image files of a file or folder source (folders are searched recursively)."""
    p = Path(source)
    if not p.exists():
        raise DataError(f"source '{p}' does not exist")
    if p.is_file():
        return [p]
    files = sorted(f for f in p.rglob("*") if f.is_file() and is_image_file(f) and not f.name.startswith("."))
    if not files:
        raise DataError(f"no images found in folder '{p}'")
    return files


def predict(weights: str | Path, source: str | Path | Iterable, topk: int = 5, batch: int = 64,
            device: str = "auto", json_path: str | Path | None = None,
            verbose: bool = True) -> list[dict[str, Any]]:
    """Classify a file or folder of images; the twin of ``cnnkit classify predict``.

    Unreadable files inside a folder are reported and skipped; a single unreadable file is an
    error.
    """
    model = load(weights, device)
    files = list_sources(source)
    results: list[dict[str, Any]] = []
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    for i in range(0, len(files), batch):
        xs, paths = [], []
        for f in files[i:i + batch]:
            try:
                xs.append(model.prepare(f))
                paths.append(str(f))
            except ImageDecodeError as e:
                if len(files) == 1:
                    raise
                skipped.append((str(f), e.reason))
        if xs:
            results += [p.to_dict() for p in model.task.decode(model.logits(torch.stack(xs)), paths, topk)]
    elapsed = time.perf_counter() - t0
    for r in results:
        r.pop("class_id", None)
    if json_path:
        write_json(json_path, results)
    if verbose:
        from rich.table import Table

        con = console()
        table = Table(title=f"{len(results)} image(s) · {elapsed * 1000 / max(1, len(results)):.1f} ms/image")
        for col in ("path", "label", "score", f"top{min(topk, len(model.classes))}"):
            table.add_column(col)
        for r in results:
            table.add_row(r["path"], r["label"], f"{r['score']:.3f}",
                          ", ".join(f"{n} {s:.2f}" for n, s in r["topk"][1:]))
        con.print(table)
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if json_path:
            con.print(f"predictions written to {json_path}")
    return results
