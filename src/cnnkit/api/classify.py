"""Classification workflows behind ``cnnkit classify train|val|predict`` and the Python API.

This module wires data, task, model and engine together; the learning itself lives in
``cnnkit.tasks.classify.task`` (loss, metrics, decoding) and ``cnnkit.engine`` (the loop).
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
from torch.utils.data import Dataset

import cnnkit
from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.api._common import open_run, resolve_config, run_trainer, standard_hooks
from cnnkit.data.classification import (
    ClassificationData,
    TransformedDataset,
    load_classification_data,
    make_loader,
)
from cnnkit.data.decode import list_sources
from cnnkit.data.mix import make_batch_mix
from cnnkit.data.sampling import (
    LabelView,
    bootstrap,
    class_counts,
    class_weights,
    long_tail,
    make_sampler,
    noisy_labels,
)
from cnnkit.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocess, parse_aug
from cnnkit.engine.checkpoint import load_weights, resolve_weights
from cnnkit.engine.progress import console, per_class_table
from cnnkit.engine.run import RunDir
from cnnkit.engine.trainer import Trainer, evaluate, resolve_amp
from cnnkit.errors import CnnkitError, DataError, ModelError
from cnnkit.runtime.pipeline import Predictor, evaluate_loader, pipeline_for
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.classify.config import SAMPLERS, ClassifyConfig, parse_imbalance
from cnnkit.tasks.classify.task import ClassifyTask
from cnnkit.utils.device import select_device
from cnnkit.utils.io import write_json
from cnnkit.utils.seed import seed_everything

# Per-dataset defaults used when --imgsz / --aug are not given.
DATA_DEFAULTS = {"digits": {"aug": "affine"}, "shapes": {"aug": "affine,flip"}}
FOLDER_AUG = "crop=0.6,flip"


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
def load(path: str | Path, device: str | None = "cpu") -> Predictor:
    """A classifier :class:`~cnnkit.runtime.pipeline.Predictor` from ``best.safetensors`` (+
    its card), a run folder, or an exported ``.onnx`` (run in ONNX Runtime).

    Examples:
        >>> model = cnnkit.load("runs/classify/train/weights/best.safetensors")
        >>> model(["a.png", "b.png"])[0].label
    """
    return load_predictor(path, device, task="classify")


def legacy_preprocess(card) -> Preprocess:
    """The normalizing :class:`Preprocess` a card's model was trained with (the raw model,
    not the core, takes its output)."""
    i = card.input
    return Preprocess(i.height, tuple(i.mean), tuple(i.std), i.channels, mask_channel=i.mask_channel)


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------
def _stats(data: ClassificationData, pretrained: bool) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if data.name == "digits" and not pretrained:
        ds = data.splits["train"]
        x = getattr(ds, "base", ds).images.float() / 255.0  # (ChannelView: the gray source)
        return (round(float(x.mean()), 4),) * data.channels, (round(float(x.std()), 4),) * data.channels
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
    pre = Preprocess(imgsz, mean, std, data.channels, mask_channel=cfg.missing_input == "mask")
    # with --batch-aug the default per-image augmentation is off (it would augment twice)
    aug = cfg.aug if cfg.aug is not None else ("none" if cfg.batch_aug else _default_aug(data))
    train_tf = pre.train_transform(parse_aug(aug, imgsz), cfg.missing, cfg.missing_mode)
    imb = parse_imbalance(cfg.imbalance)
    train_split, val_split = _experiment_splits(cfg, data)
    num_classes = len(data.classes)
    task = _make_task(cfg, data.classes, train_split.targets, imb)
    model_kwargs = {"drop_rate": cfg.drop_rate, "attention": cfg.attention, "pool": cfg.pool}
    model = ClassifyTask.build_model(cfg.model, num_classes, pre.model_channels, cfg.pretrained,
                                     **model_kwargs)
    if cfg.init and ckpt is None:
        note = _load_init(model, cfg.init, data.channels, num_classes)
        if verbose and note:
            con.print(f"[yellow]note:[/] {note}")

    gen = torch.Generator().manual_seed(cfg.seed)
    train_ds = TransformedDataset(train_split, train_tf)
    val_ds = TransformedDataset(val_split, pre.eval_transform())
    if len(train_ds) == 0:
        raise DataError(f"the train split of '{cfg.data}' has no images")
    sampler_name = next((k for k in SAMPLERS if k in imb), None)
    sampler = make_sampler(sampler_name, train_split.targets, num_classes, gen) if sampler_name else None
    pin = device.type == "cuda"
    train_loader = make_loader(train_ds, cfg.batch, True, cfg.workers, task.collate, gen, pin_memory=pin,
                               sampler=sampler)
    val_loader = make_loader(val_ds, cfg.batch * 2, False, cfg.workers, task.collate, pin_memory=pin)
    batch_transforms = []
    if cfg.batch_aug:
        from cnnkit.data.batch_aug import BatchAugment

        batch_transforms.append(BatchAugment.from_spec(cfg.batch_aug, mean, std))
    if (mix := make_batch_mix(num_classes, cfg.mixup, cfg.cutmix)) is not None:
        batch_transforms.append(mix)
    if verbose and (cfg.imbalance_ratio < 1 or cfg.label_noise > 0 or cfg.bootstrap or sampler_name):
        con.print(f"train split: {len(train_split)} images, per class "
                  f"{class_counts(train_split.targets, num_classes).tolist()}"
                  + (f"; sampler {sampler_name}" if sampler_name else ""))

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
                      standard_hooks(cfg, run, verbose), batch_transforms)
    train_time = run_trainer(trainer, ckpt, run, "classify", verbose)
    if "smote" in imb:
        t0 = time.perf_counter()
        _smote_head(run, TransformedDataset(train_split, pre.eval_transform()), task, cfg, device, verbose)
        train_time += time.perf_counter() - t0
    return _finish(cfg, run, data, val_split, pre, task, trainer, device, train_time, verbose)


def _experiment_splits(cfg: ClassifyConfig, data: ClassificationData) -> tuple[Dataset, Dataset]:
    """The train and val splits after --imbalance-ratio, --label-noise and --bootstrap.

    Label noise goes into train and val alike (both are "your labelled data"); test, when
    there is one, stays clean, so it measures what the noise cost.
    """
    train, val = data.split("train"), data.split("val")
    k = len(data.classes)
    if cfg.imbalance_ratio < 1:
        train = LabelView(train, long_tail(train.targets, k, cfg.imbalance_ratio, cfg.seed))
    if cfg.label_noise > 0:
        train = LabelView(train, range(len(train)),
                          noisy_labels(train.targets, k, cfg.label_noise, cfg.noise_type, cfg.seed))
        val = LabelView(val, range(len(val)),
                        noisy_labels(val.targets, k, cfg.label_noise, cfg.noise_type, cfg.seed + 1))
    if cfg.bootstrap:
        train = LabelView(train, bootstrap(len(train), cfg.seed))
    return train, val


def _make_task(cfg: ClassifyConfig, classes: list[str], targets: list[int],
               imb: dict[str, float | None]) -> ClassifyTask:
    weights = None
    if "class-weights" in imb:
        weights = class_weights(targets, len(classes), "inverse")
    elif "class-balanced" in imb:
        weights = class_weights(targets, len(classes), "effective", imb["class-balanced"] or 0.999)
    loss = "focal" if "focal" in imb else cfg.loss
    return ClassifyTask(classes, cfg.label_smoothing, loss=loss, class_weights=weights,
                        ohem=(imb["ohem"] or 0.5) if "ohem" in imb else 0.0,
                        focal_gamma=imb.get("focal") or 2.0)


@torch.no_grad()
def _embed(model: torch.nn.Module, ds: Dataset, task: ClassifyTask, device: torch.device,
           batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Pre-logit embeddings ``(N, D)`` and labels of a dataset (unreadable images left out)."""
    feats, labels = [], []
    model.eval()
    for b in make_loader(ds, batch, False, 0, task.collate):
        if len(b["targets"]) == 0:
            continue
        x = b["images"].to(device)
        feats.append(model.forward_head(model.forward_features(x), pre_logits=True).float().cpu())
        labels.append(b["targets"])
    return torch.cat(feats).numpy(), torch.cat(labels).numpy()


