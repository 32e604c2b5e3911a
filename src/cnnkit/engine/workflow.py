"""One training workflow for every task.

A task describes itself with a :class:`WorkflowSpec` (``cnnkit/tasks/<task>/spec.py``): how it
loads data and builds its model, ``Task`` and card (:meth:`~WorkflowSpec.setup`), any step
after the loop (:meth:`~WorkflowSpec.after_fit`: SMOTE on the head, threshold tuning), how it
evaluates a predictor on a split (:meth:`~WorkflowSpec.evaluate`) and what it reports. This
module runs the steps that are the same for all of them, in one place:

resolve the config (or ``--resume``) -> device and seed -> ``spec.setup`` -> run folder and
``config.yaml`` -> the Trainer (standard hooks, the spec's hooks, batch and model transforms)
-> ``spec.after_fit`` -> the best weights as a predictor -> val and test metrics through
``spec.evaluate`` -> ``results.json`` -> curves and the spec's plots and tables.
"""

from __future__ import annotations

import datetime as _dt
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cnnkit.core.card import ModelCard
from cnnkit.engine.config import TrainConfig


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


@dataclass
class Setup:
    """What a spec builds for one run."""

    model: Any  # nn.Module
    task: Any  # cnnkit.tasks.base.Task
    train_loader: Any
    val_loader: Any
    card: ModelCard
    data: Any  # the task's data object (splits for the final evaluation and plots)
    hooks: list = field(default_factory=list)
    batch_transforms: list = field(default_factory=list)
    model_transforms: list = field(default_factory=list)
    state: dict[str, Any] = field(default_factory=dict)  # whatever the spec's later steps need


