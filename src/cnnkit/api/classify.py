"""Classification workflows behind ``cnnkit classify train|val|predict`` and the Python API.

This module wires data, task, model and engine together; the learning itself lives in
``cnnkit.tasks.classify.task`` (loss, metrics, decoding) and ``cnnkit.engine`` (the loop).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.data.classification import TransformedDataset, load_classification_data, make_loader
from cnnkit.data.decode import list_sources
from cnnkit.data.transforms import Preprocess
from cnnkit.engine import workflow
from cnnkit.engine.checkpoint import resolve_weights
from cnnkit.engine.progress import console, per_class_table
from cnnkit.engine.trainer import evaluate
from cnnkit.engine.workflow import TrainResult
from cnnkit.errors import CnnkitError, ModelError
from cnnkit.runtime.pipeline import Predictor, evaluate_loader, pipeline_for
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.classify.config import ClassifyConfig, parse_imbalance
from cnnkit.tasks.classify.spec import SPEC
from cnnkit.tasks.classify.task import ClassifyTask
from cnnkit.utils.io import write_json

__all__ = ["ClassifyConfig", "TrainResult", "config_from_file", "load", "load_ensemble", "missing_curve",
           "parse_imbalance", "predict", "train", "val"]


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
def train(cfg: ClassifyConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train a classifier; the Python twin of ``cnnkit classify train``.

    Args:
        cfg: a full config; or pass options as keywords (``data="digits", epochs=5``).
        resume: a run folder or ``last.ckpt`` to continue exactly where it stopped.
        verbose: print progress and tables.

    Returns:
        :class:`~cnnkit.engine.workflow.TrainResult` with the run folder and the best epoch's
        validation metrics.
    """
    return workflow.train(SPEC, cfg, resume=resume, verbose=verbose, **overrides)


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
    loader = make_loader(TransformedDataset(ds.split(split), lambda img: model.pipeline.prepare(img)[0]), batch,
                         False, workers, task.collate)
    metrics, _, skipped = evaluate_loader(model, loader, task.metrics())
    resolved = [str(resolve_weights(p)) for p in paths]
    result = {**SPEC.public(metrics), "split": split, "data": data,
              "weights": resolved[0] if len(resolved) == 1 else resolved, "backend": model.backend.name}
    extra = model.card.extra
    if "ensemble" in extra:
        tops = [evaluate_loader(Predictor(model.card, model.pipeline, TorchBackend(m, model.device)), loader,
                                task.metrics())[0]["top1"] for m in model.model.members]
        result.update(ensemble=extra["ensemble"], members_top1=tops, mean_member_top1=sum(tops) / len(tops))
    if "tta" in extra:
        result["tta"] = extra["tta"]
    notes = []
    if "ensemble" in result:
        notes.append(f"ensemble of {len(paths)} ({ensemble}): top1 {metrics['top1']:.4f} · members "
                     + " ".join(f"{t:.4f}" for t in result["members_top1"])
                     + f" (mean {result['mean_member_top1']:.4f}, gain {metrics['top1'] - result['mean_member_top1']:+.4f})")
    if "tta" in result:
        notes.append(f"tta: {len(result['tta'])} views ({', '.join(result['tta'])})")
    line = (f"top1 {metrics['top1']:.4f}  top5 {metrics['top5']:.4f}  macro_f1 {metrics['macro_f1']:.4f}  "
            f"balanced_accuracy {metrics['balanced_accuracy']:.4f}")
    return workflow.finish_val(result, json_path, verbose,
                               per_class_table(metrics, f"{data} · {split} · {metrics.get('num_images', 0)} images"),
                               line, skipped, notes)


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
    table = None
    if verbose:
        from rich.table import Table

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
            table.add_row(r["path"], r["label"], f"{r['score']:.3f}", ", ".join(f"{n} {s:.2f}" for n, s in r["topk"][1:]))
    return workflow.finish_predict(results, json_path, verbose, table, skipped=skipped)


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
