"""Multi-label workflows behind ``cnnkit multilabel train|val|predict`` and the Python API.

Wires data, task, model and engine together like :mod:`cnnkit.api.classify`, whose pieces it
reuses (the run result, the model wrapper, starting weights, normalization statistics). What
differs lives in :mod:`cnnkit.tasks.multilabel.task` (sigmoid outputs, BCE/ASL, mAP and F1,
threshold tuning) and :mod:`cnnkit.data.multilabel` (CSV and ``shapes`` scenes).
After training, one threshold per class is tuned on the validation split and written into
the model card (``best.json``: ``thresholds``), so ``load``, ``val`` and ``predict`` use them.
"""

from __future__ import annotations

import datetime as _dt
import time
from pathlib import Path
from typing import Any

import torch

import cnnkit
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import open_run, resolve_config, run_trainer, standard_hooks
from cnnkit.api.classify import TrainResult, _load_init, _stats, prepared_loader
from cnnkit.data.classification import ClassificationData, TransformedDataset, make_loader
from cnnkit.data.decode import list_sources
from cnnkit.data.multilabel import load_multilabel_data
from cnnkit.data.transforms import Preprocess, parse_aug
from cnnkit.engine.checkpoint import load_weights, resolve_weights, save_weights
from cnnkit.engine.progress import console
from cnnkit.engine.run import RunDir
from cnnkit.engine.trainer import Trainer, evaluate, resolve_amp
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor, evaluate_loader
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.multilabel.config import MultiLabelConfig
from cnnkit.tasks.multilabel.task import MultiLabelTask
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything

__all__ = ["MultiLabelConfig", "TrainResult", "train", "load", "val", "predict",
           "write_samples", "config_from_file"]

DEFAULT_AUG = "affine,flip"  # no crops: a crop can cut a labelled object out of the image


def _task(cfg: MultiLabelConfig, classes: list[str], thresholds: list[float] | None = None,
          tune: bool = False) -> MultiLabelTask:
    return MultiLabelTask(classes, cfg.loss, thresholds, cfg.asl_gamma_neg, cfg.asl_gamma_pos,
                          cfg.asl_clip, tune=tune)