class WorkflowSpec:
    """A task's part of the workflow (see the module docstring)."""

    name = "?"
    config: type[TrainConfig] = TrainConfig
    curves: tuple[str, ...] = ()  # metrics drawn in plots/results.png
    keep = 0  # validation samples kept for the prediction plot

    def setup(self, cfg: TrainConfig, device, verbose: bool, resuming: bool) -> Setup:
        raise NotImplementedError

    def after_fit(self, cfg: TrainConfig, run, setup: Setup, trainer, device, verbose: bool) -> None:
        """Work after the training loop that changes the best weights or card."""

    def curve_keys(self, cfg: TrainConfig) -> tuple[str, ...]:
        """Metrics drawn in ``plots/results.png``."""
        return self.curves

    def has_split(self, setup: Setup, split: str) -> bool:
        return bool(setup.data.splits.get(split))

    def evaluate(self, cfg: TrainConfig, setup: Setup, predictor, split: str, keep: int = 0) -> tuple[dict, list]:
        """``(metrics, kept samples)`` of ``predictor`` on ``split`` of the run's data."""
        raise NotImplementedError

    def public(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """The metrics written to ``results.json``."""
        return metrics

    def line(self, metrics: dict[str, Any], split: str) -> str:
        """One line of headline metrics."""
        raise NotImplementedError

    def report(self, cfg: TrainConfig, run, setup: Setup, predictor, trainer, val: dict, test: dict | None,
               kept: list, verbose: bool) -> None:
        """The task's own plots (written always) and tables (printed when verbose)."""


def provenance(cfg: TrainConfig, **extra: Any) -> dict[str, Any]:
    """The card's provenance: data, epochs, seed, starting weights, date and cnnkit version."""
    import cnnkit

    return {"data": cfg.data, "epochs": cfg.epochs, "seed": cfg.seed, "pretrained": cfg.pretrained,
            "init": cfg.init, **extra, "cnnkit_version": cnnkit.__version__,
            "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def train(spec: WorkflowSpec, cfg: TrainConfig | None = None, *, resume: str | Path | None = None,
          verbose: bool = True, **overrides: Any) -> TrainResult:
    """Train ``spec``'s task; what every ``cnnkit TASK train`` and ``cnnkit.train`` run."""
    from cnnkit.api._common import (
        open_run,
        resolve_config,
        run_trainer,
        standard_hooks,
        write_run_results,
    )
    from cnnkit.engine.progress import console
    from cnnkit.engine.trainer import Trainer
    from cnnkit.runtime.pipeline import load
    from cnnkit.utils.device import select_device
    from cnnkit.utils.plotting import plot_curves
    from cnnkit.utils.seed import seed_everything

    con = console()
    cfg, ckpt, run = resolve_config(spec.config, spec.name, cfg, resume, overrides, verbose)
    device = select_device(cfg.device)
    seed_everything(cfg.seed)
    s = spec.setup(cfg, device, verbose, ckpt is not None)
    run = open_run(cfg, spec.name, run)
    trainer = Trainer(s.task, s.model, s.train_loader, s.val_loader, cfg, device, run.root, s.card.to_dict(),
                      standard_hooks(cfg, run, verbose, s.hooks), s.batch_transforms, s.model_transforms)
    train_time = run_trainer(trainer, ckpt, run, spec.name, verbose)
    t0 = time.perf_counter()
    spec.after_fit(cfg, run, s, trainer, device, verbose)
    train_time += time.perf_counter() - t0
    best = load(run.best, str(device), task=spec.name)
    val, kept = spec.evaluate(cfg, s, best, "val", spec.keep)
    test = spec.evaluate(cfg, s, best, "test")[0] if spec.has_split(s, "test") else None
    results = write_run_results(trainer, run, spec.public(val), spec.public(test) if test is not None else None,
                                train_time)
    plot_curves(trainer.history, run.plots / "results.png", list(spec.curve_keys(cfg)))
    spec.report(cfg, run, s, best, trainer, val, test, kept, verbose)
    if verbose:
        line = spec.line(val, "val") + ("  ·  " + spec.line(test, "test") if test is not None else "")
        con.print(line + f"  ·  trained {train_time:.0f} s")
        if trainer.skipped:
            con.print(f"[yellow]skipped {len(trainer.skipped)} unreadable image(s):[/]")
            for p, r in sorted(trainer.skipped.items()):
                con.print(f"  {p}: {r}")
        con.print(f"results in {run.root}/ (weights/best.safetensors, metrics.csv, results.json, plots/)")
    return TrainResult(run.root, results, results.get("test"), trainer.best_epoch, dict(trainer.skipped))


# ---- val: the steps every task's ``val`` shares -----------------------------------------
def eval_records(model, ds, data: str, split: str) -> list:
    """The records of ``split`` of a dataset with ``names``, after checking that its classes
    are the model's and the split is not empty."""
    from cnnkit.errors import DataError

    if list(ds.names) != model.classes:
        raise DataError(f"the classes of '{data}' ({', '.join(ds.names)}) differ from the model's "
                        f"({', '.join(model.classes)})")
    records = ds.split(split)
    if not records:
        raise DataError(f"the {split} split of '{data}' has no images")
    return records


def finish_val(result: dict[str, Any], json_path, verbose: bool, table=None, line: str = "",
               skipped=(), notes=()) -> dict[str, Any]:
    """Add skipped images to a val ``result``, write it as JSON, print the table, the
    headline line, ``notes`` and the skipped images; return ``result``."""
    from cnnkit.utils.io import write_json

    skipped = [(s["path"], s["reason"]) if isinstance(s, dict) else s for s in skipped]
    if skipped:
        result["skipped_images"] = [{"path": p, "reason": r} for p, r in skipped]
    if json_path:
        write_json(json_path, result)
    if verbose:
        _print(table, [line] if line else [], notes, skipped)
    return result


def _print(table, lines, notes, skipped) -> None:
    from cnnkit.engine.progress import console

    con = console()
    for item in ([table] if table is not None else []) + list(lines) + list(notes):
        con.print(item)
    for p, reason in skipped:
        con.print(f"[yellow]skipped[/] {p}: {reason}")


def finish_predict(rows: list[dict[str, Any]], json_path, verbose: bool, table=None, lines=(), skipped=(),
                   notes=()) -> list[dict[str, Any]]:
    """Write ``predict`` rows as JSON; print the table (or one line per image), the skipped
    images and ``notes``; return the rows."""
    from cnnkit.utils.io import write_json

    if json_path:
        write_json(json_path, rows)
    if verbose:
        _print(table, lines, list(notes) + ([f"predictions written to {json_path}"] if json_path else []), skipped)
    return rows