def _smote_head(run: RunDir, train_ds: Dataset, task: ClassifyTask, cfg: ClassifyConfig,
                device: torch.device, verbose: bool) -> None:
    """``--imbalance smote``: SMOTE in feature space, then retrain the linear head on it.

    The trained network embeds every training image (no augmentation); imbalanced-learn's
    SMOTE adds synthetic minority embeddings between neighbours of the same class until every
    class matches the largest; the classifier head is retrained on the balanced embeddings
    (full-batch L-BFGS from the trained head) and the best weights are rewritten.
    """
    from imblearn.over_sampling import SMOTE

    from cnnkit.engine.checkpoint import save_weights

    best = load(run.best, device=str(device))
    head = best.model.get_classifier()
    if not isinstance(head, torch.nn.Linear):
        raise ModelError(f"--imbalance smote retrains a linear classifier head; '{cfg.model}' has "
                         f"{type(head).__name__}")
    x, y = _embed(best.model, train_ds, task, device)
    counts = np.bincount(y)
    smallest = int(counts[counts > 0].min())
    if smallest < 2:
        raise DataError("--imbalance smote needs at least 2 training images in every class")
    xs, ys = SMOTE(k_neighbors=min(5, smallest - 1), random_state=cfg.seed).fit_resample(x, y)
    xt, yt = torch.as_tensor(xs, dtype=torch.float32, device=device), torch.as_tensor(ys, device=device)
    head.train()
    opt = torch.optim.LBFGS(head.parameters(), lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    decay = 1e-4

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(xt), yt) + decay * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    state, card = load_weights(run.best)
    state.update({k: v.detach().cpu() for k, v in best.model.state_dict().items()})
    card["trained"] = {**card.get("trained", {}), "smote": {"real": int(len(y)), "synthetic": int(len(ys) - len(y))}}
    save_weights(run.best, state, card)
    if verbose:
        console().print(f"smote: {len(ys) - len(y)} synthetic embeddings added; classifier head retrained")


