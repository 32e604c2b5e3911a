"""Console display: a rich progress bar per epoch and an epoch summary line.

On a terminal the bar updates live (loss, metric, img/s, ETA); in a log file (CI, pipes)
rich prints each epoch's final bar once, so logs stay one line per epoch.
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from cnnkit.engine.hooks import Hook

if TYPE_CHECKING:
    from cnnkit.engine.trainer import Trainer

_console: Console | None = None


def console() -> Console:
    """The shared console (stderr stays free for errors)."""
    global _console
    if _console is None:
        _console = Console(highlight=False)
    return _console


class ProgressHook(Hook):
    """Per-epoch progress bar and a one-line summary after validation."""

    def __init__(self, con: Console | None = None):
        self.con = con or console()
        self.progress: Progress | None = None
        self.task_id = None
        self.images = 0
        self.t0 = 0.0

    def before_train(self, trainer: Trainer) -> None:
        cfg = trainer.cfg
        self.con.print(f"[bold]training[/] {trainer.task.name} · model {cfg.model} · data {cfg.data} · "
                       f"{cfg.epochs} epochs · batch {cfg.batch} · device {trainer.device}"
                       + (f" · resuming after epoch {trainer.epoch}" if trainer.epoch else ""))

    def before_epoch(self, trainer: Trainer) -> None:
        self.progress = Progress(
            TextColumn("epoch {task.fields[ep]}"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[metric]}"),
            TextColumn("{task.fields[speed]} img/s"),
            TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
            console=self.con, transient=self.con.is_terminal, auto_refresh=self.con.is_terminal,
            refresh_per_second=4)
        self.progress.start()
        self.task_id = self.progress.add_task(
            "train", total=len(trainer.train_loader), ep=f"{trainer.epoch + 1}/{trainer.cfg.epochs}",
            loss="-", metric="", speed="-")
        self.images, self.t0 = 0, time.perf_counter()
        self.pending, self.last_update = 0, self.t0

    def after_step(self, trainer: Trainer) -> None:
        # Throttled: formatting and updating the bar every step costs a few % on small models.
        self.images += trainer.step_images
        self.pending += 1
        now = time.perf_counter()
        if now - self.last_update < 0.25:
            return
        self._update(trainer, now)

    def _update(self, trainer: Trainer, now: float) -> None:
        dt = now - self.t0
        metric = f"{trainer.step_metric[0]} {trainer.step_metric[1]:.4f}" if trainer.step_metric else ""
        self.progress.update(self.task_id, advance=self.pending, loss=f"{trainer.step_loss:.4f}",
                             metric=metric, speed=f"{self.images / dt:.0f}" if dt > 0 else "-")
        self.pending, self.last_update = 0, now

    def after_epoch(self, trainer: Trainer) -> None:
        if self.progress is not None:
            self._update(trainer, time.perf_counter())
            self.progress.stop()
        row = trainer.history[-1]
        parts = [f"epoch {row['epoch']}/{trainer.cfg.epochs}", f"train_loss {row['train_loss']:.4f}"]
        if math.isfinite(row.get("val_loss", math.nan)):  # detectors have no val loss (nan): not shown
            parts.append(f"val_loss {row['val_loss']:.4f}")
        if trainer.last_metrics:
            parts.append(trainer.task.summary(trainer.last_metrics))
        parts += [f"lr {row['lr']:.2e}", f"{row['images_per_s']:.0f} img/s", f"{row['train_time_s']:.1f}s"]
        self.con.print("  ".join(parts) + ("  [green]* best[/]" if trainer.improved else ""))

    def after_train(self, trainer: Trainer) -> None:
        if trainer.stop_reason:
            self.con.print(f"[yellow]{trainer.stop_reason}[/]")


def per_class_table(metrics: dict[str, Any], title: str) -> Table:
    """A rich table with one row per class (precision, recall, F1, support) and the totals."""
    table = Table(title=title, title_justify="left")
    for col in ("class", "precision", "recall", "f1", "support"):
        table.add_column(col, justify="left" if col == "class" else "right")
    for name, m in metrics.get("per_class", {}).items():
        table.add_row(name, f"{m['precision']:.4f}", f"{m['recall']:.4f}", f"{m['f1']:.4f}", str(m["support"]))
    table.add_section()
    table.add_row("all", "", f"bal. acc {metrics.get('balanced_accuracy', 0):.4f}",
                  f"macro {metrics.get('macro_f1', 0):.4f}", str(metrics.get("num_images", "")))
    return table
