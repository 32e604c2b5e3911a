"""The steps of :func:`cnnkit.engine.workflow.train` that are plain functions: resolving a
config or a ``--resume``, reading ``config.yaml``, opening the run folder, the standard
hooks, running the Trainer with a clean interrupt message, and writing ``results.json``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, TypeVar

from cnnkit.engine.checkpoint import load_checkpoint
from cnnkit.engine.config import TrainConfig, read_yaml_config
from cnnkit.engine.hooks import EarlyStopping, Freeze, Hook, MetricsCSV, Snapshots, TimeBudget
from cnnkit.engine.progress import ProgressHook, console
from cnnkit.engine.run import RunDir, new_run_dir
from cnnkit.errors import CnnkitError

C = TypeVar("C", bound=TrainConfig)


def resolve_config(cls: type[C], task: str, cfg: C | None, resume: str | Path | None,
                   overrides: dict[str, Any], verbose: bool = True) -> tuple[C, dict | None, RunDir | None]:
    """The config to train with, and for ``--resume`` the checkpoint and its run folder.

    A resumed run continues unchanged: only ``device`` and ``workers`` may be overridden.
    """
    if resume is None:
        cfg = cfg or cls()
        if overrides:
            cfg = cls.from_dict({**cfg.to_dict(), **overrides}, source="train()")
        cfg.validate()
        return cfg, None, None
    ckpt = load_checkpoint(resume)
    saved = dict(ckpt["config"])
    cfg = cls.from_dict(saved, source=f"checkpoint '{resume}'")
    for k in ("device", "workers"):
        if k in overrides:
            setattr(cfg, k, overrides.pop(k))
    if overrides and verbose:
        console().print(f"[yellow]note:[/] --resume continues the saved run unchanged; ignoring "
                        f"{', '.join(sorted(overrides))}")
    rp = Path(resume)
    root = rp if rp.is_dir() else rp.parent.parent if rp.parent.name == "weights" else rp.parent
    cfg.validate()
    return cfg, ckpt, RunDir(root)


def config_from_file(cls: type[C], task: str, path: str | Path, overrides: dict[str, Any]) -> C:
    """A config from ``config.yaml`` with explicitly given options on top."""
    d = read_yaml_config(path)
    if d.get("task", task) != task:
        raise CnnkitError(f"config '{path}' is for task '{d['task']}', not {task}")
    return cls.from_dict({**d, **overrides}, source=f"config '{path}'")


def open_run(cfg: TrainConfig, task: str, run: RunDir | None, notes: dict[str, str] | None = None) -> RunDir:
    """The run folder: the resumed one, or a new one with ``config.yaml`` written (``notes``: why
    an option has its value, as a comment beside it)."""
    if run is not None:
        return run
    run = new_run_dir(task, cfg.out, cfg.name)
    cfg.save_yaml(run.config, task, notes)
    return run


def standard_hooks(cfg: TrainConfig, run: RunDir, verbose: bool, extra: list[Hook] | None = None,
                   budget_spent: float = 0.0) -> list[Hook]:
    """Progress bar (when verbose), freezing, ``extra`` hooks, the ``--time`` budget (of which
    ``budget_spent`` seconds went before training), ``metrics.csv``, early stopping, snapshots."""
    hooks: list[Hook] = [ProgressHook(console())] if verbose else []
    if cfg.freeze not in (None, "", "none") or cfg.linear_probe:
        hooks.append(Freeze("backbone" if cfg.linear_probe else cfg.freeze, cfg.unfreeze_at))
    hooks += list(extra or [])
    if cfg.time > 0:
        hooks.append(TimeBudget(cfg.time, budget_spent))
    hooks.append(MetricsCSV(run.metrics_csv))
    if cfg.patience:
        hooks.append(EarlyStopping(cfg.patience))
    if cfg.snapshots:
        hooks.append(Snapshots(cfg.epochs // cfg.snapshots))
    return hooks


def run_trainer(trainer, ckpt: dict | None, run: RunDir, task: str, verbose: bool) -> float:
    """Restore ``ckpt`` (when resuming), train, and return the training time in seconds."""
    con = console()
    if ckpt is not None:
        trainer.load_state_dict(ckpt)
        if trainer.epoch >= trainer.cfg.epochs and verbose:
            con.print(f"run '{run.root}' already finished {trainer.epoch} epochs; re-evaluating the best weights")
    t0 = time.perf_counter()
    try:
        trainer.fit()
    except KeyboardInterrupt:
        con.print(f"\n[yellow]interrupted[/]; resume with: cnnkit {task} train --resume {run.root}")
        raise
    return time.perf_counter() - t0


def write_run_results(trainer, run: RunDir, val_metrics: dict[str, Any], test_metrics: dict[str, Any] | None,
                      train_time: float) -> dict[str, Any]:
    """``results.json`` of a finished run: the val metrics of the best weights at top level,
    the best epoch, epochs run, training time, why training stopped, ``test`` and skipped
    images; returns the dict written."""
    from cnnkit.utils.io import write_json

    results = {**val_metrics, "split": "val", "best_epoch": trainer.best_epoch, "epochs_run": trainer.epoch,
               "train_time_s": round(train_time, 2), "weights": str(run.best)}
    if trainer.stop_reason:
        results["stop_reason"] = trainer.stop_reason
    if test_metrics is not None:
        results["test"] = test_metrics
    if trainer.skipped:
        results["skipped_images"] = [{"path": p, "reason": r} for p, r in sorted(trainer.skipped.items())]
    write_json(run.results, results)
    return results