# ---------------------------------------------------------------------------------------
# Loading a trained model
# ---------------------------------------------------------------------------------------
def load(path: str | Path, device: str | None = "cpu") -> Predictor:
    """A multi-label :class:`~cnnkit.runtime.pipeline.Predictor` from ``best.safetensors`` (+
    its card), a run folder or an exported ``.onnx``; decoding uses the card's per-class
    thresholds (0.5 where the card has none).

    Examples:
        >>> model = cnnkit.load("runs/multilabel/train")
        >>> model(["scene.png"])[0].labels
        ['circle', 'star']
    """
    return load_predictor(path, device, task="multilabel")


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def train(cfg: MultiLabelConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train a multi-label classifier; the Python twin of ``cnnkit multilabel train``.

    Args:
        cfg: a full config; or pass options as keywords (``data="shapes", epochs=5``).
        resume: a run folder or ``last.ckpt`` to continue exactly where it stopped.
        verbose: print progress and tables.

    Returns:
        :class:`~cnnkit.api.classify.TrainResult`; ``metrics`` holds the validation ``map``,
        ``micro_f1``, ``macro_f1`` (at the tuned thresholds) and ``per_class``.

    Examples:
        >>> result = cnnkit.train("multilabel", data="shapes", epochs=8)
        >>> result.metrics["map"], result.test_metrics["map"]
    """
    con = console()
    cfg, ckpt, run = resolve_config(MultiLabelConfig, "multilabel", cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    data = load_multilabel_data(cfg.data, seed=cfg.seed, val_fraction=cfg.val_fraction,
                                channels=cfg.channels)
    imgsz = cfg.imgsz or data.default_imgsz
    mean, std = _stats(data, cfg.pretrained)
    pre = Preprocess(imgsz, mean, std, data.channels)
    aug = cfg.aug if cfg.aug is not None else DEFAULT_AUG
    train_tf = pre.train_transform(parse_aug(aug, imgsz))
    task = _task(cfg, data.classes)
    model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool}
    model = MultiLabelTask.build_model(cfg.model, len(data.classes), data.channels, cfg.pretrained,
                                       **model_kwargs)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init, data.channels, len(data.classes))
        if verbose and note:
            con.print(f"[yellow]note:[/] {note}")

    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = TransformedDataset(data.split("train"), train_tf)
    val_ds = TransformedDataset(data.split("val"), pre.eval_transform())
    if len(train_ds) == 0:
        raise DataError(f"the train split of '{cfg.data}' has no images")
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)

    run = open_run(cfg, "multilabel", run)
    card = {
        "task": "multilabel", "arch": cfg.model, "model_kwargs": model_kwargs,
        "classes": data.classes, "num_classes": len(data.classes), "in_chans": data.channels,
        "imgsz": [imgsz, imgsz], "preprocess": pre.to_dict(), "cnnkit_version": cnnkit.__version__,
        "output": "sigmoid",
        "trained": {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "aug": aug,
                    "loss": cfg.loss, "val_fraction": cfg.val_fraction,
                    "pretrained": cfg.pretrained, "init": cfg.init,
                    "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
    }
    trainer = Trainer(task, model, train_loader, val_loader, cfg, device, run.root, card,
                      standard_hooks(cfg, run, verbose))
    train_time = run_trainer(trainer, ckpt, run, "multilabel", verbose)
    return _finish(cfg, run, data, pre, trainer, device, train_time, verbose)


def _finish(cfg: MultiLabelConfig, run: RunDir, data: ClassificationData, pre: Preprocess,
            trainer: Trainer, device: torch.device, train_time: float, verbose: bool) -> TrainResult:
    """Tune thresholds on val with the best weights, save them in the card, evaluate val (and
    test), write results.json and plots."""
    from cnnkit.utils.plotting import plot_curves

    con = console()
    best = load(run.best, device=str(device))
    amp = resolve_amp(cfg.amp, device)

    def loader(split: str):
        return make_loader(TransformedDataset(data.split(split), pre.eval_transform()), cfg.batch * 2,
                           False, cfg.workers, _task(cfg, data.classes).collate)

    val_metrics, kept, _ = evaluate(best.model, loader("val"), _task(cfg, data.classes, tune=True),
                                    device, amp, keep=32)
    thresholds = val_metrics["thresholds"]
    state, card = load_weights(run.best)
    card["thresholds"] = dict(zip(data.classes, thresholds))
    card["thresholds_tuned_on"] = "val"
    save_weights(run.best, state, card)
    tuned = _task(cfg, data.classes, thresholds)
    test_metrics = None
    if "test" in data.splits:
        test_metrics, _, _ = evaluate(best.model, loader("test"), tuned, device, amp)
    results = {**_public(val_metrics), "split": "val", "best_epoch": trainer.best_epoch,
               "epochs_run": trainer.epoch, "train_time_s": round(train_time, 2),
               "weights": str(run.best)}
    if test_metrics is not None:
        results["test"] = _public(test_metrics)
    if trainer.skipped:
        results["skipped_images"] = [{"path": p, "reason": r} for p, r in sorted(trainer.skipped.items())]
    write_json(run.results, results)
    plot_curves(trainer.history, run.plots / "results.png", ["map", "micro_f1", "macro_f1"])
    _plot_predictions(kept, tuned, pre, run.plots / "val_predictions.png")
    if verbose:
        con.print(_per_class_table(val_metrics, f"validation (best epoch {trainer.best_epoch}; "
                                                "thresholds tuned on it)"))
        line = _line(val_metrics, "val")
        if test_metrics is not None:
            line += "  ·  " + _line(test_metrics, "test")
        con.print(line)
        if trainer.skipped:
            con.print(f"[yellow]skipped {len(trainer.skipped)} unreadable image(s):[/]")
            for p, r in sorted(trainer.skipped.items()):
                con.print(f"  {p}: {r}")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, results.get("test"), trainer.best_epoch, dict(trainer.skipped))


def _public(metrics: dict[str, Any]) -> dict[str, Any]:
    keys = ("map", "micro_f1", "macro_f1", "loss", "num_images", "per_class")
    return {k: metrics[k] for k in keys if k in metrics}


def _line(m: dict[str, Any], split: str) -> str:
    return f"{split} map {m['map']:.4f}  micro_f1 {m['micro_f1']:.4f}  macro_f1 {m['macro_f1']:.4f}"


def _per_class_table(metrics: dict[str, Any], title: str):
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for col in ("class", "ap", "precision", "recall", "f1", "support", "threshold"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in metrics.get("per_class", {}).items():
        ap = "-" if m["ap"] is None else f"{m['ap']:.4f}"
        table.add_row(name, ap, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}",
                      str(m["support"]), f"{m['threshold']:.2f}")
    table.add_section()
    table.add_row("all", f"mAP {metrics.get('map', 0):.4f}", "", f"micro {metrics.get('micro_f1', 0):.4f}",
                  f"macro {metrics.get('macro_f1', 0):.4f}", str(metrics.get("num_images", "")), "")
    return table


def _plot_predictions(kept: list, task: MultiLabelTask, pre: Preprocess, path: Path) -> None:
    """A grid of validation images titled with the predicted labels (green: exactly right) and,
    below, the missed (-) and wrongly added (+) ones."""
    from cnnkit.utils.plotting import denormalize, plot_image_grid

    if not kept:
        return
    images, titles, colors = [], [], []
    for img, out, target in kept:
        pred = set(task.decode(out[None])[0].labels)
        truth = {c for c, t in zip(task.classes, target.tolist()) if t > 0.5}
        title = _short(sorted(pred), ", ") or "(none)"
        if pred != truth:
            title += "\n" + _short([f"-{c}" for c in sorted(truth - pred)] +
                                   [f"+{c}" for c in sorted(pred - truth)], " ")
        images.append(denormalize(img, pre.mean, pre.std))
        titles.append(title)
        colors.append("green" if pred == truth else "red")
    plot_image_grid(images, titles, path, colors, cols=6)


def _short(names: list[str], sep: str, width: int = 24) -> str:
    """Names joined by ``sep``, cut to their first 4 characters when the line would be too long."""
    text = sep.join(names)
    return text if len(text) <= width else " ".join(n[:5] if n[0] in "+-" else n[:4] for n in names)


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> MultiLabelConfig:
    """A config from ``config.yaml`` with explicitly given options on top."""
    return _config_from_file(MultiLabelConfig, "multilabel", path, overrides)


# ---------------------------------------------------------------------------------------
# Validation and prediction
# ---------------------------------------------------------------------------------------
def val(weights: str | Path, data: str, split: str = "val", batch: int = 64, device: str = "auto",
        workers: int = 0, json_path: str | Path | None = None, verbose: bool = True) -> dict[str, Any]:
    """Evaluate weights on a dataset split at the card's thresholds; the twin of
    ``cnnkit multilabel val``.

    A CSV without ``val.csv`` is split with the seed and ``val_fraction`` the model was trained
    with, so ``--split val`` is the same hold-out as in training.
    """
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    if workers < 0:
        raise CnnkitError(f"--workers must be 0 or more, got {workers}")
    model = load(weights, device)
    trained = model.card.provenance
    ds = load_multilabel_data(data, seed=int(trained.get("seed", 0)),
                              val_fraction=float(trained.get("val_fraction", 0.2)),
                              channels=model.card.input.channels, classes=model.classes)
    task = MultiLabelTask(model.classes, thresholds=model.pipeline.thresholds)
    loader = prepared_loader(model, ds.split(split), batch, workers, task.collate)
    metrics, _, skipped = evaluate_loader(model, loader, task.metrics())
    if "map" not in metrics:
        raise DataError(f"the {split} split of '{data}' has no readable images")
    result = {**_public(metrics), "split": split, "data": data, "weights": str(resolve_weights(weights)),
              "backend": model.backend.name}
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        con = console()
        con.print(_per_class_table(metrics, f"{data} · {split} · {metrics['num_images']} images"))
        con.print(_line(metrics, split))
        for p, r in skipped:
            con.print(f"[yellow]skipped[/] {p}: {r}")
    return result


def predict(weights: str | Path, source: str | Path, batch: int = 64, device: str = "auto",
            json_path: str | Path | None = None, verbose: bool = True) -> list[dict[str, Any]]:
    """Tag a file or folder of images; the twin of ``cnnkit multilabel predict``.

    Returns ``[{"path", "labels": [...], "scores": {class: probability}}]``; ``labels`` are the
    classes at or above their threshold, highest score first. Unreadable files inside a folder
    are reported and skipped; a single unreadable file is an error.
    """
    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    model = load(weights, device)
    skipped: list[tuple[str, str]] = []
    t0 = time.perf_counter()
    results = [r.to_dict() for r in model(list_sources(source), batch=batch, skipped=skipped)]
    elapsed = time.perf_counter() - t0
    if json_path:
        write_json(json_path, results)
    if verbose:
        from rich.table import Table

        con = console()
        table = Table(title=f"{len(results)} image(s) · {elapsed * 1000 / max(1, len(results)):.1f} ms/image")
        for col in ("path", "labels", "top scores"):
            table.add_column(col)
        for r in results:
            top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:3]
            table.add_row(r["path"], ", ".join(r["labels"]) or "(none)",
                          ", ".join(f"{n} {s:.2f}" for n, s in top))
        con.print(table)
        for p, reason in skipped:
            con.print(f"[yellow]skipped[/] {p}: {reason}")
        if json_path:
            con.print(f"predictions written to {json_path}")
    return results


def write_samples(data: str, out: str | Path, split: str = "test", count: int = 16) -> Path:
    """Write the first ``count`` images of a split as PNG files plus their ``labels.csv``
    (the ``path,labels`` format); the twin of ``cnnkit multilabel samples``.

    Handy for looking at a built-in dataset, trying ``predict`` on it, or starting a CSV
    dataset of your own in the right format.

    Returns:
        The path of the written ``labels.csv``.
    """
    from PIL import Image

    from cnnkit.data.formats.multilabel_csv import write_multilabel_csv

    if count < 1:
        raise CnnkitError(f"--count must be at least 1, got {count}")
    ds = load_multilabel_data(data)
    items = ds.split(split)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(min(count, len(items))):
        img, target = items[i]
        labels = [c for c, t in zip(ds.classes, target.tolist()) if t > 0.5]
        path = out / f"{split}_{i:04d}.png"
        arr = img.permute(1, 2, 0).numpy()
        Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
        rows.append((str(path), labels))
    csv_path = out / "labels.csv"
    write_multilabel_csv(csv_path, rows)
    return csv_path
