"""Multi-label workflows behind ``cnnkit multilabel train|val|predict`` and the Python API.

Training runs through :mod:`cnnkit.engine.workflow` with :mod:`cnnkit.tasks.multilabel.spec`;
the task itself (sigmoid outputs, BCE/ASL, mAP and F1, threshold tuning) is
:mod:`cnnkit.tasks.multilabel.task`, the data :mod:`cnnkit.data.multilabel` (CSV and ``shapes``).
After training, one threshold per class is tuned on the validation split and written into
the model card (``best.json``: ``thresholds.per_class``), so ``load``, ``val`` and ``predict``
use them.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cnnkit.api._common import config_from_file as _config_from_file
from cnnkit.data.decode import list_sources
from cnnkit.data.multilabel import load_multilabel_data
from cnnkit.engine import workflow
from cnnkit.engine.checkpoint import resolve_weights
from cnnkit.engine.workflow import TrainResult
from cnnkit.errors import CnnkitError, DataError
from cnnkit.runtime.pipeline import Predictor
from cnnkit.runtime.pipeline import load as load_predictor
from cnnkit.tasks.multilabel.config import MultiLabelConfig
from cnnkit.tasks.multilabel.spec import SPEC, evaluate_split, per_class_table

__all__ = ["MultiLabelConfig", "TrainResult", "train", "load", "val", "predict",
           "write_samples", "config_from_file"]

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

    Returns:
        :class:`~cnnkit.engine.workflow.TrainResult`; ``metrics`` holds the validation ``map``,
        ``micro_f1``, ``macro_f1`` (at the tuned thresholds) and ``per_class``.

    Examples:
        >>> result = cnnkit.train("multilabel", data="shapes", epochs=8)
        >>> result.metrics["map"], result.test_metrics["map"]
    """
    return workflow.train(SPEC, cfg, resume=resume, verbose=verbose, **overrides)


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
    metrics, _, skipped = evaluate_split(model, ds.split(split), batch, workers)
    if "map" not in metrics:
        raise DataError(f"the {split} split of '{data}' has no readable images")
    result = {**SPEC.public(metrics), "split": split, "data": data, "weights": str(resolve_weights(weights)),
              "backend": model.backend.name}
    return workflow.finish_val(result, json_path, verbose,
                               per_class_table(metrics, f"{data} · {split} · {metrics['num_images']} images"),
                               SPEC.line(metrics, split), skipped)


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
    table = None
    if verbose:
        from rich.table import Table

        table = Table(title=f"{len(results)} image(s) · {elapsed * 1000 / max(1, len(results)):.1f} ms/image · "
                            f"{model.backend.name}")
        for col in ("path", "labels", "top scores"):
            table.add_column(col)
        for r in results:
            top = sorted(r["scores"].items(), key=lambda kv: -kv[1])[:3]
            table.add_row(r["path"], ", ".join(r["labels"]) or "(none)", ", ".join(f"{n} {s:.2f}" for n, s in top))
    return workflow.finish_predict(results, json_path, verbose, table, skipped=skipped)


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
