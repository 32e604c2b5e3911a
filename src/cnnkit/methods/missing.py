"""Accuracy against missing data: ``cnnkit classify val --missing 0,0.1,0.3,0.5``.

Every model sees the same holes (the masks are drawn from one seed afresh for each share);
models trained with ``--missing-input mask`` also get the observation mask. The curve is
the top-1 of each model per share, drawn as a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cnnkit.data.classification import TransformedDataset, load_classification_data, make_loader
from cnnkit.engine.checkpoint import resolve_weights
from cnnkit.engine.progress import console
from cnnkit.engine.trainer import evaluate
from cnnkit.errors import CnnkitError
from cnnkit.runtime.pipeline import load
from cnnkit.tasks.classify.pipeline import legacy_preprocess
from cnnkit.tasks.classify.spec import check_classes
from cnnkit.tasks.classify.task import ClassifyTask
from cnnkit.utils.io import write_json


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
        model = load(w, device, task="classify")
        if model.model is None:
            raise CnnkitError("--missing evaluates PyTorch weights; give .safetensors files or run folders")
        pre = legacy_preprocess(model.card)
        ds = load_classification_data(data, channels=pre.channels)
        check_classes(model, ds.classes, f"weights '{w}'", data)
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