def _finish(cfg: ClassifyConfig, run: RunDir, data: ClassificationData, val_split: Dataset,
            pre: Preprocess, task: ClassifyTask, trainer: Trainer, device: torch.device,
            train_time: float, verbose: bool) -> TrainResult:
    """Evaluate the best weights on val (and test), write results.json and plots."""
    from cnnkit.utils.plotting import plot_confusion, plot_curves

    con = console()
    best = load(run.best, device=str(device))
    amp = resolve_amp(cfg.amp, device)
    val_loader = make_loader(TransformedDataset(val_split, pre.eval_transform()), cfg.batch * 2,
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
        images.append(denormalize(img[:pre.channels], pre.mean, pre.std))  # (no mask channel)
        titles.append(f"{pred.label} {pred.score:.2f}" + ("" if pred.label == truth else f"\n(true {truth})"))
        colors.append("green" if pred.label == truth else "red")
    plot_image_grid(images, titles, path, colors)


def config_from_file(path: str | Path, overrides: dict[str, Any]) -> ClassifyConfig:
    """A config from ``config.yaml`` with explicitly given options on top."""
    return _config_from_file(ClassifyConfig, "classify", path, overrides)


# ---------------------------------------------------------------------------------------
# Validation and prediction
# ---------------------------------------------------------------------------------------
def load_ensemble(weights: str | Path | Sequence[str | Path], device: str | None = "cpu",
                  ensemble: str = "mean", tta: str | None = None) -> Predictor:
    """Load one or more weights as one classifier: an ensemble (``mean`` or ``vote``) and/or TTA.

    One weights file without TTA is exactly :func:`load` (an ``.onnx`` runs in ONNX Runtime).
    Several must be classifiers of the same classes in the same order and with the same
    channels; they may differ in architecture and input size (see
    :func:`cnnkit.methods.ensemble.build_ensemble`). The card's ``extra`` records what was
    combined: ``ensemble = {"mode", "members"}`` and ``tta`` (view names).

    Examples:
        >>> model = load_ensemble(["runs/a", "runs/b", "runs/c"], ensemble="vote", tta="scale")
        >>> model("digit.png")[0].label
    """
    from dataclasses import replace

    from cnnkit.methods.ensemble import ENSEMBLE_MODES, build_ensemble, parse_tta
    from cnnkit.runtime.backend import TorchBackend

    paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
    if not paths:
        raise CnnkitError("--weights needs at least one weights file or run folder")
    if ensemble not in ENSEMBLE_MODES:
        raise CnnkitError(f"--ensemble must be one of {', '.join(ENSEMBLE_MODES)}, got '{ensemble}'")
    views = parse_tta(tta)
    if len(paths) == 1 and len(views) == 1:
        return load(paths[0], device)
    if any(Path(p).suffix == ".onnx" for p in paths):
        raise CnnkitError("ensembles and --tta combine PyTorch weights; give .safetensors files or run folders")
    members = [load(p, device) for p in paths]
    first = members[0]
    for path, m in zip(paths[1:], members[1:]):
        if m.classes != first.classes:
            ours, theirs = ((f"{len(m.classes)} classes", f"{len(first.classes)}")
                            if len(m.classes) != len(first.classes) else (f"classes {m.classes}", f"{first.classes}"))
            raise ModelError(f"weights '{path}' were trained on {ours} but '{paths[0]}' on {theirs}; "
                             "ensemble members need the same classes in the same order")
    # every member's core takes [0, 1] images and normalizes itself: the ensemble only resizes
    pres = [Preprocess(m.card.input.height, (0.0,) * m.card.input.channels, (1.0,) * m.card.input.channels,
                       m.card.input.channels, mask_channel=m.card.input.mask_channel) for m in members]
    module, pre = build_ensemble([m.backend.core for m in members], pres, ensemble, views)
    extra = dict(first.card.extra)
    if len(members) > 1:
        extra["ensemble"] = {"mode": ensemble, "members": [str(resolve_weights(p)) for p in paths]}
    if len(views) > 1:
        extra["tta"] = [v.name for v in views]
    card = replace(first.card, input=replace(first.card.input, height=pre.imgsz, width=pre.imgsz), extra=extra)
    return Predictor(card, pipeline_for(card), TorchBackend(module, first.device), paths[0], module)


def _check_classes(model: Predictor, classes: list[str], name: str, data: str) -> None:
    if list(classes) == model.classes:
        return
    if len(classes) != len(model.classes):
        raise ModelError(f"{name} were trained on {len(model.classes)} classes but data "
                         f"'{data}' has {len(classes)}; evaluate on data with the same classes")
    raise ModelError(f"{name} were trained on classes {model.classes} but data '{data}' has "
                     f"{classes}; evaluate on data with the same classes")


def prepared_loader(model: Predictor, split: Dataset, batch: int, workers: int, collate) -> Any:
    """A loader of ``split`` with each image prepared by the model's pipeline (as predict does)."""
    return make_loader(TransformedDataset(split, lambda img: model.pipeline.prepare(img)[0]), batch, False,
                       workers, collate)


def val(weights: str | Path | Sequence[str | Path], data: str, split: str = "val", batch: int = 64,
        device: str = "auto", workers: int = 0, json_path: str | Path | None = None, verbose: bool = True,
        ensemble: str = "mean", tta: str | None = None) -> dict[str, Any]:
    """Evaluate weights (``.safetensors``, a run folder or an exported ``.onnx``) on a dataset
    split; the twin of ``cnnkit classify val``.

    Several ``weights`` are evaluated as one ensemble (``ensemble="mean"`` or ``"vote"``, see
    :func:`load_ensemble`); the result then also has ``ensemble`` (mode and members),
    ``members_top1`` (each member alone, with the same preprocessing and TTA) and
    ``mean_member_top1``. ``tta`` (e.g. ``"scale"``) averages over test-time views and adds
    ``tta`` (the view names) to the result.
    """
    from cnnkit.runtime.backend import TorchBackend

    if batch < 1:
        raise CnnkitError(f"--batch must be at least 1, got {batch}")
    paths = [weights] if isinstance(weights, (str, Path)) else list(weights)
    model = load_ensemble(paths, device, ensemble, tta)
    name = f"weights '{paths[0]}'" if len(paths) == 1 else f"the {len(paths)} ensemble weights"
    ds = load_classification_data(data, channels=model.card.input.channels)
    _check_classes(model, ds.classes, name, data)
    task = ClassifyTask(model.classes)
    loader = prepared_loader(model, ds.split(split), batch, workers, task.collate)
    metrics, _, skipped = evaluate_loader(model, loader, task.metrics())
    resolved = [str(resolve_weights(p)) for p in paths]
    result = {**_public(metrics), "split": split, "data": data,
              "weights": resolved[0] if len(resolved) == 1 else resolved, "backend": model.backend.name}
    extra = model.card.extra
    if "ensemble" in extra:
        tops = [evaluate_loader(Predictor(model.card, model.pipeline, TorchBackend(m, model.device)), loader,
                                task.metrics())[0]["top1"] for m in model.model.members]
        result.update(ensemble=extra["ensemble"], members_top1=tops, mean_member_top1=sum(tops) / len(tops))
    if "tta" in extra:
        result["tta"] = extra["tta"]
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        con = console()
        con.print(per_class_table(metrics, f"{data} · {split} · {metrics.get('num_images', 0)} images"))
        con.print(f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
                  f"balanced_accuracy {metrics['balanced_accuracy']:.4f}")
        if "ensemble" in result:
            con.print(f"ensemble of {len(paths)} ({ensemble}): top1 {metrics['top1']:.4f} · members "
                      + " ".join(f"{t:.4f}" for t in result["members_top1"])
                      + f" (mean {result['mean_member_top1']:.4f}, gain "
                      f"{metrics['top1'] - result['mean_member_top1']:+.4f})")
        if "tta" in result:
            con.print(f"tta: {len(result['tta'])} views ({', '.join(result['tta'])})")
        for p, r in skipped:
            con.print(f"[yellow]skipped[/] {p}: {r}")
    return result


def predict(weights: str | Path | Sequence[str | Path], source: str | Path | Iterable, topk: int = 5,
            batch: int = 64, device: str = "auto", json_path: str | Path | None = None,
            verbose: bool = True, ensemble: str = "mean", tta: str | None = None) -> list[dict[str, Any]]:
    """Classify a file or folder of images; the twin of ``cnnkit classify predict``.

    Several ``weights`` predict as one ensemble (``ensemble="mean"`` or ``"vote"``) and ``tta``
    averages over test-time views (see :func:`load_ensemble`); scores are then the combined
    probabilities. Unreadable files inside a folder are reported and skipped; a single
    unreadable file is an error.
    """
    model = load_ensemble(weights, device, ensemble, tta)
    skipped: list[tuple[str, str]] = []
    timing: dict[str, float] = {}
    results = [r.to_dict() for r in model(list_sources(source), batch=batch, topk=topk, skipped=skipped,
                                          timing=timing)]
    if json_path:
        write_json(json_path, results)
    if verbose:
        from rich.table import Table

        con = console()
        extra = ""
        if "ensemble" in model.card.extra:
            extra += f" · ensemble of {len(model.card.extra['ensemble']['members'])} ({ensemble})"
        if "tta" in model.card.extra:
            extra += f" · tta {len(model.card.extra['tta'])} views"
        ms = (timing["preprocess_ms"] + timing["inference_ms"] + timing["postprocess_ms"]) / max(1, len(results))
        table = Table(title=f"{len(results)} image(s) · {ms:.1f} ms/image · {model.backend.name}{extra}")
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


def missing_curve(weights: Sequence[str | Path], data: str, ratios: Sequence[float], split: str = "val",
                  mode: str = "patch", batch: int = 128, device: str = "auto", seed: int = 0,
                  plot: str | Path | None = None, json_path: str | Path | None = None,
                  verbose: bool = True) -> dict[str, Any]:
    """Top-1 accuracy of each model against the share of missing pixels (``val --missing``).

    Every model sees the same holes: the masks are drawn from ``seed`` afresh for each ratio.
    A model trained with ``--missing-input mask`` also gets the observation mask; others get
    zero-filled holes (zero after normalization, as in training). Writes the curve as a PNG
    when ``plot`` is given.
    """
    from cnnkit.data.missing import MISSING_MODES
    from cnnkit.utils.plotting import plot_lines

    if mode not in MISSING_MODES:
        raise CnnkitError(f"--missing-mode must be one of {', '.join(MISSING_MODES)}, got '{mode}'")
    if not ratios or any(not 0 <= r < 1 for r in ratios):
        raise CnnkitError(f"--missing takes ratios in [0, 1), e.g. 0,0.1,0.3,0.5; got {list(ratios)}")
    curves: dict[str, list[float]] = {}
    for w in weights:
        model = load(w, device)
        if model.model is None:
            raise CnnkitError("--missing evaluates PyTorch weights; give .safetensors files or run folders")
        pre = legacy_preprocess(model.card)
        ds = load_classification_data(data, channels=pre.channels)
        _check_classes(model, ds.classes, f"weights '{w}'", data)
        name = str(resolve_weights(w).parent.parent.name if resolve_weights(w).parent.name == "weights" else w)
        name += " (mask input)" if pre.mask_channel else " (zero-filled)"
        task = ClassifyTask(model.classes)
        curve = []
        for r in ratios:
            torch.manual_seed(seed)
            loader = make_loader(TransformedDataset(ds.split(split), pre.eval_transform(r, mode)),
                                 batch, False, 0, task.collate)
            metrics, _, _ = evaluate(model.model, loader, task, model.device)
            curve.append(round(metrics["top1"], 4))
        curves[name] = curve
    result = {"data": data, "split": split, "mode": mode, "ratios": list(ratios), "top1": curves}
    if plot:
        plot_lines(list(ratios), curves, plot, xlabel=f"missing share ({mode}es)" if mode == "patch" else
                   "missing share (pixels)", ylabel=f"top-1 ({split})", title=f"{data}: accuracy vs missing data")
        result["plot"] = str(plot)
    if json_path:
        write_json(json_path, result)
    if verbose:
        from rich.table import Table

        table = Table(title=f"{data} · {split} · top-1 vs missing share ({mode})")
        table.add_column("model")
        for r in ratios:
            table.add_column(f"{r:g}", justify="right")
        for name, c in curves.items():
            table.add_row(name, *[f"{v:.4f}" for v in c])
        console().print(table)
        if plot:
            console().print(f"curve written to {plot}")
    return result
